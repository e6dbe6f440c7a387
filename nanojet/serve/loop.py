"""The serving loop behind the HTTP server: the `Engine` stepped on its own thread, fed by request handlers on
the event loop, and each generation's text streamed back (incremental detokenizing, stop strings) through an
asyncio queue, one per HTTP request (its n choices merged). server.py only translates HTTP to `submit` calls and
these events back to HTTP; the metrics are nanojet.serve.metrics, fed as tokens come and requests end.

Threads: handlers call `submit` and `Request.cancel` (both safe from any thread: an append under a lock, a flag);
everything else in the engine runs on the loop thread, which hands text to the event loop with
`call_soon_threadsafe`.
"""
import asyncio
import math
import threading
import traceback
from collections import deque
from dataclasses import dataclass

from nanojet.engine.logprobs import TokenLogprobs
from nanojet.engine.request import Request, SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.llm import LLM
from nanojet.serve.metrics import ServingMetrics, family
from nanojet.tokenizer import IncrementalDetokenizer

# Engine finish reasons -> OpenAI's.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "abort",
                  "error": "error"}


class QueueFull(Exception):
    """No room for another request now (or the server is draining): answer 503 and ask to retry."""


@dataclass
class TextEvent:
    index: int  # the choice it belongs to
    text: str
    finish_reason: str | None = None  # set on the choice's last event
    # When asked: the log-probs of the tokens whose text starts in `text`, each with that start's offset in the
    # choice's whole text (the stop token that ends a generation has no text, so none).
    logprobs: list[tuple[TokenLogprobs, int]] | None = None


class TextStream:
    """One request's generated text as events on a queue; `stop` strings end it early (the stop string itself is
    not emitted, and text that may be the start of one is held back until it is not). A token's log-probs go out
    with the event that sends the start of its text; tokens that start after a stop string are dropped with it."""

    def __init__(self, request: Request, index: int, llm: LLM, stop: list[str], queue: asyncio.Queue,
                 event_loop: asyncio.AbstractEventLoop, metrics: ServingMetrics):
        self.request, self.index, self.stop, self.queue, self.event_loop = request, index, stop, queue, event_loop
        self.metrics = metrics
        self.text, self.sent, self.finish_reason = "", 0, None
        self._logprobs = None if request.params.logprobs is None else []  # (entry, text offset) not sent yet
        self._detokenizer = IncrementalDetokenizer(llm.tokenizer)
        self._text_ids = llm.text_ids  # the stop token that ends a generation is not text
        request.on_update = self._on_update

    @property
    def done(self) -> bool:
        """Its last event is on the queue (the request itself may run until the next round drops it)."""
        return self.finish_reason is not None

    def _on_update(self, request: Request, tokens: list[int]) -> None:  # on the engine's thread
        self.metrics.record_tokens(request, tokens)
        if not self.done:
            self._send(request, tokens)
        if request.finished:
            self.metrics.record_finished(request, self.finish_reason)

    def _send(self, request: Request, tokens: list[int]) -> None:
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        entries = None if self._logprobs is None else request.logprobs[len(request.logprobs) - len(tokens):]
        for i, token in enumerate(self._text_ids(tokens, request.params)):
            if entries is not None:
                self._logprobs.append((entries[i], len(self.text)))
            self.text += self._detokenizer.push(token)
        if request.finished:
            self.text += self._detokenizer.flush()
        finish = None
        cuts = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if cuts:
            self.text, finish = self.text[:min(cuts)], "stop"
            request.cancel()  # dropped, its pages freed, before the next round
        elif request.finished:
            finish = FINISH_REASONS.get(request.stats.finish_reason, "stop")
        held = 0 if finish else max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                    default=0)
        delta = self.text[self.sent:len(self.text) - held]
        self.sent += len(delta)
        self.finish_reason = finish
        logprobs = self._sent_logprobs(everything=request.finished and not cuts)
        if delta or finish or logprobs:
            try:
                self.event_loop.call_soon_threadsafe(self.queue.put_nowait,
                                                     TextEvent(self.index, delta, finish, logprobs))
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                request.cancel()

    def _sent_logprobs(self, everything: bool) -> list[tuple[TokenLogprobs, int]] | None:
        """The held log-probs of tokens whose text starts in what has been sent (`everything`: all of them)."""
        if self._logprobs is None:
            return None
        ready = len(self._logprobs) if everything else sum(offset < self.sent for _, offset in self._logprobs)
        sent, self._logprobs = self._logprobs[:ready], self._logprobs[ready:]
        return sent


class Generations:
    """The generations one HTTP request asked for (n samples of each prompt, choice i in `streams[i]`), their
    text events merged on one queue in the order they come."""

    def __init__(self, streams: list[TextStream], queue: asyncio.Queue):
        self.streams, self.queue = streams, queue

    @property
    def done(self) -> bool:
        return all(stream.done for stream in self.streams)

    def completion_tokens(self) -> int:
        return sum(len(stream.request.output_ids) for stream in self.streams)

    def cancel(self) -> None:
        """Stop every choice that has not ended (each still sends its last event, finish reason "abort")."""
        for stream in self.streams:
            if not stream.done:
                stream.request.cancel()

    async def events(self):
        """Text events until every choice has sent its last one."""
        left = len(self.streams)
        while left:
            event = await self.queue.get()
            left -= event.finish_reason is not None
            yield event


class ServingLoop:
    """The engine on its own thread: `submit` from the event loop, text back through `Generations`."""

    def __init__(self, llm: LLM, spec: SpeculativeParams | None, max_waiting: int):
        """`max_waiting`: requests that may wait for a place in the batch before new ones get 503."""
        self.llm = llm
        self.engine, self.scheduler = llm.engine, llm.engine.scheduler  # LLM sized its batch and step budget
        self.spec = None if spec is None or spec.budget == 1 else spec  # a one-node tree is plain decoding
        plain = self.spec is None
        self.metrics = ServingMetrics(None if plain else min(spec.depth or math.inf, llm.head.config.block_size - 1))
        self.max_waiting = max_waiting
        self.draining = False
        self._inbox: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanojet-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[tuple[list[int], SamplingParams]], stop: list[str]) -> Generations:
        """Queue generations (prompt ids, params), all or none; raises ValueError (one can never run) or QueueFull
        (not now: more than `max_waiting` would wait)."""
        requests = [Request(prompt_ids, params, self.spec) for prompt_ids, params in jobs]
        for request in requests:
            self.engine.check(request)
        queue, event_loop = asyncio.Queue(), asyncio.get_running_loop()
        streams = [TextStream(request, i, self.llm, stop, queue, event_loop, self.metrics)
                   for i, request in enumerate(requests)]
        with self._lock:
            if self.draining:
                raise QueueFull("the server is shutting down")
            if self.waiting + len(requests) > self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests may wait and {self.waiting} are already waiting")
            self._inbox.extend(requests)
        self._wake.set()
        return Generations(streams, queue)

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def drain(self) -> None:
        """Refuse new requests; the running and waiting ones still finish."""
        with self._lock:
            self.draining = True

    def stop(self) -> None:
        """Finish whatever is queued, then end the loop thread."""
        self.drain()
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                new, _ = list(self._inbox), self._inbox.clear()
            for request in new:
                try:
                    engine.add(request)
                except ValueError as error:  # `submit` checked it; only a changed engine gets here
                    request.error, request.stats.finish_reason = str(error), "error"
                    request.finished = True
                    request.on_update(request, [])
            if engine.has_work:
                try:
                    engine.step()
                except Exception as error:  # never leave a client waiting on a dead loop
                    traceback.print_exc()
                    self.scheduler.fail_all(f"internal error: {error}")
            elif self._stopping and not self._inbox:
                return
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def metrics_text(self) -> str:
        """/metrics: the scheduler's state now, then the request totals (nanojet.serve.metrics)."""
        scheduler, used, pages = self.scheduler, self.scheduler.kv_pages_used, self.llm.kv_cache.num_pages
        now = [("nanojet:num_requests_running", "gauge", "Requests in the decode batch.", len(scheduler.running)),
               ("nanojet:num_requests_waiting", "gauge", "Requests waiting for a place in the batch.", self.waiting),
               ("nanojet:kv_cache_usage_perc", "gauge", "Share of KV pages in use (0 to 1).", used / pages),
               ("nanojet:kv_cache_pages_used", "gauge", "KV pages in use.", used),
               ("nanojet:kv_cache_pages_total", "gauge", "KV pages in the pool.", pages),
               ("nanojet:num_preemptions_total", "counter", "Sequences preempted (pages freed, recomputed later).",
                scheduler.preemptions),
               ("nanojet:rounds_total", "counter", "Batched rounds (one target forward over every decoding sequence).",
                scheduler.rounds)]
        lines = [line for name, kind, description, value in now
                 for line in family(name, kind, description, [f"{name} {value}"])]
        return "\n".join(lines + self.metrics.exposition()) + "\n"
