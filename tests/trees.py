"""Draft trees built from whole draft rows (`[B-1, V]` log-probs), as tests build them; the round builds them
from each row's top-`width` candidates (nanojet/engine/tree.py `tree_from_candidates`)."""
import torch

from nanojet.engine.tree import DraftTree, tree_from_candidates


def build_tree(anchor: torch.Tensor, draft_logprobs: torch.Tensor, budget: int, width: int,
               depth: int | None = None) -> DraftTree:
    """`tree_from_candidates` from whole draft rows: the round's tree as a test builds it from log-probs.

    `draft_logprobs` `[B-1, V]` (row d-1 = depth d); ties between tokens of one row are left to `torch.topk`.
    """
    if draft_logprobs.dim() != 2:
        raise ValueError(f"tree: draft_logprobs must be [depths, vocab], got shape {tuple(draft_logprobs.shape)}")
    if width > draft_logprobs.shape[1]:
        raise ValueError(f"tree: width {width} exceeds the draft vocabulary ({draft_logprobs.shape[1]} tokens)")
    if width < 1:
        raise ValueError(f"tree: need width >= 1, got {width}")
    return tree_from_candidates(anchor, *draft_logprobs.topk(width, dim=-1), budget, depth)


def chain_tree(anchor: torch.Tensor, draft_logprobs: torch.Tensor, depth: int) -> DraftTree:
    """The greedy chain: the anchor and the best token of each of the first `depth` draft rows."""
    return build_tree(anchor, draft_logprobs, budget=depth + 1, width=1, depth=depth)


def tree_mask(parents: list[int]) -> torch.Tensor:
    """Ancestors and self of each node, bool `[n, n]` (parents come before children; parents[0] = -1 is the root)."""
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            mask[node] = mask[parent]
        mask[node, node] = True
    return mask
