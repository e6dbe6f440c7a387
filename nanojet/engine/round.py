"""The speculative round: the one implementation, with static shapes over persistent buffers.

Eager execution runs `StaticRound.step` as Python; torch.compile and CUDA graphs build graphs of the same code.
Every shape in `step` is fixed by Python ints chosen when the round is built (sequences per round S, the tree
bucket, the head's block, whether any row samples, whether any row is biased, the log-prob alternatives K); what
changes from round to round lives in persistent device tensors:

    anchor       [S]             int64  each sequence's last emitted token (its K/V is not written yet)
    length       [S]             int64  committed K/V slots, which is also the anchor's position
    block_table  [S, max_pages]  int32  each sequence's pages, full width; the host writes new ones between rounds
    seed, temperature, top_k, top_p [S]  each sequence's sampling parameters (tensors: one graph serves them all)
    bias_ids, bias_values [S, 300]      each sequence's logit bias, sparse (biased rounds only)

A row without a live sequence (a batch padded up to its size bucket) is inert: it points at the round's own idle
pages with length 0, so whatever it drafts, verifies and commits lands there and never in a live sequence's pages.

`step` runs draft -> tree -> verify -> accept -> commit for all S sequences (one head forward over their draft
blocks, one verify forward over their trees laid along a varlen axis, accept and commit per sequence), advances
`anchor` and `length` in place and returns `[S, 1 + 2P]`, the round's single host read (`tree.round_outcome`,
P = the longest path the tree allows), widened by `P * (1 + 2K)` log-prob words when the round computes log-probs
(nanojet/engine/logprobs.py). Commit always moves P rows (identity moves past the accepted count), so
the pool is touched the same way every round. Pages stay on the host: `table` reserves scratch for the tree and
the draft block before a step, `finish` trims what the round did not keep after it.
"""
import time
from collections import Counter

import torch

from nanojet import kernels
from nanojet.engine.candidates import candidate_table, tree_from_table
from nanojet.engine.kv_cache import KVCache, KVCacheExhausted, Sequence
from nanojet.engine.logprobs import logprob_words
from nanojet.engine.sampling import MAX_LOGIT_BIAS, SamplingParams, bias_logits, sample_rows
from nanojet.engine.tree import (
    DraftTree,
    accept,
    round_outcome,
    tree_bucket,
    tree_from_candidates,
    tree_size,
)
from nanojet.kernels.reference import pack_visibility
from nanojet.model.attention import AttentionMetadata
from nanojet.model.packed_gemm import linear, pack_module, pack_rows


def round_scratch_slots(max_tree_nodes: int, block_size: int) -> int:
    """KV slots past the committed ones that a round may write: the padded tree, or the head's draft block."""
    return max(tree_bucket(max_tree_nodes), block_size)


def round_tree(spec, block_size: int) -> tuple[int, int]:
    """(depth limit, tree nodes) of a round: `spec` None (plain decoding) is the one-node tree."""
    if spec is None:
        return 0, 1
    depth = block_size - 1 if spec.depth is None else min(spec.depth, block_size - 1)
    return depth, tree_size(spec.budget, spec.width, depth)


def pages_per_sequence(max_model_len: int, max_tree_nodes: int, block_size: int, kv_page_size: int) -> int:
    """Page-table width that holds any request: a round runs while at most `max_model_len - 1` slots are
    committed, and reserves its scratch past them (`round_scratch_slots`)."""
    return -(-(max_model_len - 1 + round_scratch_slots(max_tree_nodes, block_size)) // kv_page_size)


def tree_fields(tree: DraftTree) -> tuple:
    """The tensors of a tree as a tuple (what vmap returns; `dataclasses.astuple` would deep-copy them)."""
    return tree.tokens, tree.parents, tree.depths, tree.visibility


def bias_buffers(num_sequences: int, device: torch.device) -> tuple:
    """A biased round's per-row logit bias, sparse: ids `[S, 300]` int64 and values fp32, unused entries (0, 0.0)
    (a dense `[S, V]` bias would be a vocabulary-wide add per verified row; an unbiased round, as its key says,
    has none), and their host staging (pinned on CUDA, written through numpy as the pages are)."""
    ids = torch.zeros(num_sequences, MAX_LOGIT_BIAS, dtype=torch.int64, device=device)
    values = torch.zeros(num_sequences, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
    staging = [torch.zeros_like(t, device="cpu") for t in (ids, values)]
    return ids, values, [t.pin_memory() for t in staging] if device.type == "cuda" else staging


class StaticRound:
    def __init__(self, target, head, kv: KVCache, spec, sampled: bool, num_sequences: int = 1, biased: bool = False,
                 logprobs: int | None = None):
        """`spec` None: plain decoding (a one-node tree, no head). `sampled` False: every row is greedy (no noise
        is drawn); True: each row samples with its own parameters (greedy where its temperature is 0). `biased`:
        rows may carry a logit bias. `logprobs` None: none are computed; K: every row's emitted tokens get their
        log-probs and K alternatives (the host keeps what each request asked for)."""
        self.target, self.head, self.kv, self.spec, self.sampled = target, head, kv, spec, sampled
        self.biased, self.logprobs = biased, logprobs
        self.num_target_layers = target.config.num_hidden_layers
        self.num_sequences = num_sequences
        self.layer_step = None  # the target's layers through one compiled layer (a layerwise CompiledRunner's)
        device = kv.pool.device
        block_size = 0 if spec is None else head.config.block_size
        depth, nodes = round_tree(spec, block_size)
        if spec is not None:
            # The lm_head rows the head scores: the whole vocabulary, or its draft vocabulary (nanojet/model/draft_vocab.py)
            self.draft_weight, self.draft_packed = head.draft_lm_head(target.lm_head_weight)  # [V or N, H]
            self.draft_ids = head.draft_vocab  # [N] target ids of those rows, or None
            if spec.width > self.draft_weight.shape[0]:
                raise ValueError(f"width {spec.width} exceeds the head's draft vocabulary "
                                 f"({self.draft_weight.shape[0]} tokens); lower the width")
            block_words = pack_visibility(head.block_visibility(device))  # [B, 1]
            self.block_visibility = block_words.repeat(num_sequences, 1)  # [S * B, 1]
            self.mask_block = torch.full((block_size,), head.config.mask_token_id, device=device)
        self.depth = depth
        self.nodes = nodes  # a tree's real nodes; the bucket pads it
        # Small trees come from a table of every node that could be chosen (one sort), larger ones from a beam search.
        self.tree_table = None if spec is None else candidate_table(spec.budget, spec.width, depth, device)
        self.bucket = tree_bucket(nodes)
        self.path_len = min(depth + 1, nodes)  # the most nodes an accepted path can hold
        self.scratch_slots = round_scratch_slots(nodes, block_size)  # slots past the committed ones a round writes
        self.taps = tuple(head.config.target_layer_ids) if spec is not None else ()
        # Constants are built here, not in `step`: a host-to-device copy cannot be captured in a CUDA graph.
        self.query_starts = {count: torch.arange(num_sequences + 1, dtype=torch.int32, device=device) * count
                             for count in (self.bucket, block_size)}
        self.one_node_visibility = torch.ones(num_sequences, 1, dtype=torch.int32, device=device)  # sees itself
        self.block_offsets = torch.arange(block_size, device=device)  # a draft block's rows
        self.anchor_row = self.block_offsets == 0  # the block's row that holds the anchor; MASK in the others
        self.scratch_offsets = torch.arange(self.scratch_slots, device=device)  # past the committed slots
        self.path_offsets = torch.arange(self.path_len, device=device)  # an accepted path's rows
        self.tree_starts = torch.arange(num_sequences, device=device)[:, None] * self.bucket  # each tree's first row
        self.one_node_accepted = torch.ones(num_sequences, 1, dtype=torch.int64, device=device)  # count 1
        self.anchor = torch.zeros(num_sequences, dtype=torch.int64, device=device)
        self.length = torch.zeros(num_sequences, dtype=torch.int64, device=device)
        self.seed = torch.zeros(num_sequences, dtype=torch.int64, device=device)
        self.temperature = torch.zeros(num_sequences, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(num_sequences, dtype=torch.int64, device=device)
        self.top_p = torch.ones(num_sequences, dtype=torch.float32, device=device)
        self.bias_ids, self.bias_values, self._host_bias = bias_buffers(num_sequences, device) if biased else (
            None, None, None)
        self.logit_starts = torch.arange(num_sequences, device=device)[:, None] * nodes  # each tree's first logit row
        self.idle = Sequence()  # the pages inert rows write into, held only during a round that has such rows
        self.block_table = torch.zeros(num_sequences, kv.max_pages_per_sequence, dtype=torch.int32, device=device)
        # Staging for new page ids: pinned, so the copy to the device is truly asynchronous (never a host sync);
        # written through a numpy view, so no tensor is built from a Python list on the round's path.
        self._host_pages = torch.zeros(num_sequences, kv.max_pages_per_sequence, dtype=torch.int32,
                                       pin_memory=device.type == "cuda")
        self._host_pages_view = self._host_pages.numpy()
        self._pages_written = [0] * num_sequences
        self.time_split: Counter | None = None  # eager profiling: seconds per part, when a caller sets a Counter
        self._clock = None

    # --- host side, between rounds ------------------------------------------------------------------------

    def begin(self, row: int, sequence: Sequence | None, anchor: int = 0,
              params: SamplingParams | None = None) -> None:
        """Point row `row` of the buffers at a sequence whose KV holds `sequence.length` slots and whose anchor is
        `anchor` (fills from Python scalars: no host buffer, no sync); `None` makes the row inert."""
        params = params or SamplingParams()
        if not self.sampled and not params.greedy:
            raise ValueError("a greedy round cannot run a sampled sequence; build the round with sampled=True")
        if not self.biased and params.logit_bias:
            raise ValueError("an unbiased round cannot run a sequence with a logit bias; build it with biased=True")
        self.anchor[row].fill_(anchor)
        self.length[row].fill_(0 if sequence is None else sequence.length)
        for buffer, value in ((self.seed, params.seed), (self.temperature, params.temperature),
                              (self.top_k, params.top_k), (self.top_p, params.top_p)):
            buffer[row].fill_(value)
        if self.biased:
            self._write_bias(row, params.logit_bias or {})
        self._pages_written[row] = 0

    def _write_bias(self, row: int, bias: dict[int, float]) -> None:
        """Row `row`'s sparse bias: its entries, then (0, 0.0), through the pinned staging rows (not in flight: the
        last copy of this row finished before the host read the round that used it)."""
        for staged, buffer, values in zip(self._host_bias, (self.bias_ids, self.bias_values), (bias, bias.values())):
            view = staged.numpy()
            view[row] = 0
            view[row, :len(bias)] = list(values)
            buffer[row].copy_(staged[row], non_blocking=True)

    def table(self, sequences: list[Sequence | None]) -> torch.Tensor:
        """Reserve the round's scratch and write new pages into the persistent block table; returns the table.
        `None` rows are inert: their length goes back to 0 (a round advances it) and they point at the idle pages.
        Raises KVCacheExhausted when the pool cannot hold the scratch (the pages reserved so far stay reserved)."""
        for row, sequence in enumerate(sequences):
            if sequence is None:
                sequence = self.idle
                self.length[row].fill_(0)
                self._pages_written[row] = 0  # the idle pages may differ from round to round
            try:
                self.kv.reserve(sequence, sequence.length + self.scratch_slots)
            except KVCacheExhausted:
                self.kv.free(self.idle)
                raise
            written, pages = self._pages_written[row], len(sequence.pages)
            if pages > written:
                # Entries being written were not in flight: every earlier copy finished before the last host read.
                self._host_pages_view[row, written:pages] = sequence.pages[written:]
                self.block_table[row, written:pages].copy_(self._host_pages[row, written:pages], non_blocking=True)
                self._pages_written[row] = pages
        return self.block_table

    def finish(self, sequences: list[Sequence | None], accept_counts: list[int]) -> None:
        """Commit each sequence's accepted count on the host and release the scratch it did not keep (and the idle
        pages of inert rows)."""
        self.kv.free(self.idle)
        for row, (sequence, count) in enumerate(zip(sequences, accept_counts)):
            if sequence is None:
                continue
            sequence.length += count
            self.kv.trim(sequence, sequence.length)
            self._pages_written[row] = min(self._pages_written[row], len(sequence.pages))

    def pack_weights(self) -> None:
        """Eager CPU rounds: MKL-packed copies of the weights for this round's row counts, each product's rows known
        now (nanojet/model/packed_gemm.py; a no-op elsewhere and for counts where packing does not pay)."""
        rows = self.num_sequences
        self.target.pack(rows * self.bucket, rows * self.nodes)  # verify: the padded tree; logits of real nodes
        if self.spec is not None:
            pack_module(self.head, rows * self.head.config.block_size)  # the draft block
            pack_module(self.head, rows * self.path_len)  # commit: context of the accepted paths (fc)
            weight, _, _, packed = self.head.context_kv_weights()
            pack_rows(packed, weight, rows * self.path_len)  # commit: their K/V, every head layer in one product
            pack_rows(self.draft_packed, self.draft_weight, rows * (1 + self.depth))  # draft logits

    @property
    def outcome_width(self) -> int:
        """Columns of `step`'s outcome: `1 + 2P`, then `P * (1 + 2K)` log-prob words when it computes them."""
        width = 1 + 2 * self.path_len
        return width if self.logprobs is None else width + self.path_len * (1 + 2 * self.logprobs)

    def inputs(self, table: torch.Tensor) -> tuple:
        """`step`'s arguments: the pool and the persistent buffers, with block table `table`."""
        return (self.kv.pool, self.anchor, self.length, table, self.seed, self.temperature, self.top_k, self.top_p,
                self.bias_ids, self.bias_values)

    # --- device side: one round, static shapes ----------------------------------------------------------

    def step(self, pool: torch.Tensor, anchor: torch.Tensor, length: torch.Tensor, block_table: torch.Tensor,
             seed: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             bias_ids: torch.Tensor | None = None, bias_values: torch.Tensor | None = None) -> torch.Tensor:
        self._mark(None)
        sampling = seed, temperature, top_k, top_p, bias_ids, bias_values
        if self.spec is None:
            return self._decode_step(pool, anchor, length, block_table, sampling)
        num_sequences, bucket, path_len = self.num_sequences, self.bucket, self.path_len
        # Per-sequence work (tree, acceptance) is written for one sequence and vmapped over the S rows (one batch of
        # ops for the whole round instead of S of them), or called directly in a batch-1 round (`_per_row`).
        scratch = self._slots(block_table, length[:, None] + self.scratch_offsets)  # [S, scratch slots]
        # each [S, D, width]; the draft block's slots are the first of the scratch
        top_logprobs, top_tokens = self.draft_candidates(pool, anchor, length, block_table, scratch)
        self._mark("draft")
        trees = self._per_row(self._row_tree, anchor, top_logprobs, top_tokens)  # each [S, bucket, ...]
        self._mark("tree")
        tree = DraftTree(*(part.flatten(0, 1) for part in trees))  # varlen: S trees of `bucket`
        positions = (length[:, None] + tree.depths.view(num_sequences, bucket)).flatten()  # anchor at `length`
        meta = AttentionMetadata(positions=positions, slot_mapping=scratch[:, :bucket].flatten(),
                                 block_tables=block_table, prefix_lens=length.to(torch.int32),
                                 query_starts=self.query_starts[bucket],
                                 visibility=tree.visibility)
        hidden, taps = self.target(tree.tokens.clamp(min=0), meta, pool, self.taps, self.layer_step)
        # Logits of the real nodes only: a padding node's choice is never read (no node hangs below it, and it is
        # never accepted), so it is left 0.
        nodes = self.nodes
        real_rows, real_positions = hidden, positions
        if nodes < bucket:
            real_rows = hidden.view(num_sequences, bucket, -1)[:, :nodes].flatten(0, 1)  # [S * nodes, H]
            real_positions = positions.view(num_sequences, bucket)[:, :nodes].flatten()
        logits = self.target.logits(real_rows)  # [S * nodes, V]
        choices = self._choose(logits, real_positions, nodes, *sampling)  # [S * nodes]
        if nodes < bucket:
            choices = torch.nn.functional.pad(choices.view(num_sequences, nodes), (0, bucket - nodes)).flatten()
        self._mark("verify")

        paths, counts, outcomes = self._per_row(self._row_accept, *trees, choices.view(num_sequences, bucket))
        path_rows = paths + self.tree_starts  # [S, P] rows of the verify forward
        if self.logprobs is not None:  # the emitted tokens' log-probs: each path row's logits and choice
            words = logprob_words(logits[(paths + self.logit_starts).flatten()], choices[path_rows.flatten()],
                                  self.logprobs)  # [S * P, 1 + 2K]
            outcomes = torch.cat([outcomes, words.view(num_sequences, -1)], dim=1)
        self._mark("accept")  # paths [S, P], counts [S], outcomes [S, outcome_width]

        rows = self.path_offsets
        kept = torch.where(rows < counts[:, None], paths, rows)  # identity moves past the count: nothing changes
        committed = scratch[:, :path_len].flatten()  # [S * P]
        kernels.move_kv(pool[:self.num_target_layers], scratch.gather(1, kept).flatten(), committed)
        # Rows past the count write head context into slots the next round rewrites.
        self.head.extend_context(taps[path_rows.flatten()], (length[:, None] + rows).flatten(), committed,
                                 pool[self.num_target_layers:])
        anchor.copy_(choices[path_rows[:, -1]])  # the bonus: the target's token after the last accepted node
        length.add_(counts)
        self._mark("commit")
        return outcomes

    def _decode_step(self, pool: torch.Tensor, anchor: torch.Tensor, length: torch.Tensor, block_table: torch.Tensor,
                     sampling: tuple) -> torch.Tensor:
        """The round with a one-node tree, written out: the anchor is verified alone at its own slot, so there is no
        tree to build, no path to walk and no K/V to move (its scratch slot is its committed slot). Same outcome
        layout as `step` (P = 1): `[1, anchor, chosen token]` per sequence, then its log-prob words."""
        slots = self._slots(block_table, length[:, None]).flatten()  # [S]
        meta = AttentionMetadata(positions=length, slot_mapping=slots, block_tables=block_table,
                                 prefix_lens=length.to(torch.int32), query_starts=self.query_starts[1],
                                 visibility=self.one_node_visibility)
        hidden, _ = self.target(anchor, meta, pool, layer_step=self.layer_step)
        logits = self.target.logits(hidden)  # [S, V]
        choices = self._choose(logits, length, 1, *sampling)  # [S]
        self._mark("verify")
        parts = [self.one_node_accepted, anchor[:, None], choices[:, None]]  # [S, 3]
        if self.logprobs is not None:
            parts.append(logprob_words(logits, choices, self.logprobs))  # [S, 1 + 2K]
        outcomes = torch.cat(parts, dim=1)
        anchor.copy_(choices)
        length.add_(1)
        self._mark("commit")
        return outcomes

    def _choose(self, logits: torch.Tensor, positions: torch.Tensor, rows_per_sequence: int, seed: torch.Tensor,
                temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, bias_ids: torch.Tensor | None,
                bias_values: torch.Tensor | None) -> torch.Tensor:
        """The target's token after each row (at `positions + 1`): argmax in a greedy round (no noise is built),
        else each row samples with its sequence's parameters; in a biased round, after its sequence's logit bias
        (only the target's choice sees it: a draft is accepted when it equals that choice, so what is emitted is
        what plain decoding with the bias emits)."""
        if self.biased:
            logits = bias_logits(logits, bias_ids.repeat_interleave(rows_per_sequence, dim=0),
                                 bias_values.repeat_interleave(rows_per_sequence, dim=0))
        if not self.sampled:
            # max's indices, not argmax: the same first maximum, and faster on the CPU
            return logits.max(dim=-1).indices
        return sample_rows(logits, positions + 1, *(t.repeat_interleave(rows_per_sequence)  # each [S * rows]
                                                   for t in (temperature, top_k, top_p, seed)))

    def _per_row(self, fn, *args: torch.Tensor) -> tuple:
        """`fn`, written for one sequence, over the S rows of `args`: vmapped, or called directly on the one row
        of a batch-1 round (vmap's per-op batching costs about as much as the op itself on a small tree)."""
        if self.num_sequences == 1:
            return tuple(out[None] for out in fn(*(arg[0] for arg in args)))
        return torch.vmap(fn)(*args)

    def _row_tree(self, anchor: torch.Tensor, top_logprobs: torch.Tensor, top_tokens: torch.Tensor) -> tuple:
        """One sequence's draft tree, padded to the bucket, as a tuple of tensors (vmapped over sequences)."""
        if self.tree_table is not None:
            return tree_fields(tree_from_table(anchor, top_logprobs, top_tokens, self.tree_table, pad_to=self.bucket))
        return tree_fields(tree_from_candidates(anchor, top_logprobs, top_tokens, self.spec.budget, self.depth,
                                                pad_to=self.bucket))

    def _row_accept(self, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                    visibility: torch.Tensor, choices: torch.Tensor) -> tuple:
        """One sequence's accepted path (cut to P nodes, padded with the last accepted one past the count), count
        and host summary (vmapped over sequences)."""
        tree = DraftTree(tokens, parents, depths, visibility)
        path, count = accept(tree, choices)
        path = path[:self.path_len]
        return path, count, round_outcome(tree, choices, path, count)

    def _slots(self, block_table: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """`[S, n]` logical slots of each sequence -> `[S, n]` flat pool slots, through the block table."""
        page_size = self.kv.kv_page_size
        return block_table.gather(1, logical // page_size).long() * page_size + logical % page_size

    def draft_hidden(self, pool: torch.Tensor, anchor: torch.Tensor, length: torch.Tensor,
                     block_table: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """One head forward over every sequence's `[anchor, MASK x (B-1)]` at positions `length ..` -> final-normed
        hidden `[S, B, H]` (row d: depth d). `scratch`: the round's scratch slots `[S, >= B]`, when already found."""
        block_size = self.head.config.block_size
        block = torch.where(self.anchor_row, anchor[:, None], self.mask_block).flatten()  # [S * B]
        logical = length[:, None] + self.block_offsets  # [S, B]
        slots = self._slots(block_table, logical) if scratch is None else scratch[:, :block_size]
        meta = AttentionMetadata(positions=logical.flatten(), slot_mapping=slots.flatten(),
                                 block_tables=block_table, prefix_lens=length.to(torch.int32),
                                 query_starts=self.query_starts[block_size],
                                 visibility=self.block_visibility)
        hidden = self.head(self.target.embed_tokens(block), meta, pool[self.num_target_layers:])
        return hidden.view(self.num_sequences, block_size, -1)

    def draft_candidates(self, pool: torch.Tensor, anchor: torch.Tensor, length: torch.Tensor,
                         block_table: torch.Tensor, scratch: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each depth's `width` likeliest draft tokens, best first, and their log-probs: `[S, D, width]` each, D the
        tree's depth limit (row d-1: depth d). All the tree reads of the head's output, so only the rows of depths
        the tree can reach are scored, and only over the draft vocabulary; log-prob = logit - logsumexp, no
        `[D, V]` log-softmax is kept."""
        # The anchor's row is scored too and dropped: with a block of 16, 16 rows instead of 15, and MKL's fp32 GEMM
        # (the CPU path) runs 3..15 rows far slower than 16 (docs/round-cost.md).
        rows = self.draft_hidden(pool, anchor, length, block_table, scratch)[:, :1 + self.depth]  # [S, 1 + D, H]
        logits = linear(rows.flatten(0, 1), self.draft_weight, packed=self.draft_packed).float()
        logits = logits.view(self.num_sequences, 1 + self.depth, -1)[:, 1:]  # [S, D, V or N]
        top_logits, top_index = logits.topk(self.spec.width, dim=-1)
        top_logprobs = top_logits - logits.logsumexp(dim=-1, keepdim=True)
        return top_logprobs, top_index if self.draft_ids is None else self.draft_ids[top_index]

    def _mark(self, part: str | None) -> None:
        """Eager profiling (bench.py --profile): charge the time since the last mark to `part`. Off unless a caller
        set `time_split`, and never inside a compiled graph; on CUDA each mark synchronizes."""
        if self.time_split is None or torch.compiler.is_compiling():
            return
        now = synced_clock()
        if part is not None:
            self.time_split[part] += now - self._clock
        self._clock = now


def synced_clock() -> float:
    """Seconds, after the device has finished what was queued (a host sync on CUDA)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
