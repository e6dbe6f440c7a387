"""The engine: requests in, tokens out, one path for every generation.

`step` does, between rounds: drop cancelled requests, admit waiting ones, prefill chunks of admitted prompts
(several requests in one target forward), then run ONE round (`StaticRound.step`: draft -> tree -> verify ->
accept -> commit) over every ready request, padded to a batch-size bucket with inert rows, and emit what each
accepted. A single prompt (`generate`) is a batch of one; `LLM`, the server and the benchmarks all step here.
Who waits, who runs and who is preempted is the `Scheduler`'s bookkeeping; this file runs the forwards.

Invariant between rounds: a request's target KV and head context hold positions 0 .. n-2 of its n committed
tokens; the anchor x_{n-1} (the last emitted token) has no KV yet. Each request keeps its own sampling parameters
and seed (per-row tensors in the round), its own tree and stop conditions, so its ids are exactly what it
produces alone: a token depends only on the committed prefix and (seed, position).
"""
import itertools
import time
from typing import Callable

import torch

from nanojet.engine.kv_cache import KVCache, KVCacheExhausted, Sequence
from nanojet.engine.logprobs import TokenLogprobs, logprob_words, read_logprobs
from nanojet.engine.request import Generation, Request, SpeculativeParams
from nanojet.engine.round import StaticRound, round_scratch_slots, round_tree
from nanojet.engine.runners import (
    CompiledRunner,
    EagerRunner,
    GraphedRunner,
    RoundRunner,
)
from nanojet.engine.sampling import SamplingParams, bias_logits, sample
from nanojet.engine.scheduler import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_STEP_TOKENS,
    Scheduler,
)
from nanojet.engine.toolchain import check_toolchain
from nanojet.engine.tree import read_outcome, tree_bucket
from nanojet.model.attention import AttentionMetadata
from nanojet.model.head import DraftHead
from nanojet.model.qwen3 import Qwen3

# How rounds run: "eager" runs the static round as plain Python (the CPU default; --enforce-eager on CUDA);
# "graphed" captures it as one CUDA graph per round shape (the CUDA default); "compiled" is torch.compile, inside
# one CUDA graph per round shape on CUDA.
EXECUTIONS = ("eager", "compiled", "graphed")
SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows of a batched round: one graph per bucket


def default_execution(device: torch.device, compile: bool = False, enforce_eager: bool = False) -> str:
    """What runs the rounds when the user says nothing: CUDA graphs on CUDA, eager on the CPU; `compile` adds
    torch.compile (inside the graphs on CUDA); `enforce_eager` opts out of graphs (vLLM's name)."""
    if compile:
        return "compiled"
    return "graphed" if device.type == "cuda" and not enforce_eager else "eager"


def causal_visibility(count: int, device: torch.device) -> torch.Tensor:
    """Bit words `[count, ceil(count/32)]` of a causal chain over `count` new tokens, built straight from the
    bit arithmetic (no `[count, count]` mask on the way)."""
    row = torch.arange(count, device=device)[:, None]
    word_start = 32 * torch.arange(-(-count // 32), device=device)[None, :]
    visible_bits = (row + 1 - word_start).clamp(0, 32)  # bits 0 .. visible-1 of each word are set
    words = (1 << visible_bits) - 1  # int64, < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def sequence_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes rounds are built for: powers of two below `max_num_seqs`, then `max_num_seqs` itself."""
    return [b for b in SEQUENCE_BUCKETS if b < max_num_seqs] + [max_num_seqs]


class Engine:
    def __init__(self, target: Qwen3, kv_cache: KVCache, max_model_len: int, eos_token_ids: list[int],
                 head: DraftHead | None = None, execution: str = "eager",
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_num_seqs: int = 1,
                 step_tokens: int = DEFAULT_STEP_TOKENS):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}; got {execution!r}")
        if execution == "graphed" and kv_cache.pool.device.type != "cuda":
            raise ValueError("execution 'graphed' needs CUDA (CUDA graphs); use 'compiled' on the CPU")
        check_toolchain(kv_cache.pool.device, execution)
        self.target, self.head, self.kv = target, head, kv_cache
        self.scheduler = Scheduler(kv_cache, max_num_seqs, step_tokens, prefill_chunk)
        self.execution = execution
        # Compiled rounds run the target's layers through one compiled layer (compile time flat in depth) where a
        # CUDA graph hides the loop over them; on the CPU the loop's calls cost more than compiling saves.
        self.compile_layerwise = kv_cache.pool.device.type == "cuda"
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.num_target_layers = target.config.num_hidden_layers
        # Eager rounds time each part (GenerationStats.time_split) of a lone request: always on the CPU, where a
        # clock read is free; on CUDA only when asked, since each part then waits for the device.
        self.profile = False
        self._runners: dict[tuple, RoundRunner] = {}
        self._graph_memory_pool = None
        self._row_owners: list = []  # (request, preemptions) per row of the runner used last
        self._last_runner = None

    @property
    def device(self) -> torch.device:
        return self.kv.pool.device

    @property
    def prefill_chunk(self) -> int:
        return self.scheduler.prefill_chunk

    # --- requests --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, spec: SpeculativeParams | None = None,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 first_token_ids: list[int] | None = None) -> Generation:
        """One prompt, as a batch of one. `spec=None` decodes plainly; `on_tokens` receives each round's final ids
        (streaming); `first_token_ids` restricts the first generated token (token healing)."""
        stream = None if on_tokens is None else lambda _, tokens: tokens and on_tokens(tokens)
        request = Request(list(prompt_ids), params, spec, first_token_ids, on_update=stream)
        self.run([request])
        if request.error:
            raise RuntimeError(request.error)
        return Generation(request.output_ids, request.stats, request.logprobs)

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> list[Request]:
        """Add `requests` (all are checked before any is queued) and step until every one has finished. If a step
        raises, the requests are retired with the error before it propagates, so their pages return."""
        for request in requests:
            self.check(request)
        for request in requests:
            self.add(request)
        try:
            while not all(r.finished for r in requests):
                self.step()
        except BaseException as error:
            for request in requests:
                if not request.finished:
                    self.scheduler.fail(request, f"interrupted: {error!r}")
            raise
        return requests

    def check(self, request: Request) -> None:
        """Raise ValueError, saying what to change, when the request could never run: the one admission rule."""
        n, new_tokens = len(request.prompt_ids), request.params.max_new_tokens
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but the context holds {self.max_model_len} "
                             f"(prompt + at least one new token); shorten it or raise max_model_len")
        vocab = self.target.config.vocab_size
        outside = [token for token in request.params.logit_bias or {} if token >= vocab]
        if outside:
            raise ValueError(f"logit_bias token id {outside[0]} is outside the vocabulary (0..{vocab - 1})")
        if request.spec is not None and self.head is None:
            raise ValueError("speculative decoding needs a draft head; load one or decode plainly")
        if request.spec is not None and request.spec.width > self.draft_vocab_size:
            raise ValueError(f"width {request.spec.width} exceeds the head's draft vocabulary "
                             f"({self.draft_vocab_size} tokens); lower the width")
        scratch = self.scratch_slots(request.spec)
        # The last round starts with at most min(n + new_tokens, max_model_len) - 1 committed slots.
        pages = self.scheduler.pages(min(n + new_tokens, self.max_model_len) - 1 + scratch)
        if pages > self.kv.num_pages:
            raise ValueError(f"the prompt ({n} tokens) + max_new_tokens ({new_tokens}) + a round's scratch "
                             f"({scratch} slots) need {pages} KV pages of {self.kv.kv_page_size} tokens, but the "
                             f"KV pool has {self.kv.num_pages}; raise --kv-memory-gb (LLM kv_memory_gb), or leave "
                             f"it unset to size the pool for --max-model-len, or ask for fewer new tokens")

    @property
    def draft_vocab_size(self) -> int:
        """Tokens the head can draft: its draft vocabulary, or the target's whole vocabulary."""
        vocab = self.head.draft_vocab
        return self.target.config.vocab_size if vocab is None else len(vocab)

    def add(self, request: Request) -> Request:
        """Queue a request; raises ValueError when it could never run (`check`)."""
        self.check(request)
        request.round_tokens = tree_bucket(self._round_nodes(request.spec))
        request.scratch_slots = self.scratch_slots(request.spec)
        self.scheduler.add(request)
        return request

    def _round_nodes(self, spec: SpeculativeParams | None) -> int:
        return round_tree(spec, self.head.config.block_size if spec else 0)[1]

    def scratch_slots(self, spec: SpeculativeParams | None) -> int:
        """KV slots past the committed ones that one round writes: the padded tree or the head's draft block,
        whichever is wider; one for plain decoding."""
        spec = None if spec is None or spec.budget == 1 else spec
        return round_scratch_slots(self._round_nodes(spec), self.head.config.block_size if spec else 0)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # --- one step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit, prefill chunks under the budget, run one round over the ready ones."""
        self.scheduler.drop_cancelled()
        self.scheduler.admit()
        chunks = self.scheduler.prefill_chunks()
        if chunks:
            self._prefill(chunks)
        specs = []
        for request in self.scheduler.running:
            if request.ready and request.spec not in specs:
                specs.append(request.spec)
        for spec in specs:  # requests of one tree shape share a round
            self._round(spec)

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        """One target forward over every chunk; the first token of each prompt whose prefill ends here."""
        drafting = [request.spec is not None for request, _, _ in chunks]
        hidden, last_rows = self.forward_chunks([(r.sequence, r.context[start:end], start) for r, start, end in chunks],
                                                drafting)
        for (request, _, end), last in zip(chunks, last_rows):
            request.prefilled = end
            request.stats.target_forwards += 1
            if end == len(request.prompt_ids) and not request.output_ids:  # a fresh prompt is done
                logits = self.target.logits(hidden[last:last + 1])
                token = self.first_token(logits, request)
                self._emit(request, [int(token)], self._first_logprobs(logits, token, request))

    def first_token(self, logits: torch.Tensor, request: Request) -> torch.Tensor:
        """The token after the prompt, sampled as any other at its position (after the logit bias; limited to
        `first_token_ids`)."""
        bias = request.params.logit_bias
        if bias:
            logits = bias_logits(logits, torch.tensor([list(bias)], device=self.device),
                                 torch.tensor([list(bias.values())], dtype=torch.float32, device=self.device))
        if request.first_token_ids:
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[:, request.first_token_ids] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        position = torch.full((1,), len(request.prompt_ids), device=self.device)
        return sample(logits, position, request.params)[0]

    @staticmethod
    def _first_logprobs(logits: torch.Tensor, token: torch.Tensor, request: Request) -> list[TokenLogprobs] | None:
        """The first token's log-probs from the prefill's raw logits `[1, V]`, as a round computes them."""
        top = request.params.logprobs
        if top is None:
            return None
        return read_logprobs(logprob_words(logits, token.reshape(1), top)[0].tolist(), [int(token)], top, top)

    def forward_chunks(self, chunks: list[tuple[Sequence, list[int], int]],
                       drafting: list[bool]) -> tuple[torch.Tensor, list[int]]:
        """The prefill forward: `(sequence, tokens, start)` chunks (pages reserved through `start + len(tokens)`)
        in one target forward, each causal over itself after its whole prefix; the head's context grows by the
        chunks marked `drafting`. Returns the hidden states `[T, H]` and each chunk's last row."""
        device = self.device
        counts = [len(tokens) for _, tokens, _ in chunks]
        visibility = [causal_visibility(n, device) for n in counts]
        words = max(v.shape[1] for v in visibility)
        meta = AttentionMetadata(
            positions=torch.cat([torch.arange(start, start + n) for (_, _, start), n in zip(chunks, counts)]).to(device),
            slot_mapping=torch.cat([self.kv.slots(s, start, start + n) for (s, _, start), n in zip(chunks, counts)]),
            block_tables=torch.stack([self.kv.block_table(s) for s, _, _ in chunks]).to(device),
            prefix_lens=torch.tensor([start for *_, start in chunks], dtype=torch.int32, device=device),
            query_starts=torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device),
            visibility=torch.cat([torch.nn.functional.pad(v, (0, words - v.shape[1])) for v in visibility]))
        tokens = torch.tensor([t for _, chunk, _ in chunks for t in chunk], device=device)
        taps = tuple(self.head.config.target_layer_ids) if any(drafting) else ()
        hidden, tapped = self.target(tokens, meta, self.kv.pool, taps)
        if taps:
            rows = slice(None) if all(drafting) else torch.tensor(
                [row for d, n, start in zip(drafting, counts, itertools.accumulate([0, *counts])) if d
                 for row in range(start, start + n)], device=device)
            self.head.extend_context(tapped[rows], meta.positions[rows], meta.slot_mapping[rows],
                                     self.kv.pool[self.num_target_layers:])
        for (sequence, _, start), n in zip(chunks, counts):
            sequence.length = start + n
        return hidden, [end - 1 for end in itertools.accumulate(counts)]

    def prefill(self, sequence: Sequence, prompt_ids: list[int], extend_head: bool = False) -> torch.Tensor:
        """A prompt prefilled alone in chunks of `prefill_chunk` through `forward_chunks` (the head's context too
        when `extend_head`); returns the logits `[1, V]` after its last token."""
        self.kv.reserve(sequence, len(prompt_ids))
        for start in range(0, len(prompt_ids), self.prefill_chunk):
            chunk = prompt_ids[start:start + self.prefill_chunk]
            hidden, _ = self.forward_chunks([(sequence, chunk, start)], [extend_head])
        return self.target.logits(hidden[-1:])

    def _round(self, spec: SpeculativeParams | None) -> None:
        """One round over every ready request of this tree shape, padded with inert rows to a bucket."""
        while True:
            batch = [r for r in self.scheduler.running if r.ready and r.spec == spec]
            if not batch:
                return
            rows = next(b for b in sequence_buckets(self.scheduler.max_num_seqs) if b >= len(batch))
            sampled, biased, logprobs = self.round_options(batch)
            runner = self.runner(spec, sampled, rows, biased, logprobs)
            sequences = self._bind_rows(runner, batch)
            try:
                table = runner.round.table(sequences)
                break
            except KVCacheExhausted:
                self.scheduler.preempt(max(self.scheduler.running, key=lambda r: r.arrival))
        timed = len(batch) == 1 and self.execution == "eager" and (self.profile or self.device.type == "cpu")
        runner.round.time_split = batch[0].stats.time_split if timed else None
        compiles, start = runner.compiles, time.perf_counter()
        outcome = runner(table).tolist()  # the round's one host read, [rows, outcome_width]
        built = runner.compiles - compiles
        compile_s = time.perf_counter() - start if built else 0.0
        results = [self._read_row(runner.round, row, request) for row, request in zip(outcome, batch)]
        runner.round.finish(sequences, [count for count, _, _ in results] + [0] * (rows - len(batch)))
        self.scheduler.rounds += 1
        for request, (count, tokens, logprobs) in zip(batch, results):
            stats = request.stats
            stats.rounds += 1
            stats.target_forwards += 1
            stats.accept_hist[count] += 1
            if built:
                stats.compile_s += compile_s
                stats.compiles += built
                stats.recompiles += runner.calls > 1  # the first call builds the graph; any later build is a miss
            self.scheduler.accept_hist[count] += 1
            request.prefilled += count
            self._emit(request, tokens, logprobs)

    @staticmethod
    def round_options(batch: list[Request]) -> tuple[bool, bool, int | None]:
        """(sampled, biased, log-prob alternatives) of a round over `batch`: what any of its requests needs."""
        asked = [r.params.logprobs for r in batch if r.params.logprobs is not None]
        return (any(not r.params.greedy for r in batch), any(r.params.logit_bias for r in batch),
                max(asked) if asked else None)

    @staticmethod
    def _read_row(static_round: StaticRound, row: list[int], request: Request) -> tuple:
        """One row of a round's outcome -> (accepted count, emitted tokens, their log-probs or None)."""
        width = 1 + 2 * static_round.path_len
        count, tokens = read_outcome(row[:width])
        wanted = request.params.logprobs
        if wanted is None:
            return count, tokens, None
        return count, tokens, read_logprobs(row[width:], tokens, static_round.logprobs, wanted)

    def _bind_rows(self, runner: RoundRunner, batch: list[Request]) -> list[Sequence | None]:
        """Point the runner's rows at the batch (inert rows past it), re-binding only rows that changed owner."""
        rows = runner.round.num_sequences
        if runner is not self._last_runner:  # another runner's buffers: every row must be set again
            self._row_owners, self._last_runner = [None] * rows, runner
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
        return sequences

    def _emit(self, request: Request, tokens: list[int], logprobs: list[TokenLogprobs] | None = None) -> None:
        """Cut at the request's stop conditions, hand the ids (and their log-probs) over, retire it when it is
        done."""
        tokens = request.cut(tokens, self.eos_token_ids, self.max_model_len)
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
            request.stats.prefill_s = request.first_token_s - request.arrival_s
        request.output_ids += tokens
        if request.logprobs is not None:
            request.logprobs += logprobs[:len(tokens)]
        request.stats.new_tokens = len(request.output_ids)
        self.scheduler.generated_tokens += len(tokens)
        if request.on_update and tokens:
            request.on_update(request, tokens)
        if request.stats.finish_reason:
            self.scheduler.retire(request)

    # --- round runners ---------------------------------------------------------------------------------------

    def runner(self, spec: SpeculativeParams | None, sampled: bool, num_sequences: int = 1, biased: bool = False,
               logprobs: int | None = None) -> RoundRunner:
        """The runner of static rounds for this tree shape, greedy or sampled, over `num_sequences` rows, biased or
        not, with `logprobs` alternatives (None: no log-probs) (built once, reused)."""
        key = self.runner_key(spec, sampled, num_sequences, biased, logprobs)
        if key not in self._runners:
            static_round = StaticRound(self.target, self.head, self.kv, spec, sampled, num_sequences, biased,
                                       logprobs)
            if self.execution == "eager":
                static_round.pack_weights()
            runner = (CompiledRunner(static_round, self.compile_layerwise) if self.execution == "compiled"
                      else EagerRunner(static_round))
            if self.device.type == "cuda" and self.execution in ("compiled", "graphed"):
                if self._graph_memory_pool is None:
                    self._graph_memory_pool = torch.cuda.graph_pool_handle()
                runner = GraphedRunner(runner, self._graph_memory_pool)
            self._runners[key] = runner
        return self._runners[key]

    @staticmethod
    def runner_key(spec: SpeculativeParams | None, sampled: bool, num_sequences: int = 1, biased: bool = False,
                   logprobs: int | None = None) -> tuple:
        """What a compiled round is specialised on: the tree shape, whether it samples, the number of rows, whether
        it biases (not the sampling parameters or the biases, which are per-row tensors) and the log-prob
        alternatives."""
        tree = None if spec is None else (spec.budget, spec.width, spec.depth)
        return tree, sampled, num_sequences, biased, logprobs
