"""Host bookkeeping of continuous batching: which requests wait and which run, admission under the KV pool's pages,
the per-step token budget that prefill chunks share with the round, page reservation with preemption, and
retirement. Nothing here touches a device tensor: `Engine.step` (nanojet/engine/engine.py) runs what it schedules.

When the pool runs out, the newest running request is preempted: its pages are freed, its tokens kept, and it
waits at the front of the queue; readmitted, it prefills prompt + output (all but the last token, which is the
anchor again) and continues where it stopped. That is lossless: every token depends only on the committed prefix
and (seed, position).
"""
import itertools
import time
from collections import Counter, deque

from nanojet.engine.kv_cache import KVCache, KVCacheExhausted
from nanojet.engine.request import GenerationStats, Request

DEFAULT_STEP_TOKENS = 512
DEFAULT_PREFILL_CHUNK = 512


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int = 1, step_tokens: int = DEFAULT_STEP_TOKENS,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        """`step_tokens`: target tokens one step may run, prefill chunks and the round's verified tree nodes
        together; prefill always gets at least a quarter of it, so a full decode batch never starves new prompts.
        `prefill_chunk`: the most prompt tokens of one request in one forward."""
        for name, value in (("max_num_seqs", max_num_seqs), ("step_tokens", step_tokens),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.kv = kv
        self.max_num_seqs, self.step_tokens, self.prefill_chunk = max_num_seqs, step_tokens, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self._arrivals = itertools.count()
        # Totals for metrics.
        self.generated_tokens = 0
        self.accept_hist: Counter = Counter()
        self.preemptions = 0
        self.rounds = 0

    def add(self, request: Request) -> None:
        request.arrival, request.arrival_s = next(self._arrivals), time.perf_counter()
        request.stats = GenerationStats(prompt_tokens=len(request.prompt_ids))
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_pages_used(self) -> int:
        return self.kv.num_pages - len(self.kv.free_pages)

    def pages(self, num_slots: int) -> int:
        return -(-num_slots // self.kv.kv_page_size)

    def drop_cancelled(self) -> None:
        for request in [r for r in (*self.running, *self.waiting) if r.cancelled]:
            request.stats.finish_reason = "cancelled"
            self.retire(request)

    def admit(self) -> None:
        """Move waiting requests to running while there is a place and the pool has pages for their context and
        one round's scratch (an idle engine admits anyway: `Engine.check` made sure it fits alone)."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            room = self.pages(len(request.context) + request.scratch_slots)
            if self.running and room > len(self.kv.free_pages):
                return  # wait until retirements free pages
            self.running.append(self.waiting.popleft())
            self.running.sort(key=lambda r: r.arrival)

    def prefill_chunks(self) -> list[tuple[Request, int, int]]:
        """`(request, start, end)`: the slice of each admitted context to prefill this step, oldest first, within
        the step's budget, with its pages reserved."""
        round_tokens = sum(r.round_tokens for r in self.running if r.ready)
        budget = max(self.step_tokens - round_tokens, self.step_tokens // 4)
        chunks = []
        for request in [r for r in self.running if not r.ready]:
            if request not in self.running:
                continue  # preempted by an earlier reservation of this step: it holds no pages and must take none
            end = min(len(request.context), request.prefilled + budget, request.prefilled + self.prefill_chunk)
            if end <= request.prefilled:
                break
            if not self.reserve(request, end):
                continue  # it was preempted itself
            chunks.append((request, request.prefilled, end))
            budget -= end - request.prefilled
        return [chunk for chunk in chunks if chunk[0] in self.running]  # a later reservation may preempt one

    def reserve(self, request: Request, num_slots: int) -> bool:
        """Pages for `num_slots` of the request's slots, preempting the newest requests until they fit; False
        when the request itself was preempted."""
        while True:
            try:
                self.kv.reserve(request.sequence, num_slots)
                return True
            except KVCacheExhausted:
                victim = max(self.running, key=lambda r: r.arrival)
                self.preempt(victim)
                if victim is request:
                    return False

    def preempt(self, request: Request) -> None:
        """Free the request's pages and queue it first; its tokens stay, and it recomputes them on readmission."""
        if len(self.running) == 1:  # alone and still too big: `Engine.check` should have refused it
            self.fail(request, "the KV pool cannot hold this request even alone")
            return
        self.kv.free(request.sequence)
        request.prefilled = 0
        request.preemptions += 1
        self.preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def fail(self, request: Request, message: str) -> None:
        request.error, request.stats.finish_reason = message, "error"
        self.retire(request)

    def fail_all(self, message: str) -> None:
        """End every request with an error (after an exception in a step: nothing may wait forever)."""
        for request in [*self.running, *self.waiting]:
            self.fail(request, message)

    def retire(self, request: Request) -> None:
        """Free the request's pages, take it off the queues, close its timings and tell its owner."""
        self.kv.free(request.sequence)
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        request.finished, request.finish_s = True, time.perf_counter()
        if request.first_token_s is not None:
            request.stats.decode_s = request.finish_s - request.first_token_s - request.stats.compile_s
        if request.on_update:
            request.on_update(request, [])
