"""Draft tree: the tensor builder against a heap-based best-first search, tree invariants, ties, acceptance."""
import heapq
import random

import pytest
import torch
from trees import build_tree, chain_tree

from nanojet.engine.tree import (
    TREE_BUCKETS,
    DraftTree,
    accept,
    pad_tree,
    tree_bucket,
    tree_from_candidates,
    tree_size,
)
from nanojet.kernels.reference import unpack_visibility

VOCAB = 50
ROWS = 12  # draft rows: depths 1..12


def random_logprobs(seed: int, rows: int = ROWS, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(rows, vocab, generator=generator)).log_softmax(-1)


def heap_best_first(draft_logprobs: torch.Tensor, budget: int, width: int,
                    max_depth: int) -> dict[tuple[int, ...], float]:
    """Token path -> score of the best `budget - 1` non-root nodes, expanding lazily: popping a node pushes its
    best child and its next sibling, each no better than the node itself."""
    values, tokens = draft_logprobs.double().sort(dim=-1, descending=True)
    values, tokens = values[:, :width].tolist(), tokens[:, :width].tolist()
    heap = [(-values[0][0], (0,))] if max_depth >= 1 and budget > 1 else []
    chosen = {}
    while heap and len(chosen) < budget - 1:
        negative_score, ranks = heapq.heappop(heap)
        chosen[tuple(tokens[d][r] for d, r in enumerate(ranks))] = -negative_score
        parent_score = -negative_score - values[len(ranks) - 1][ranks[-1]]
        if len(ranks) < max_depth:
            heapq.heappush(heap, (negative_score - values[len(ranks)][0], ranks + (0,)))
        if ranks[-1] + 1 < width:
            sibling = ranks[:-1] + (ranks[-1] + 1,)
            heapq.heappush(heap, (-(parent_score + values[len(ranks) - 1][ranks[-1] + 1]), sibling))
    return chosen


def ancestors_or_self(parents: list[int], node: int) -> set[int]:
    found = {node}
    while parents[node] >= 0:
        node = parents[node]
        found.add(node)
    return found


def token_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    return [tuple(tokens[i] for i in sorted(ancestors_or_self(parents, node) - {0}))
            for node in range(1, len(tokens))]


def path_score(draft_logprobs: torch.Tensor, path: tuple[int, ...]) -> float:
    return sum(draft_logprobs[d, token].item() for d, token in enumerate(path))


def check_tree(tree: DraftTree, anchor: int, width: int, max_depth: int, num_nodes: int) -> None:
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    assert tree.tokens.dtype == tree.parents.dtype == tree.depths.dtype == torch.int64
    assert len(tokens) == len(parents) == len(depths) == num_nodes
    assert tree.visibility.dtype == torch.int32 and tree.visibility.shape == (num_nodes, (num_nodes + 31) // 32)
    assert tokens[0] == anchor and parents[0] == -1 and depths[0] == 0
    children: dict[int, list[int]] = {}
    for node in range(1, num_nodes):
        assert 0 <= parents[node] < node
        assert depths[node] == depths[parents[node]] + 1 <= max_depth
        children.setdefault(parents[node], []).append(tokens[node])
    for siblings in children.values():
        assert len(siblings) <= width and len(set(siblings)) == len(siblings)
    assert depths == sorted(depths)  # (depth, score) order
    visible = unpack_visibility(tree.visibility, num_nodes)
    for node in range(num_nodes):
        assert set(torch.where(visible[node])[0].tolist()) == ancestors_or_self(parents, node)


def test_tree_size() -> None:
    assert tree_size(1, 8, 12) == 1
    assert tree_size(100, 1, 12) == 13
    assert tree_size(100, 2, 3) == 15
    assert tree_size(15, 2, 3) == 15 and tree_size(14, 2, 3) == 14
    assert tree_size(256, 8, 0) == 1
    with pytest.raises(ValueError):
        tree_size(0, 2, 3)


@pytest.mark.parametrize("seed", range(3))
def test_matches_heap_best_first(seed: int) -> None:
    draft_logprobs = random_logprobs(seed)
    anchor = 40 + seed
    for budget in (1, 2, 8, 64, 256):
        for width in (1, 2, 4, 8):
            for depth in list(range(1, ROWS + 1)) + [None]:
                max_depth = ROWS if depth is None else depth
                tree = build_tree(torch.tensor(anchor), draft_logprobs, budget, width, depth)
                num_nodes = tree_size(budget, width, max_depth)
                check_tree(tree, anchor, width, max_depth, num_nodes)
                expected = heap_best_first(draft_logprobs, budget, width, max_depth)
                assert set(token_paths(tree)) == set(expected), (budget, width, depth)


def test_depth_limit_beyond_draft_rows_and_chain() -> None:
    draft_logprobs = random_logprobs(5, rows=4)
    tree = build_tree(torch.tensor(3), draft_logprobs, budget=256, width=2, depth=9)
    check_tree(tree, 3, 2, 4, 31)
    chain = chain_tree(torch.tensor(3), draft_logprobs, depth=3)
    assert chain.tokens.tolist() == [3] + draft_logprobs[:3].argmax(-1).tolist()
    assert chain.parents.tolist() == [-1, 0, 1, 2]
    anchor_only = build_tree(torch.tensor(3), draft_logprobs, budget=1, width=8)
    check_tree(anchor_only, 3, 8, 0, 1)


def test_exact_ties_give_a_deterministic_level_order_tree() -> None:
    draft_logprobs = torch.full((6, VOCAB), -torch.log(torch.tensor(float(VOCAB))).item())
    first = build_tree(torch.tensor(1), draft_logprobs, budget=64, width=4)
    check_tree(first, 1, 4, 6, 64)
    # Equal log-probs: every shallower node outscores every deeper one, so levels fill in order.
    assert torch.bincount(first.depths).tolist() == [1, 4, 16, 43]
    second = build_tree(torch.tensor(1), draft_logprobs.clone(), budget=64, width=4)
    for name in ("tokens", "parents", "depths", "visibility"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    # Ties between paths inside a level go to the better parent: depth-3 nodes hang off the first depth-2 nodes.
    assert first.parents[first.depths == 3].tolist() == sorted(first.parents[first.depths == 3].tolist())


@pytest.mark.parametrize("seed", range(3))
def test_many_ties_still_give_the_best_scores(seed: int) -> None:
    # Log-probs on a coarse grid: sums are exact and paths tie often, so only the tie order keeps the
    # per-depth beam exact. Any tie-break is fine; the multiset of chosen scores is not negotiable.
    generator = torch.Generator().manual_seed(seed)
    draft_logprobs = -torch.randint(0, 6, (8, VOCAB), generator=generator).double() / 4
    for budget, width in ((8, 2), (40, 3), (100, 4), (256, 8)):
        tree = build_tree(torch.tensor(2), draft_logprobs, budget, width)
        check_tree(tree, 2, width, 8, tree_size(budget, width, 8))
        scores = sorted(path_score(draft_logprobs, path) for path in token_paths(tree))
        assert scores == sorted(heap_best_first(draft_logprobs, budget, width, 8).values())


def test_logits_instead_of_logprobs_still_give_a_valid_tree() -> None:
    logits = 5.0 * torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(9)).abs()
    check_tree(build_tree(torch.tensor(0), logits, budget=40, width=3), 0, 3, 6, 40)


def test_bad_arguments_raise() -> None:
    draft_logprobs = random_logprobs(0, rows=3, vocab=5)
    with pytest.raises(ValueError, match="width"):
        build_tree(torch.tensor(0), draft_logprobs, budget=8, width=6)
    with pytest.raises(ValueError, match="anchor"):
        build_tree(torch.tensor([0]), draft_logprobs, budget=8, width=2)
    with pytest.raises(ValueError, match="budget"):
        build_tree(torch.tensor(0), draft_logprobs, budget=0, width=2)


def walk(tree: DraftTree, target_tokens: torch.Tensor) -> list[int]:
    """The acceptance walk done the obvious way, one node at a time."""
    tokens, parents, targets = tree.tokens.tolist(), tree.parents.tolist(), target_tokens.tolist()
    path = [0]
    while True:
        child = [i for i in range(len(tokens)) if parents[i] == path[-1] and tokens[i] == targets[path[-1]]]
        if not child:
            return path
        path.append(child[0])


@pytest.mark.parametrize("seed", range(4))
def test_accept_follows_the_chosen_path(seed: int) -> None:
    rng = random.Random(seed)
    for trial in range(25):
        budget, width = rng.choice([2, 8, 33, 64, 256]), rng.choice([1, 2, 4, 8])
        tree = build_tree(torch.tensor(7), random_logprobs(100 * seed + trial), budget, width)
        num_nodes = tree.tokens.numel()
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        end = rng.randrange(num_nodes)
        path = sorted(ancestors_or_self(parents, end))
        target_tokens = torch.randint(0, VOCAB, (num_nodes,), generator=torch.Generator().manual_seed(trial))
        for node, child in zip(path, path[1:]):
            target_tokens[node] = tokens[child]
        children_tokens = {tokens[i] for i in range(num_nodes) if parents[i] == end}
        target_tokens[end] = rng.choice(sorted(set(range(VOCAB)) - children_tokens))
        path_nodes, accept_count = accept(tree, target_tokens)
        assert path_nodes.dtype == accept_count.dtype == torch.int64 and accept_count.dim() == 0
        assert accept_count.item() == len(path)
        assert path_nodes.tolist() == path + [end] * (num_nodes - len(path))  # padded with the last node
        assert path_nodes.tolist()[:len(path)] == walk(tree, target_tokens)


@pytest.mark.parametrize("seed", range(3))
def test_accept_matches_walk_on_random_targets(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for trial in range(20):
        tree = build_tree(torch.tensor(7), random_logprobs(1000 + 20 * seed + trial), 64, 4)
        num_nodes = tree.tokens.numel()
        # Mostly a random child's token, so walks get deep; otherwise a random token.
        child = torch.randint(1, num_nodes, (num_nodes,), generator=generator)
        target_tokens = torch.where(torch.rand(num_nodes, generator=generator) < 0.8, tree.tokens[child],
                                    torch.randint(0, VOCAB, (num_nodes,), generator=generator))
        path = walk(tree, target_tokens)
        path_nodes, accept_count = accept(tree, target_tokens)
        assert accept_count.item() == len(path) and path_nodes.tolist()[:len(path)] == path


def test_accept_stops_at_the_root() -> None:
    tree = build_tree(torch.tensor(7), random_logprobs(3), budget=16, width=4)
    root_children = set(tree.tokens[tree.parents == 0].tolist())
    target_tokens = tree.tokens.clone()
    target_tokens[0] = min(set(range(VOCAB)) - root_children)
    path_nodes, accept_count = accept(tree, target_tokens)
    assert accept_count.item() == 1 and path_nodes.tolist() == [0] * 16


def test_build_and_accept_need_no_tensor_data() -> None:
    # On the meta device tensors have shapes but no values: any host read (.item(), .tolist(), nonzero,
    # boolean-mask indexing) raises, so passing here means a round can run inside a CUDA graph.
    draft_logprobs = random_logprobs(0).to("meta")
    tree = build_tree(torch.tensor(5, device="meta"), draft_logprobs, budget=100, width=4)
    assert tree.tokens.shape == tree.parents.shape == tree.depths.shape == (100,)
    assert tree.visibility.shape == (100, 4)
    path_nodes, accept_count = accept(tree, torch.zeros(100, dtype=torch.int64, device="meta"))
    assert path_nodes.shape == (100,) and accept_count.shape == ()


def test_tree_bucket() -> None:
    assert [tree_bucket(n) for n in (1, 2, 3, 8, 9, 50, 64, 65, 512)] == [1, 2, 4, 8, 16, 64, 64, 128, 512]
    assert TREE_BUCKETS[-1] == 512
    with pytest.raises(ValueError, match="largest bucket"):
        tree_bucket(513)


@pytest.mark.parametrize("seed", range(3))
def test_padding_nodes_are_never_accepted(seed: int) -> None:
    """A padded tree accepts exactly what the tree accepts, even when the target's choice after the anchor is
    token 0 (what padding rows embed) or the choice after a padding node is a real child's token."""
    generator = torch.Generator().manual_seed(seed)
    for budget in (3, 9, 50):
        tree = build_tree(torch.tensor(7), random_logprobs(seed * 10 + budget), budget, 4)
        num_nodes, size = tree.tokens.numel(), tree_bucket(tree.tokens.numel()) * 2
        padded = pad_tree(tree, size)
        assert padded.tokens[num_nodes:].eq(-1).all() and padded.parents[num_nodes:].eq(0).all()
        visible = unpack_visibility(padded.visibility, size)
        assert torch.equal(visible[:num_nodes, :num_nodes], unpack_visibility(tree.visibility, num_nodes))
        assert torch.equal(visible[num_nodes:], torch.eye(size, dtype=torch.bool)[num_nodes:])  # self edge only
        for trial in range(10):
            child = torch.randint(1, num_nodes, (size,), generator=generator)
            target_tokens = torch.where(torch.rand(size) < 0.8, tree.tokens[child] if num_nodes > 1 else 0,
                                        torch.randint(0, VOCAB, (size,), generator=generator))
            if trial == 0:
                target_tokens[0] = 0
            path, count = accept(tree, target_tokens[:num_nodes])
            padded_path, padded_count = accept(padded, target_tokens)
            assert padded_count == count and padded_path[:count].tolist() == path[:count].tolist()
            assert padded_path.max() < num_nodes
    with pytest.raises(ValueError, match="cannot pad"):
        pad_tree(tree, num_nodes - 1)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 40])
def test_ancestor_masks_reach_the_root_at_every_depth(depth: int) -> None:
    """The masks come from repeated squaring (ceil(log2 depth) products): a chain as deep as the depth limit, and a
    bushy tree, see every ancestor and nothing else right at and around the powers of two."""
    draft_logprobs = random_logprobs(depth, rows=depth)
    check_tree(chain_tree(torch.tensor(3), draft_logprobs, depth=depth), 3, 1, depth, depth + 1)
    bushy = build_tree(torch.tensor(3), draft_logprobs, budget=3 * depth + 1, width=3)
    check_tree(bushy, 3, 3, depth, bushy.tokens.numel())


@pytest.mark.parametrize("budget", [1, 3, 8, 50])
def test_a_tree_built_padded_equals_the_tree_padded(budget: int) -> None:
    """The round builds its tree padded to the bucket in one go (`pad_to`); it is `pad_tree` of the plain tree."""
    draft_logprobs = random_logprobs(budget, rows=7)
    top = draft_logprobs.topk(4, dim=-1)
    tree = tree_from_candidates(torch.tensor(5), top.values, top.indices, budget)
    size = tree_bucket(tree.tokens.numel()) * 2
    built = tree_from_candidates(torch.tensor(5), top.values, top.indices, budget, pad_to=size)
    padded = pad_tree(tree, size)
    for name in ("tokens", "parents", "depths", "visibility"):
        assert torch.equal(getattr(built, name), getattr(padded, name)), name
