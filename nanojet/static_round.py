"""The speculative round with static shapes over persistent buffers: what torch.compile and CUDA graphs need.

Every shape in `StaticRound.step` is fixed by Python ints chosen when it is built (the tree bucket, the head's
block, the sampling mode); what changes from round to round lives in persistent device tensors:

    anchor       []             int64  the last emitted token (its K/V is not written yet)
    length       []             int64  committed K/V slots, which is also the anchor's position
    block_table  [1, max_pages] int32  the sequence's pages, full width; the host writes new ones between rounds
    seed         []             int64  the sampling seed (a tensor, so one graph serves every seed)

`step` runs draft -> tree -> verify -> accept -> commit on them, advances `anchor` and `length` in place and
returns one small tensor for the round's single host read (`tree.round_outcome`, with P = the longest path the
tree allows). Commit always moves P rows (identity moves past the accepted count), so
the pool is touched the same way every round. Pages stay on the host: `table` reserves scratch for the tree and
the draft block before a step, `finish` trims what the round did not keep after it.
"""
import torch

import kernels
from kernels.reference import pack_visibility
from .kv_cache import AttentionMetadata, KVCache, Sequence
from .sampling import SamplingParams, sample
from .tree import DraftTree, accept, anchor_tree, build_tree, pad_tree, round_outcome, tree_bucket, tree_size


class StaticRound:
    def __init__(self, target, head, kv: KVCache, spec, params: SamplingParams):
        """`spec` None: plain decoding (a one-node tree, no head)."""
        self.target, self.head, self.kv, self.spec, self.params = target, head, kv, spec, params
        self.num_target_layers = target.config.num_hidden_layers
        device = kv.pool.device
        if spec is None:
            depth, nodes, block_size = 0, 1, 0
        else:
            block_size = head.config.block_size
            depth = block_size - 1 if spec.depth is None else min(spec.depth, block_size - 1)
            nodes = tree_size(spec.budget, spec.width, depth)
            self.block_visibility = pack_visibility(head.block_visibility(device))
            self.mask_block = torch.full((block_size,), head.config.mask_token_id, device=device)
        self.depth = depth
        self.bucket = tree_bucket(nodes)
        self.path_len = min(depth + 1, nodes)  # the most nodes an accepted path can hold
        self.scratch_slots = max(self.bucket, block_size)  # slots past the committed ones a round writes
        self.taps = tuple(head.config.target_layer_ids) if spec is not None else ()
        # Constants are built here, not in `step`: a host-to-device copy cannot be captured in a CUDA graph.
        self.query_starts = {count: torch.tensor([0, count], dtype=torch.int32, device=device)
                             for count in (self.bucket, block_size)}
        self.anchor = torch.zeros((), dtype=torch.int64, device=device)
        self.length = torch.zeros((), dtype=torch.int64, device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.block_table = torch.zeros(1, kv.max_pages_per_sequence, dtype=torch.int32, device=device)
        # Staging for new page ids: pinned, so the copy to the device is truly asynchronous (never a host sync).
        self._host_pages = torch.zeros(kv.max_pages_per_sequence, dtype=torch.int32,
                                       pin_memory=device.type == "cuda")
        self._pages_written = 0

    # --- host side, between rounds ------------------------------------------------------------------------

    def begin(self, sequence: Sequence, anchor: int, seed: int) -> None:
        """Point the buffers at a sequence whose KV holds `sequence.length` slots and whose anchor is `anchor`."""
        self.anchor.fill_(anchor)
        self.length.fill_(sequence.length)
        self.seed.fill_(seed)
        self._pages_written = 0

    def table(self, sequence: Sequence) -> torch.Tensor:
        """Reserve the round's scratch and write new pages into the persistent block table; returns the table."""
        self.kv.reserve(sequence, sequence.length + self.scratch_slots)
        pages = len(sequence.pages)
        if pages > self._pages_written:
            # Entries being written were not in flight: every earlier copy finished before the last host read.
            staged = self._host_pages[self._pages_written:pages]
            staged.copy_(torch.tensor(sequence.pages[self._pages_written:], dtype=torch.int32))
            self.block_table[0, self._pages_written:pages].copy_(staged, non_blocking=True)
            self._pages_written = pages
        return self.block_table

    def finish(self, sequence: Sequence, accept_count: int) -> None:
        """Commit a step's accepted count to the sequence on the host and release the scratch it did not keep."""
        sequence.length += accept_count
        self.kv.trim(sequence, sequence.length)
        self._pages_written = min(self._pages_written, len(sequence.pages))

    # --- device side: one round, static shapes ----------------------------------------------------------

    def step(self, pool: torch.Tensor, anchor: torch.Tensor, length: torch.Tensor, block_table: torch.Tensor,
             seed: torch.Tensor) -> torch.Tensor:
        page_size = self.kv.kv_page_size
        device = pool.device

        def slots(logical: torch.Tensor) -> torch.Tensor:
            return block_table[0, logical // page_size].long() * page_size + logical % page_size

        prefix = length.to(torch.int32).reshape(1)
        if self.spec is None:
            tree = anchor_tree(anchor)
        else:
            tree = pad_tree(self._draft_tree(pool, anchor, length, prefix, block_table, slots), self.bucket)

        positions = length + tree.depths  # the anchor sits at position `length`
        scratch = slots(length + torch.arange(self.scratch_slots, device=device))
        meta = AttentionMetadata(positions=positions, slot_mapping=scratch[:self.bucket], block_tables=block_table,
                                 prefix_lens=prefix, query_starts=self.query_starts[self.bucket],
                                 visibility=tree.visibility)
        hidden, taps = self.target(tree.tokens.clamp(min=0), meta, pool, self.taps)
        choices = sample(self.target.logits(hidden), positions + 1, self.params, seed)
        path, count = accept(tree, choices)
        path = path[:self.path_len]  # padded with the last accepted node past `count`

        rows = torch.arange(self.path_len, device=device)
        kept = torch.where(rows < count, path, rows)  # identity moves past the count: nothing changes there
        kernels.move_kv(pool[:self.num_target_layers], scratch[kept], scratch[:self.path_len])
        if self.spec is not None:  # rows past the count write head context into slots the next round rewrites
            self.head.extend_context(taps[path], length + rows, scratch[:self.path_len],
                                     pool[self.num_target_layers:])
        anchor.copy_(choices[path[-1:]].squeeze(0))  # (a 1-d index: a 0-dim one would be a host read)
        length.add_(count)
        return round_outcome(tree, choices, path, count)

    def _draft_tree(self, pool, anchor, length, prefix, block_table, slots) -> DraftTree:
        """Head forward over `[anchor, MASK x (B-1)]` at positions `length ..`, then the tree from its rows."""
        config, device = self.head.config, pool.device
        offsets = torch.arange(config.block_size, device=device)
        block = torch.where(offsets == 0, anchor, self.mask_block)
        meta = AttentionMetadata(positions=length + offsets, slot_mapping=slots(length + offsets),
                                 block_tables=block_table, prefix_lens=prefix,
                                 query_starts=self.query_starts[config.block_size],
                                 visibility=self.block_visibility)
        hidden = self.head(self.target.embed_tokens(block), meta, pool[self.num_target_layers:])
        logprobs = torch.log_softmax(self.target.logits(hidden[1:]), dim=-1)
        return build_tree(anchor, logprobs, self.spec.budget, self.spec.width, self.depth)
