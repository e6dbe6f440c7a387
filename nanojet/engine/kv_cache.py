"""Paged KV pool shared by the target's and the draft head's layers, with per-sequence page tables.

Pool layout: `[layers, 2 (k, v), num_pages, kv_page_size, kv_heads, head_dim]`. A sequence's logical slot i
lives at page `page_table[i // kv_page_size]`, offset `i % kv_page_size`. Slots `0 .. length-1` hold committed
K/V; a step's new tokens (a prefill chunk, a decode token, the nodes of a draft tree) take the next slots as
scratch, and the round's commit (`StaticRound.step`) moves what was accepted down to the next committed slots.
"""
from dataclasses import dataclass, replace

import torch

from nanojet import kernels
from nanojet.kernels.reference import pack_visibility


class KVCacheExhausted(RuntimeError):
    """The pool has no free page left."""


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
        """These metadata with the forward's plan, when its kernels run the reference eagerly (`kernels.plan_forward`)."""
        plan = kernels.plan_forward(self.positions, inv_freq, self.slot_mapping, self.block_tables, self.prefix_lens,
                                    self.query_starts, self.visibility, page_size, num_q_heads)
        return self if plan is None else replace(self, plan=plan)


class Sequence:
    """One sequence's page table and committed length (slots 0 .. length-1 hold valid K/V)."""

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.length = 0


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                 kv_page_size: int, max_pages_per_sequence: int, dtype: torch.dtype, device: torch.device):
        self.kv_page_size = kv_page_size
        self.max_pages_per_sequence = max_pages_per_sequence
        self.pool = torch.zeros(num_layers, 2, num_pages, kv_page_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)
        self.free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first

    @property
    def num_pages(self) -> int:
        return self.pool.shape[2]

    def reserve(self, sequence: Sequence, num_slots: int) -> None:
        """Make sure slots `0 .. num_slots-1` of the sequence have pages."""
        needed = -(-num_slots // self.kv_page_size)
        if needed > self.max_pages_per_sequence:
            raise KVCacheExhausted(f"a sequence needs {num_slots} KV slots but at most "
                                   f"{self.max_pages_per_sequence * self.kv_page_size} fit its page table; "
                                   f"raise max_model_len or shorten the prompt")
        missing = needed - len(sequence.pages)
        if missing > len(self.free_pages):
            raise KVCacheExhausted(f"KV cache exhausted: {missing} more pages needed, {len(self.free_pages)} free "
                                   f"of {self.num_pages}; raise --kv-memory-gb or shorten the generation")
        for _ in range(missing):
            sequence.pages.append(self.free_pages.pop())

    def trim(self, sequence: Sequence, num_slots: int) -> None:
        """Return the pages wholly beyond slot `num_slots` to the free list."""
        keep = -(-num_slots // self.kv_page_size)
        while len(sequence.pages) > keep:
            self.free_pages.append(sequence.pages.pop())

    def free(self, sequence: Sequence) -> None:
        self.trim(sequence, 0)
        sequence.length = 0

    def slots(self, sequence: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat pool slots `[end - start]` of logical slots `start .. end-1` (pages must be reserved)."""
        logical = torch.arange(start, end)
        pages = torch.tensor(sequence.pages, dtype=torch.int64)[logical // self.kv_page_size]
        return (pages * self.kv_page_size + logical % self.kv_page_size).to(self.pool.device)

    def block_table(self, sequence: Sequence) -> torch.Tensor:
        """`[max_pages_per_sequence]` int32, padded with page 0 (never read past the sequence's keys)."""
        table = torch.zeros(self.max_pages_per_sequence, dtype=torch.int32)
        table[:len(sequence.pages)] = torch.tensor(sequence.pages, dtype=torch.int32)
        return table

    def step_metadata(self, sequences: list[Sequence], positions: list[torch.Tensor],
                      visibility: list[torch.Tensor], packed: bool = False) -> AttentionMetadata:
        """Metadata built on the host for a step that appends `len(positions[s])` new tokens after each sequence's
        length (several sequences in one forward; the rounds use persistent buffers instead, see static_round.py).

        `visibility[s]` is the bool `[n_s, n_s]` mask among sequence s's new tokens (causal chain, tree
        ancestors, or all ones), or its bit words when `packed`. Pages for the new slots are reserved here."""
        device = self.pool.device
        counts = [len(p) for p in positions]
        for sequence, count in zip(sequences, counts):
            self.reserve(sequence, sequence.length + count)
        if not packed:
            visibility = [pack_visibility(v.to(device)) for v in visibility]
        words = max(v.shape[1] for v in visibility)
        padded = [torch.nn.functional.pad(v, (0, words - v.shape[1])) for v in visibility]
        return AttentionMetadata(
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat([self.slots(s, s.length, s.length + c) for s, c in zip(sequences, counts)]),
            block_tables=torch.stack([self.block_table(s) for s in sequences]).to(device),
            prefix_lens=torch.tensor([s.length for s in sequences], dtype=torch.int32, device=device),
            query_starts=torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(device),
            visibility=torch.cat(padded).to(device),
        )
