"""Draft tree: built on device from the head's per-depth log-probs, its ancestor bit masks, and the acceptance walk.

A tree node is a path of candidate ranks `(r_1 .. r_d)`: the depth-d candidates are the top-`width` tokens of
draft row d-1, shared by every parent at depth d-1, and a node's score is the sum of its ranks' log-probs. Scores
only fall along a path, so the best `budget` nodes form a tree. Everything here is tensor ops with shapes fixed
by Python ints (budget, width, depth, vocabulary): no host sync, so a round can run inside one CUDA graph and the
caller reads back only the accepted count.
"""
from dataclasses import dataclass

import torch

from nanojet.kernels.reference import pack_visibility, unpack_visibility


@dataclass
class DraftTree:
    tokens: torch.Tensor      # [N] int64; node 0 is the anchor
    parents: torch.Tensor     # [N] int64; parents[0] = -1, parents[i] < i
    depths: torch.Tensor      # [N] int64; node at depth d sits at position n-1+d
    visibility: torch.Tensor  # [N, ceil(N/32)] int32; bit j of row i: node j is i or an ancestor of i


def tree_size(budget: int, width: int, depth: int) -> int:
    """Nodes a tree holds: the budget, or the whole width-ary tree of that depth if it is smaller."""
    if budget < 1 or width < 1 or depth < 0:
        raise ValueError(f"tree: need budget >= 1, width >= 1, depth >= 0; got {budget}, {width}, {depth}")
    total, level = 1, 1
    for _ in range(depth):
        if total >= budget:
            break
        level *= width
        total += level
    return min(budget, total)


def tree_from_candidates(anchor: torch.Tensor, top_logprobs: torch.Tensor, top_tokens: torch.Tensor, budget: int,
                         depth: int | None = None, pad_to: int | None = None) -> DraftTree:
    """The `tree_size(budget, width, depth limit)` best nodes by cumulative log-prob, anchor included, from each
    depth's candidates (`top_logprobs`, `top_tokens` `[B-1, width]`, best first; depth limit `min(depth, B-1)`),
    ordered by depth, then score (parents first, siblings distinct); `pad_to`: padded as `pad_tree` pads, in one go.

    Nodes are ranked by score, ties going to the shallower node (so a parent always outranks its children),
    then to the better-ranked parent, then to the better candidate rank. Under this order the result is exact
    with a per-depth beam: a depth-d node in the global best K = budget-1 is among the best K at depth d, and
    its parent among the best K at depth d-1 (each rival that outranks the parent has a child with the same
    candidate rank that outranks the node). So keeping K per depth, then the best K over all depths, loses
    nothing. Scores add up in float64, where sums of a few bf16/fp32 log-probs are exact, so rounding does not
    invent or break ties."""
    if anchor.dim() != 0:
        raise ValueError(f"tree: anchor must be a 0-dim token tensor, got shape {tuple(anchor.shape)}")
    if top_logprobs.dim() != 2 or top_tokens.shape != top_logprobs.shape:
        raise ValueError(f"tree: candidates must be two [depths, width] tensors, got shapes "
                         f"{tuple(top_logprobs.shape)} and {tuple(top_tokens.shape)}")
    rows, width = top_logprobs.shape
    max_depth = rows if depth is None else min(depth, rows)
    num_nodes = tree_size(budget, width, max_depth)  # validates budget, width, depth
    device = top_logprobs.device
    root_token = anchor.reshape(1).to(device=device, dtype=torch.int64)
    keep = budget - 1
    if num_nodes == 1:
        return anchor_tree(root_token) if pad_to is None else pad_tree(anchor_tree(root_token), pad_to)

    top_logprobs, top_tokens = top_logprobs[:max_depth], top_tokens[:max_depth]  # [D, width], best first
    # Log-probs are <= 0, so a child never outscores its parent and the chosen set is closed under parents;
    # the clamp keeps that true (and the tree valid) even if a caller passes unnormalised logits.
    top_logprobs = top_logprobs.double().clamp(max=0.0)

    # Beam per depth, kept in (score desc, parent's place, rank) order; stable sorts carry the tie order along.
    # Each op here runs once per depth on a few dozen numbers, so on the CPU their count is the cost: tokens are
    # looked up once at the end, from (depth, rank).
    level_scores = torch.zeros(1, dtype=torch.float64, device=device)  # the root
    scores, ranks, parents, depths = [], [], [], []
    level_offset, previous_offset = 0, -1  # where this / the previous depth's beam starts in the concatenation
    for d, row in enumerate(top_logprobs.unbind(0), start=1):
        candidates = (level_scores[:, None] + row).flatten()  # [M_{d-1} * width]
        order = candidates.sort(descending=True, stable=True).indices[:keep]  # [M_d]
        level_scores = candidates[order]
        scores.append(level_scores)
        ranks.append(order % width)
        parents.append(order // width + previous_offset)  # depth 1: parent place 0 + offset -1 = -1, the root
        depths.append(torch.full_like(order, d))
        previous_offset, level_offset = level_offset, level_offset + order.numel()
    scores, ranks, parents, depths = (torch.cat(x) for x in (scores, ranks, parents, depths))  # [T]

    # The concatenation is in (depth, score) order, so a stable sort breaks score ties towards shallow nodes,
    # and sorting the chosen positions back restores (depth, score) order: parents come first.
    chosen = scores.sort(descending=True, stable=True).indices[:num_nodes - 1].sort().values  # [N-1]
    new_index = torch.zeros_like(scores, dtype=torch.int64).scatter(
        0, chosen, torch.arange(1, num_nodes, device=device))  # concatenation position -> node index
    chosen_parents = parents[chosen]
    node_parents = torch.where(chosen_parents >= 0, new_index[chosen_parents.clamp(min=0)], 0)
    chosen_depths = depths[chosen]
    return _finish(torch.cat([root_token, top_tokens[chosen_depths - 1, ranks[chosen]]]),
                   torch.cat([torch.full((1,), -1, dtype=torch.int64, device=device), node_parents]),
                   torch.cat([torch.zeros(1, dtype=torch.int64, device=device), chosen_depths]), max_depth, pad_to)


def anchor_tree(anchor: torch.Tensor) -> DraftTree:
    """The one-node tree of plain decoding: the anchor alone, seeing only itself."""
    device = anchor.device
    return DraftTree(tokens=anchor.reshape(1).to(torch.int64),
                     parents=torch.full((1,), -1, dtype=torch.int64, device=device),
                     depths=torch.zeros(1, dtype=torch.int64, device=device),
                     visibility=torch.ones(1, 1, dtype=torch.int32, device=device))


def _finish(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, max_depth: int,
            pad_to: int | None = None) -> DraftTree:
    """Adds the ancestor-or-self masks (`ancestors`), padded as `pad_tree` pads when `pad_to` is given."""
    return packed_tree(tokens, parents, depths, ancestors(parents, max_depth), pad_to)


def packed_tree(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, visible: torch.Tensor,
                pad_to: int | None = None) -> DraftTree:
    """A tree from its fields and its bool `[N, N]` ancestor-or-self mask (packed here), padded as `pad_tree`
    pads when `pad_to` is given."""
    if pad_to is not None:
        tokens, parents, depths, visible = _padded(tokens, parents, depths, visible, pad_to)
    return DraftTree(tokens, parents, depths, pack_visibility(visible))


def ancestors(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """bool `[N, N]`: row i holds node i and its ancestors, for a tree no deeper than `max_depth`.

    `reach` = I + (one-hot of each node's parent) marks what a node reaches in at most one step up (the root's
    parent -1 is clamped to itself). Squaring it reaches twice as far, so after ceil(log2(depth)) squarings every
    ancestor is reached: three small matrix products for a depth of 8 instead of one pass per depth (the op count
    is the cost on the CPU). Clamping to 1 keeps every entry a small exact integer in fp32."""
    num_nodes = parents.numel()
    eye = torch.eye(num_nodes, device=parents.device)
    reach = eye + eye[parents.clamp(min=0)]
    for _ in range(max(0, max_depth - 1).bit_length()):
        reach = (reach @ reach).clamp(max=1.0)
    return reach > 0


TREE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # verify shapes a compiled engine is built for


def tree_bucket(num_nodes: int) -> int:
    """The smallest bucket that holds `num_nodes` nodes."""
    for bucket in TREE_BUCKETS:
        if num_nodes <= bucket:
            return bucket
    raise ValueError(f"tree: {num_nodes} nodes exceed the largest bucket ({TREE_BUCKETS[-1]}); lower the budget")


def pad_tree(tree: DraftTree, size: int) -> DraftTree:
    """Append `size - N` padding nodes so the verify forward has a fixed shape. A padding node carries token -1,
    which no target choice equals, so `accept` never takes it (and nothing hangs below it); it hangs under the
    anchor at depth 1 and sees only itself, because a row with no visible new token is not a tree row.
    The verify forward embeds `tokens.clamp(min=0)`; padding rows' outputs are never read."""
    num_nodes = tree.tokens.numel()
    if size < num_nodes:
        raise ValueError(f"tree: cannot pad {num_nodes} nodes to {size}")
    if size == num_nodes:
        return tree
    tokens, parents, depths, visible = _padded(tree.tokens, tree.parents, tree.depths,
                                               unpack_visibility(tree.visibility, num_nodes), size)
    return DraftTree(tokens, parents, depths, pack_visibility(visible))


def _padded(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, visible: torch.Tensor,
            size: int) -> tuple:
    """`pad_tree` on a tree's fields and its bool `[N, N]` mask: real rows unchanged, each padding row sees only
    itself. Built out of place, so the round can vmap it."""
    extra = size - tokens.numel()
    if extra == 0:
        return tokens, parents, depths, visible
    pad = torch.nn.functional.pad
    eye = torch.eye(size, dtype=torch.bool, device=visible.device)
    return (pad(tokens, (0, extra), value=-1), pad(parents, (0, extra)), pad(depths, (0, extra), value=1),
            pad(visible, (0, extra, 0, extra)) | eye)


def accept(tree: DraftTree, target_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk from the root while a child carries the token the target chose after its parent.

    `target_tokens` `[N]`: the target's token after each node. Returns `(path_nodes [N], accept_count [])`,
    int64: the accepted nodes in depth order starting with 0, then padded with the last accepted node, so every
    entry is a valid node index (static-shape gathers and K/V moves into the discarded scratch need no mask).
    The bonus token is `target_tokens[path_nodes[-1]]`.

    The recursion accepted[i] = accepted[parent] & (tokens[i] == target_tokens[parent]) unrolls to "every
    ancestor-or-self matches", which the visibility mask answers in one step without knowing the tree's depth.
    Siblings are distinct, so the accepted set is one path, and along it node indices increase.
    """
    num_nodes = tree.tokens.numel()
    node_index = torch.arange(num_nodes, device=tree.tokens.device)
    # The anchor is committed already, so node 0 always matches. Written as an op, not `matches[0] = True`: on a
    # GPU that assignment copies a host scalar to the device, which a CUDA graph cannot capture.
    matches = (tree.tokens == target_tokens[tree.parents.clamp(min=0)]) | (node_index == 0)
    ancestors = unpack_visibility(tree.visibility, num_nodes)  # [N, N]
    accepted = (matches[None, :] | ~ancestors).all(dim=-1)  # [N]
    last = torch.where(accepted, node_index, 0).max()
    path_nodes = torch.minimum(torch.where(accepted, node_index, num_nodes).sort().values, last)
    return path_nodes, accepted.sum()


def round_outcome(tree: DraftTree, target_tokens: torch.Tensor, path_nodes: torch.Tensor,
                  accept_count: torch.Tensor) -> torch.Tensor:
    """What the host needs from a round, as one int64 tensor (one transfer): `[count, tree tokens along the path
    (P), target tokens along it (P)]`, P = len(path_nodes) (the path as `accept` pads it, possibly cut)."""
    return torch.cat([accept_count[None], tree.tokens[path_nodes], target_tokens[path_nodes]])


def read_outcome(outcome: list[int]) -> tuple[int, list[int]]:
    """`round_outcome` read back -> (accepted count, emitted tokens: the accepted drafts past the anchor, then the
    bonus, the target's token after the last accepted node)."""
    path_len, count = (len(outcome) - 1) // 2, outcome[0]
    return count, outcome[2:1 + count] + [outcome[path_len + count]]
