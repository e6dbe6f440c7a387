"""Small draft trees from a table of every node that could be chosen: one sort per round instead of a beam search.

A node is a path of candidate ranks `(r_1 .. r_d)` (nanojet/engine/tree.py). Every path it dominates rank by rank (no
longer, and no rank larger: `(s_1 .. s_k)`, k <= d, s_i <= r_i) scores at least as much and comes first in the tie
order below, so if the node is among the best `budget - 1`, all of them are: there are
`sum over k of (r_1 + 1) .. (r_k + 1)` of them, itself included, and that must not exceed `budget - 1`. At small
budgets few rank paths pass that test (32 at budget 8, width 4, depth 7; 163 at 16; 1,854 at 64), so
`candidate_table` lists them once, when a round is built, and each round scores the list with one gather and a
sum, sorts it once and keeps the best. On the CPU the op count is the cost of a small tree: a budget-8 round's tree
takes 45 ops this way against 132 for the beam search of `tree_from_candidates` (about 10 per depth).

Tie order: score, then depth (shallower first), then the rank path read left to right. It keeps the choice closed
under parents (every node that a chosen node needs comes before it), so the tree is always valid and the
chosen scores are always the best ones. It differs from the beam search's order only between equal scores of one
depth under different parents, where both trees are equally good; a round always uses the same builder.
"""
from dataclasses import dataclass

import torch

from nanojet.engine.tree import DraftTree, packed_tree, tree_size

# Past this many candidates the table is no longer cheaper than the beam search (timings: docs/round-cost.md).
CANDIDATE_LIMIT = 8192


@dataclass
class CandidateTable:
    """Candidates `0 .. M-1` in (depth, rank path) order; index M stands for the anchor (the root)."""
    num_nodes: int             # N: nodes of every tree built from the table, anchor included
    max_depth: int             # D: draft rows read
    score_index: torch.Tensor  # [M, D] int64: a candidate's (depth, rank) entries of the flattened log-probs
                               # `[D * width]`, padded with D * width (a 0 appended after them)
    token_index: torch.Tensor  # [M + 1] int64: its entry of the flattened top tokens; the root's is the anchor,
                               # appended at D * width
    depths: torch.Tensor       # [M + 1] int64, the root's 0
    parents: torch.Tensor      # [M + 1] int64: the parent's candidate index (M: the root); the root's is M + 1
    lineage: torch.Tensor      # [M + 1, D + 1] int64: the candidate's ancestors-or-self, root included, padded
                               # with -1
    root: torch.Tensor         # [1] int64: M
    node_numbers: torch.Tensor # [N] int64: 0 .. N-1
    unchosen: torch.Tensor     # [M + 2] int64 of -1: what a candidate maps to when it is not a node


def candidate_table(budget: int, width: int, depth: int, device: torch.device | str | None = None,
                    limit: int = CANDIDATE_LIMIT) -> CandidateTable | None:
    """The table of `tree_size(budget, width, depth)`-node trees, or None when it would hold more than `limit`
    candidates (or the tree is the anchor alone): build those with `tree_from_candidates`."""
    num_nodes = tree_size(budget, width, depth)
    keep = num_nodes - 1
    if keep == 0:
        return None
    # (path, paths it dominates, product of its ranks + 1); a child passes only if its parent did.
    paths, level = [], [((), 0, 1)]
    for _ in range(depth):
        # Children of every candidate of the previous depth, parents in order and ranks ascending: rank-path order.
        level = [(path + (rank,), dominated + product * (rank + 1), product * (rank + 1))
                 for path, dominated, product in level for rank in range(width)
                 if dominated + product * (rank + 1) <= keep]
        paths += [path for path, _, _ in level]
        if len(paths) > limit:
            return None
    index = {path: i for i, path in enumerate(paths)}
    root = len(paths)
    index[()] = root
    pad = depth * width

    def lineage(path):
        return [index[path[:j]] for j in range(len(path), -1, -1)] + [-1] * (depth - len(path))
    tensors = dict(
        score_index=[[j * width + rank for j, rank in enumerate(path)] + [pad] * (depth - len(path))
                     for path in paths],
        token_index=[(len(path) - 1) * width + path[-1] for path in paths] + [pad],
        depths=[len(path) for path in paths] + [0],
        parents=[index[path[:-1]] for path in paths] + [root + 1],
        lineage=[lineage(path) for path in paths] + [lineage(())],
        root=[root],
        node_numbers=list(range(num_nodes)),
        unchosen=[-1] * (root + 2))
    return CandidateTable(num_nodes=num_nodes, max_depth=depth,
                          **{name: torch.tensor(values, dtype=torch.int64, device=device)
                             for name, values in tensors.items()})


def tree_from_table(anchor: torch.Tensor, top_logprobs: torch.Tensor, top_tokens: torch.Tensor,
                    table: CandidateTable, pad_to: int | None = None) -> DraftTree:
    """The best `table.num_nodes`-node tree from each depth's candidates (`top_logprobs`, `top_tokens`
    `[rows >= D, width]`, best first, as `tree_from_candidates` takes them), nodes in (depth, rank path) order:
    parents first. `pad_to`: padded as `pad_tree` pads."""
    depth, num_nodes = table.max_depth, table.num_nodes
    # Log-probs are <= 0 (the clamp keeps that true for unnormalised logits), so no node outscores its parent.
    # Sums in float64 of a few fp32 values are exact, and rounding is monotone anyway, so that holds for the sums.
    logprobs = torch.nn.functional.pad(top_logprobs[:depth].double().clamp(max=0.0).flatten(), (0, 1))
    scores = logprobs[table.score_index].sum(-1)  # [M]
    # Candidates are in (depth, rank path) order, so a stable sort breaks score ties in the tie order; sorting the
    # chosen indices back puts nodes in (depth, rank path) order.
    chosen = scores.sort(descending=True, stable=True).indices[:num_nodes - 1].sort().values  # [N-1]
    nodes = torch.cat([table.root, chosen])  # [N], the root first
    node_of = table.unchosen.scatter(0, nodes, table.node_numbers)  # candidate -> node index (M + 1 -> -1)
    tokens = torch.cat([top_tokens[:depth].flatten(), anchor.reshape(1).to(top_tokens)])[table.token_index[nodes]]
    visible = (table.lineage[nodes][:, :, None] == nodes).any(1)  # [N, N]: node j is an ancestor-or-self of i
    return packed_tree(tokens, node_of[table.parents[nodes]], table.depths[nodes], visible, pad_to)
