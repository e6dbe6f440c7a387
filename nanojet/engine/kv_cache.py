"""Paged KV pool shared by the target's and the draft head's layers, with per-sequence page tables.

Pool layout: `[layers, 2 (k, v), num_pages, kv_page_size, kv_heads, head_dim]`. A sequence's logical slot i
lives at page `page_table[i // kv_page_size]`, offset `i % kv_page_size`. Slots `0 .. length-1` hold committed
K/V; a step's new tokens (a prefill chunk, a decode token, the nodes of a draft tree) take the next slots as
scratch, and the round's commit (`StaticRound.step`) moves what was accepted down to the next committed slots.
"""
import torch


class KVCacheExhausted(RuntimeError):
    """The pool has no free page left."""


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
