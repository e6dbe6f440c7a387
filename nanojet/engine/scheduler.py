"""Continuous batching (DESIGN.md section 9): admission, chunked prefill under a per-step token budget, batched
speculative rounds, retirement, cancellation and preemption.

Every `step` does, between rounds: drop cancelled requests (their pages go back at once); admit waiting requests
while fewer than `max_num_seqs` run and the pool has room for their prompt; prefill chunks of admitted prompts,
several sequences in one forward, up to the step's token budget minus what the round verifies; then run ONE round
(`StaticRound.step`) over every sequence that is ready to decode, padded to a batch-size bucket with inert rows.
Each sequence keeps its own sampling parameters and seed (per-row tensors), its own tree and stop conditions, so
its ids are exactly what it produces alone: a token depends only on the committed prefix and (seed, position).

When the pool runs out, the newest running sequence is preempted: its pages are freed, its tokens kept, and it
waits at the front of the queue; readmitted, it prefills prompt + output (all but the last token, which is the
anchor again) and continues where it stopped.
"""
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanojet.engine.engine import Engine, GenerationStats, SpeculativeParams, causal_visibility
from nanojet.engine.kv_cache import AttentionMetadata, KVCacheExhausted, Sequence
from nanojet.engine.sampling import SamplingParams, sample
from nanojet.engine.tree import read_outcome, tree_bucket, tree_size

SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows of a batched round: one graph per bucket
DEFAULT_STEP_TOKENS = 512


@dataclass(eq=False)
class Request:
    """One generation: what to generate, and its progress (owned by the scheduler's thread)."""
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    first_token_ids: list[int] | None = None  # token healing: the first token must be one of these
    # Called on the scheduler's thread with each batch of final ids, and once more with [] when it finishes.
    on_update: Callable[["Request", list[int]], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    sequence: Sequence = field(default_factory=Sequence)
    arrival: int = -1       # admission order: the newest is preempted first
    prefilled: int = 0      # tokens of `context` whose K/V are in the pool
    preemptions: int = 0
    cancelled: bool = False
    finished: bool = False
    error: str | None = None
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def context(self) -> list[int]:
        """The tokens whose K/V must be in the pool before a round: all committed tokens but the anchor."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def ready(self) -> bool:
        """Prefilled and holding an anchor: it can take part in a round."""
        return bool(self.output_ids) and self.prefilled == len(self.prompt_ids) + len(self.output_ids) - 1

    def cancel(self) -> None:
        """Ask the scheduler to stop this request (any thread); it is dropped before the next round."""
        self.cancelled = True


def sequence_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes rounds are built for: powers of two below `max_num_seqs`, then `max_num_seqs` itself."""
    return [b for b in SEQUENCE_BUCKETS if b < max_num_seqs] + [max_num_seqs]


class Scheduler:
    def __init__(self, engine: Engine, spec: SpeculativeParams | None = None, max_num_seqs: int = 8,
                 step_tokens: int = DEFAULT_STEP_TOKENS):
        """`spec` None (or budget 1): plain decoding. `step_tokens`: tokens one step may run through the target,
        prefill chunks and the round's verified tree nodes together; prefill always gets at least a quarter of
        it, so a full decode batch never starves new prompts."""
        if max_num_seqs < 1 or step_tokens < 1:
            raise ValueError(f"max_num_seqs and step_tokens must be >= 1; got {max_num_seqs}, {step_tokens}")
        if spec is not None and engine.head is None:
            raise ValueError("speculative decoding needs a draft head; load one or decode plainly")
        self.engine, self.kv = engine, engine.kv
        self.spec = spec if spec is not None and spec.budget > 1 else None
        self.taps = tuple(engine.head.config.target_layer_ids) if self.spec else ()
        self.max_num_seqs, self.step_tokens = max_num_seqs, step_tokens
        self.buckets = sequence_buckets(max_num_seqs)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self._arrivals = itertools.count()
        self._row_owners: list = []  # (request, preemptions) per row of the runner used last
        self._last_runner = None
        # Totals for metrics.
        self.generated_tokens = 0
        self.accept_hist: Counter = Counter()
        self.preemptions = 0
        self.rounds = 0

    # --- requests --------------------------------------------------------------------------------------------

    def add(self, request: Request) -> Request:
        """Queue a request; raises ValueError when it could never run (empty, too long, larger than the pool)."""
        self.check(request)
        request.arrival, request.arrival_s = next(self._arrivals), time.perf_counter()
        request.stats = GenerationStats(prompt_tokens=len(request.prompt_ids))
        self.waiting.append(request)
        return request

    def check(self, request: Request) -> None:
        """Raise ValueError, saying what to change, when the request could never run."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if n >= self.engine.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but the context holds {self.engine.max_model_len} "
                             f"(prompt + at least one new token); shorten it or raise max_model_len")
        longest = min(n + request.params.max_new_tokens, self.engine.max_model_len)
        if self._pages(longest - 1 + self._scratch_slots()) > self.kv.num_pages:
            raise ValueError(f"a request of {longest} tokens needs more KV pages than the pool has "
                             f"({self.kv.num_pages}); raise the KV memory or lower max_tokens")

    def run(self, requests: list[Request]) -> list[Request]:
        """Add `requests` and step until every one has finished."""
        for request in requests:
            self.add(request)
        while not all(r.finished for r in requests):
            self.step()
        return requests

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_pages_used(self) -> int:
        return self.kv.num_pages - len(self.kv.free_pages)

    # --- one step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit, prefill chunks under the budget, run one round over the ready ones."""
        for request in [r for r in (*self.running, *self.waiting) if r.cancelled]:
            request.stats.finish_reason = "cancelled"
            self._retire(request)
        self._admit()
        self._prefill()
        self._decode()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            room = self._pages(len(request.context) + self._scratch_slots())
            if self.running and room > len(self.kv.free_pages):
                return  # wait until retirements free pages; an idle engine admits anyway (add checked the size)
            self.running.append(self.waiting.popleft())
            self.running.sort(key=lambda r: r.arrival)

    def _prefill(self) -> None:
        round_tokens = self._round_tokens() * sum(r.ready for r in self.running)
        budget = max(self.step_tokens - round_tokens, self.step_tokens // 4)
        chunks = []
        for request in [r for r in self.running if not r.ready]:
            context = request.context
            end = min(len(context), request.prefilled + budget, request.prefilled + self.engine.prefill_chunk)
            if end <= request.prefilled:
                break
            if not self._reserve(request, end):
                continue  # it was preempted itself
            chunks.append((request, context, request.prefilled, end))
            budget -= end - request.prefilled
        if chunks:
            self._prefill_forward([c for c in chunks if not c[0].finished and c[0] in self.running])

    def _prefill_forward(self, chunks: list[tuple[Request, list[int], int, int]]) -> None:
        """One target forward over every chunk (varlen, each causal over itself after its prefix); the first
        token of each prompt whose prefill ends here is sampled as `Engine.generate` samples it."""
        device = self.engine.device
        counts = [end - start for _, _, start, end in chunks]
        visibility = [causal_visibility(n, device) for n in counts]
        words = max(v.shape[1] for v in visibility)
        meta = AttentionMetadata(
            positions=torch.cat([torch.arange(start, end) for _, _, start, end in chunks]).to(device),
            slot_mapping=torch.cat([self.kv.slots(r.sequence, start, end) for r, _, start, end in chunks]),
            block_tables=torch.stack([self.kv.block_table(r.sequence) for r, *_ in chunks]).to(device),
            prefix_lens=torch.tensor([start for *_, start, _ in chunks], dtype=torch.int32, device=device),
            query_starts=torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device),
            visibility=torch.cat([torch.nn.functional.pad(v, (0, words - v.shape[1])) for v in visibility]))
        tokens = torch.tensor([t for _, context, start, end in chunks for t in context[start:end]], device=device)
        hidden, taps = self.engine.target(tokens, meta, self.kv.pool, self.taps)
        if self.taps:
            self.engine.head.extend_context(taps, meta.positions, meta.slot_mapping,
                                            self.kv.pool[self.engine.num_target_layers:])
        last_rows = list(itertools.accumulate(counts))
        for (request, context, _, end), last in zip(chunks, last_rows):
            request.prefilled = request.sequence.length = end
            request.stats.target_forwards += 1
            if end == len(context) and not request.output_ids:  # a fresh prompt is done: its first token
                logits = self.engine.target.logits(hidden[last - 1:last])
                if request.first_token_ids:
                    allowed = torch.zeros_like(logits, dtype=torch.bool)
                    allowed[:, request.first_token_ids] = True
                    logits = logits.masked_fill(~allowed, float("-inf"))
                position = torch.full((1,), len(context), device=device)
                self._emit(request, [int(sample(logits, position, request.params)[0])])

    def _decode(self) -> None:
        """One round over every ready sequence (at most `max_num_seqs`), padded with inert rows to a bucket."""
        while True:
            batch = [r for r in self.running if r.ready]
            if not batch:
                return
            rows = next(b for b in self.buckets if b >= len(batch))
            runner = self.engine.runner(self.spec, any(not r.params.greedy for r in batch), rows)
            if runner is not self._last_runner:  # another runner's buffers: every row must be set again
                self._row_owners, self._last_runner = [None] * rows, runner
                runner.round.time_split = None  # per-part timing is Engine.generate's (one sequence)
            sequences = []
            for row in range(rows):
                request = batch[row] if row < len(batch) else None
                owner = None if request is None else (request, request.preemptions)
                if self._row_owners[row] != owner:  # the device buffers hold another sequence's state
                    if request is None:
                        runner.round.begin(row, None)
                    else:
                        runner.round.begin(row, request.sequence, request.output_ids[-1], request.params)
                    self._row_owners[row] = owner
                sequences.append(None if request is None else request.sequence)
            try:
                table = runner.round.table(sequences)
                break
            except KVCacheExhausted:
                self._preempt(max(self.running, key=lambda r: r.arrival))
        outcome = runner(table).tolist()  # the round's one host read, [rows, 1 + 2P]
        counts, emitted = [], []
        for request, row in zip(batch, outcome):
            count, tokens = read_outcome(row)
            counts.append(count)
            emitted.append(tokens)
            request.stats.rounds += 1
            request.stats.target_forwards += 1
            request.stats.accept_hist[count] += 1
            self.accept_hist[count] += 1
        runner.round.finish(sequences, counts + [0] * (rows - len(batch)))
        self.rounds += 1
        for request, count, tokens in zip(batch, counts, emitted):
            request.prefilled += count
            self._emit(request, tokens)

    # --- bookkeeping -----------------------------------------------------------------------------------------

    def _emit(self, request: Request, tokens: list[int]) -> None:
        """Cut at the request's stop conditions, hand the ids over, retire it when it is done."""
        stats = request.stats
        tokens = self.engine.truncate(tokens, len(request.prompt_ids), len(request.output_ids), request.params,
                                      stats)
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
            stats.prefill_s = request.first_token_s - request.arrival_s
        request.output_ids += tokens
        stats.new_tokens = len(request.output_ids)
        self.generated_tokens += len(tokens)
        if request.on_update and tokens:
            request.on_update(request, tokens)
        if stats.finish_reason:
            self._retire(request)

    def fail_all(self, message: str) -> None:
        """End every request with an error (after an exception in a step: nothing may wait forever)."""
        for request in [*self.running, *self.waiting]:
            request.error, request.stats.finish_reason = message, "error"
            self._retire(request)

    def _retire(self, request: Request) -> None:
        self.kv.free(request.sequence)
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        request.finished, request.finish_s = True, time.perf_counter()
        if request.first_token_s is not None:
            request.stats.decode_s = request.finish_s - request.first_token_s
        if request.on_update:
            request.on_update(request, [])

    def _reserve(self, request: Request, num_slots: int) -> bool:
        """Pages for `num_slots` of the request's slots, preempting the newest sequences until they fit; False
        when the request itself was preempted."""
        while True:
            try:
                self.kv.reserve(request.sequence, num_slots)
                return True
            except KVCacheExhausted:
                victim = max(self.running, key=lambda r: r.arrival)
                self._preempt(victim)
                if victim is request:
                    return False

    def _preempt(self, request: Request) -> None:
        """Free the request's pages and queue it first; its tokens stay, and it recomputes them on readmission."""
        if len(self.running) == 1:  # alone and still too big: `add` should have refused it
            request.error = "the KV pool cannot hold this request even alone"
            request.stats.finish_reason = "error"
            self._retire(request)
            return
        self.kv.free(request.sequence)
        request.prefilled = 0
        request.preemptions += 1
        self.preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def _scratch_slots(self) -> int:
        """Slots past the committed ones a round reserves (the padded tree, or the head's draft block)."""
        if self.spec is None:
            return 1
        return max(self._round_tokens(), self.engine.head.config.block_size)

    def _round_tokens(self) -> int:
        """Target tokens a round verifies per sequence (its padded tree)."""
        if self.spec is None:
            return 1
        depth = self.engine.head.config.block_size - 1
        depth = depth if self.spec.depth is None else min(self.spec.depth, depth)
        return tree_bucket(tree_size(self.spec.budget, self.spec.width, depth))

    def _pages(self, num_slots: int) -> int:
        return -(-num_slots // self.kv.kv_page_size)
