"""Draft trees from the candidate table: the same best nodes as the beam search and a heap best-first search, valid
trees under ties, padding, vmap, and which rounds use it."""
import pytest
import torch
from test_tree import (
    VOCAB,
    check_tree,
    heap_best_first,
    path_score,
    random_logprobs,
    token_paths,
)

from nanojet.engine.candidates import CANDIDATE_LIMIT, candidate_table, tree_from_table
from nanojet.engine.tree import pad_tree, tree_from_candidates, tree_size

DEPTH = 7  # the shipped head's: block size 8


def candidates(draft_logprobs: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return draft_logprobs.topk(width, dim=-1)


@pytest.mark.parametrize("seed", range(4))
def test_same_nodes_as_the_beam_search_and_the_heap(seed: int) -> None:
    draft_logprobs = random_logprobs(seed, rows=DEPTH)
    for width in (1, 2, 4, 8):
        top = candidates(draft_logprobs, width)
        for budget in (2, 3, 5, 8, 16, 40, 64):
            for depth in (1, 3, DEPTH):
                table = candidate_table(budget, width, depth)
                if table is None:
                    continue
                tree = tree_from_table(torch.tensor(7), *top, table)
                num_nodes = tree_size(budget, width, depth)
                check_tree(tree, 7, width, depth, num_nodes)
                beam = tree_from_candidates(torch.tensor(7), *top, budget, depth)
                assert set(token_paths(tree)) == set(token_paths(beam)), (budget, width, depth)
                assert set(token_paths(tree)) == set(heap_best_first(draft_logprobs, budget, width, depth))


def test_table_sizes_and_the_limit() -> None:
    # The counts the module docstring quotes, and the fallback to the beam search past the limit.
    sizes = {budget: candidate_table(budget, 4, DEPTH).token_index.numel() - 1 for budget in (8, 16, 64)}
    assert sizes == {8: 32, 16: 163, 64: 1854}
    assert candidate_table(256, 4, DEPTH, limit=7969) is None  # 7,970 candidates
    assert candidate_table(256, 4, DEPTH, limit=7970) is not None
    assert candidate_table(256, 8, 15) is None  # 883,781: the beam search
    assert candidate_table(1, 4, DEPTH) is None  # the anchor alone needs no table
    assert candidate_table(256, 4, DEPTH).token_index.numel() - 1 <= CANDIDATE_LIMIT


def test_every_chosen_node_is_in_the_table() -> None:
    # A too-small table would silently miss nodes: with log-probs that make one deep, narrow path the best,
    # the table must still hold it (every node of the heap's choice has its rank path in the table).
    draft_logprobs = torch.full((DEPTH, VOCAB), -20.0)
    draft_logprobs[:, 0] = 0.0  # rank 0 at every depth is certain: the best 7 nodes are the chain
    draft_logprobs[:, 1] = -1.0 + 0.01 * torch.arange(DEPTH)  # runner-up: best at the deepest depth
    # Budget 9: the 8th node is the deepest runner-up, at the edge of the table (7 dominated paths + itself).
    for budget, expected_depths in ((8, [0, 1, 2, 3, 4, 5, 6, 7]), (9, [0, 1, 2, 3, 4, 5, 6, 7, 7])):
        tree = tree_from_table(torch.tensor(3), *candidates(draft_logprobs, 4), candidate_table(budget, 4, DEPTH))
        assert tree.depths.tolist() == expected_depths
        assert set(token_paths(tree)) == set(heap_best_first(draft_logprobs, budget, 4, DEPTH))


@pytest.mark.parametrize("seed", range(3))
def test_many_ties_still_give_a_valid_tree_of_the_best_scores(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    draft_logprobs = -torch.randint(0, 4, (DEPTH, VOCAB), generator=generator).double() / 4
    for budget, width in ((8, 2), (16, 4), (40, 3), (64, 4)):
        table = candidate_table(budget, width, DEPTH)
        tree = tree_from_table(torch.tensor(2), *candidates(draft_logprobs, width), table)
        check_tree(tree, 2, width, DEPTH, tree_size(budget, width, DEPTH))
        scores = sorted(path_score(draft_logprobs, path) for path in token_paths(tree))
        assert scores == sorted(heap_best_first(draft_logprobs, budget, width, DEPTH).values())


def test_equal_logprobs_and_certain_drafts() -> None:
    # All equal: levels fill in order. Log-prob 0 (a certain draft) ties a child with its parent: the parent
    # still comes first, so the tree stays closed under parents.
    equal = torch.full((DEPTH, VOCAB), -3.0)
    tree = tree_from_table(torch.tensor(1), *candidates(equal, 4), candidate_table(64, 4, DEPTH))
    check_tree(tree, 1, 4, DEPTH, 64)
    assert torch.bincount(tree.depths).tolist() == [1, 4, 16, 43]
    certain = torch.zeros(DEPTH, VOCAB)
    tree = tree_from_table(torch.tensor(1), *candidates(certain, 2), candidate_table(16, 2, DEPTH))
    check_tree(tree, 1, 2, DEPTH, 16)
    assert torch.bincount(tree.depths).tolist() == [1, 2, 4, 8, 1]


def test_unnormalised_logits_still_give_a_valid_tree() -> None:
    logits = 5.0 * torch.randn(DEPTH, VOCAB, generator=torch.Generator().manual_seed(9)).abs()
    tree = tree_from_table(torch.tensor(0), *candidates(logits, 3), candidate_table(40, 3, DEPTH))
    check_tree(tree, 0, 3, DEPTH, 40)


def test_padded_and_vmapped_trees() -> None:
    table = candidate_table(12, 4, DEPTH)
    rows = [candidates(random_logprobs(seed, rows=DEPTH), 4) for seed in range(3)]
    anchors = torch.tensor([4, 5, 6])
    singles = [tree_from_table(anchors[i], *rows[i], table) for i in range(3)]
    for i, tree in enumerate(singles):
        padded = tree_from_table(anchors[i], *rows[i], table, pad_to=16)
        expected = pad_tree(tree, 16)
        for name in ("tokens", "parents", "depths", "visibility"):
            assert torch.equal(getattr(padded, name), getattr(expected, name)), name
    logprobs, tokens = (torch.stack(parts) for parts in zip(*rows))
    batched = torch.vmap(lambda a, lp, tk: tuple(vars(tree_from_table(a, lp, tk, table)).values()))(
        anchors, logprobs, tokens)
    for i, tree in enumerate(singles):
        assert all(torch.equal(part[i], field) for part, field in zip(batched, vars(tree).values()))


def test_rounds_use_the_table_only_where_it_is_small(hf_model_dir) -> None:
    from conftest import make_engine, random_head

    from nanojet.engine.request import SpeculativeParams
    from nanojet.engine.round import StaticRound
    from nanojet.model.config import ModelConfig
    directory, _ = hf_model_dir
    engine = make_engine(directory, page_size=4, head=random_head(ModelConfig.from_dir(directory), seed=2))
    for budget, width, uses_table in ((8, 4, True), (64, 4, True), (256, 8, False), (1, 4, False)):
        spec = SpeculativeParams(budget=budget, width=width)
        round_ = StaticRound(engine.target, engine.head, engine.kv, spec, sampled=False)
        assert (round_.tree_table is not None) == uses_table, budget
