"""What the attention of one paged forward needs to know (`AttentionMetadata`): prefill, decode, tree verify and
the draft head's block all describe their new tokens this way, and every attention layer of the forward reads it."""
from dataclasses import dataclass, replace

import torch

from nanojet import kernels


@dataclass
class AttentionMetadata:
    """Everything attention needs to know about one forward step (S sequences, T new tokens)."""
    positions: torch.Tensor     # [T] int64 RoPE positions
    slot_mapping: torch.Tensor  # [T] int64 flat pool slot of each new token's K/V (-1: padding)
    block_tables: torch.Tensor  # [S, max_pages] int32 page table of each sequence
    prefix_lens: torch.Tensor   # [S] int32 keys before the step's new tokens, visible to all of them
    query_starts: torch.Tensor  # [S + 1] int32 cumulative new-token counts
    visibility: torch.Tensor    # [T, ceil(max_new / 32)] int32 bit mask over the same sequence's new tokens
    plan: object = None         # what every layer derives alike from the above, built once per forward on the
                                # reference path (`planned`; kernels/reference.py ForwardPlan); None elsewhere

    def planned(self, inv_freq: torch.Tensor, page_size: int, num_q_heads: int) -> "AttentionMetadata":
        """These metadata with the forward's plan, when its kernels run the reference eagerly (`kernels.plan_forward`).
        Under torch.compile each tensor is computed once for all layers (`kernels.materialized`)."""
        if torch.compiler.is_compiling():
            fields = ("positions", "slot_mapping", "prefix_lens", "query_starts", "visibility")
            self = replace(self, **dict(zip(fields, kernels.materialized(*(getattr(self, f) for f in fields)))))
        plan = kernels.plan_forward(self.positions, inv_freq, self.slot_mapping, self.block_tables, self.prefix_lens,
                                    self.query_starts, self.visibility, page_size, num_q_heads)
        return self if plan is None else replace(self, plan=plan)
