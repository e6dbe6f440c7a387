"""Generation over token ids: prefill, speculative rounds (draft -> tree -> verify -> accept -> commit), stops.

Invariant between rounds (DESIGN.md section 1): the target's KV and the head's context hold positions
0 .. n-2; the anchor x_{n-1} (the last emitted token) has no KV yet. Every round is `StaticRound.step` (run
eagerly, torch.compile'd or as a CUDA graph); plain decoding is the same round with a one-node tree, so both
modes share every line that decides which token comes next. Prefill runs the prompt through the paged forward in
chunks, each seeing the whole prefix and itself causally, so nothing grows with the square of the prompt.
"""
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanojet.engine.kv_cache import AttentionMetadata, KVCache, Sequence
from nanojet.engine.round import StaticRound
from nanojet.engine.runners import CompiledRunner, EagerRunner, GraphedRunner, RoundRunner
from nanojet.engine.sampling import SamplingParams, sample
from nanojet.engine.toolchain import check_toolchain
from nanojet.engine.tree import read_outcome
from nanojet.model.head import DraftHead
from nanojet.model.qwen3 import Qwen3

# How rounds run: "eager" runs the static round as plain Python (the CPU default; --enforce-eager on CUDA);
# "graphed" captures it as one CUDA graph per round shape (the CUDA default); "compiled" is torch.compile, inside
# one CUDA graph per round shape on CUDA.
EXECUTIONS = ("eager", "compiled", "graphed")
DEFAULT_PREFILL_CHUNK = 512


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


@dataclass
class SpeculativeParams:
    budget: int = 64         # tree nodes per round, anchor included
    width: int = 4           # candidates per depth (children per node)
    depth: int | None = None  # tree depth limit; None: the head's block_size - 1

    def __post_init__(self) -> None:
        if self.budget < 1 or self.width < 1 or (self.depth is not None and self.depth < 1):
            raise ValueError(f"speculative params: need budget >= 1, width >= 1, depth >= 1; got {self}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    rounds: int = 0
    target_forwards: int = 0
    accept_hist: Counter = field(default_factory=Counter)  # accepted tokens per round (bonus included) -> rounds
    time_split: Counter = field(default_factory=Counter)   # draft / tree / verify / accept / commit seconds
    finish_reason: str = ""
    compile_s: float = 0.0  # rounds that compiled or captured a graph (not in decode_s)
    compiles: int = 0       # graphs built during this generation
    recompiles: int = 0     # of those, graphs built for a round shape that had been built before (should be 0)

    @property
    def accept_len(self) -> float:
        """tau: mean tokens emitted per round, the bonus token included."""
        return sum(k * n for k, n in self.accept_hist.items()) / max(1, self.rounds)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


@dataclass
class Generation:
    token_ids: list[int]
    stats: GenerationStats


class Engine:
    def __init__(self, target: Qwen3, kv_cache: KVCache, max_model_len: int, eos_token_ids: list[int],
                 head: DraftHead | None = None, execution: str = "eager",
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}; got {execution!r}")
        if execution == "graphed" and kv_cache.pool.device.type != "cuda":
            raise ValueError("execution 'graphed' needs CUDA (CUDA graphs); use 'compiled' on the CPU")
        check_toolchain(kv_cache.pool.device, execution)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self.execution = execution
        self.prefill_chunk = prefill_chunk
        self._runners: dict[tuple, RoundRunner] = {}
        self._graph_memory_pool = None
        self.target = target
        self.head = head
        self.kv = kv_cache
        # Eager rounds time each part (GenerationStats.time_split): always on the CPU, where a clock read is free;
        # on CUDA only when asked, since each part then waits for the device.
        self.profile = False
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.num_target_layers = target.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.kv.pool.device

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, spec: SpeculativeParams | None = None,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 first_token_ids: list[int] | None = None) -> Generation:
        """Generate up to `params.max_new_tokens` ids after `prompt_ids`; `spec=None` (or no head) decodes plainly.

        `on_tokens` receives each round's emitted ids as soon as they are final (for streaming).
        `first_token_ids` restricts the first generated token (token healing)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_model_len} "
                             f"(prompt + at least one new token); shorten it or raise max_model_len")
        if spec is not None and self.head is None:
            raise ValueError("speculative decoding needs a draft head; load one or decode plainly")
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        drafting = spec is not None and spec.budget > 1
        taps = tuple(self.head.config.target_layer_ids) if drafting else ()
        sequence = Sequence()
        emitted: list[int] = []
        try:
            start = time.perf_counter()
            new = [int(self._prefill(sequence, prompt_ids, params, taps, first_token_ids))]  # (a host read)
            stats.prefill_s = time.perf_counter() - start
            stats.target_forwards = -(-len(prompt_ids) // self.prefill_chunk)
            start = time.perf_counter()
            runner = None
            while True:
                new = self.truncate(new, len(prompt_ids), len(emitted), params, stats)
                emitted += new
                if on_tokens and new:
                    on_tokens(new)
                if stats.finish_reason:
                    break
                if runner is None:
                    runner = self.runner(spec if drafting else None, not params.greedy)
                    runner.round.begin(0, sequence, emitted[-1], params)
                    timed = self.execution == "eager" and (self.profile or self.device.type == "cpu")
                    runner.round.time_split = stats.time_split if timed else None
                new = self._round(runner, sequence, stats)
            stats.decode_s = time.perf_counter() - start - stats.compile_s
        finally:
            self.kv.free(sequence)
        stats.new_tokens = len(emitted)
        return Generation(token_ids=emitted, stats=stats)

    def truncate(self, new: list[int], prompt_len: int, done: int, params: SamplingParams,
                  stats: GenerationStats) -> list[int]:
        """Cut a round's tokens at EOS (kept), max_new_tokens or the context limit, and record why."""
        for i, token in enumerate(new):
            if token in self.eos_token_ids and not params.ignore_eos:
                stats.finish_reason = "eos"
                return new[:i + 1]
            if done + i + 1 == params.max_new_tokens:
                stats.finish_reason = "length"
                return new[:i + 1]
            if prompt_len + done + i + 1 == self.max_model_len:
                stats.finish_reason = "context"
                return new[:i + 1]
        return new

    def _prefill(self, sequence: Sequence, prompt_ids: list[int], params: SamplingParams,
                 tap_layers: tuple[int, ...], first_token_ids: list[int] | None = None) -> torch.Tensor:
        """Prefill the prompt and sample the first new token (restricted to `first_token_ids` when given)."""
        logits = self.prefill(sequence, prompt_ids, tap_layers)
        if first_token_ids:
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[:, first_token_ids] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        return sample(logits, torch.full((1,), len(prompt_ids), device=self.device), params)[0]

    def prefill(self, sequence: Sequence, prompt_ids: list[int], tap_layers: tuple[int, ...] = ()) -> torch.Tensor:
        """Run the prompt through the paged forward in chunks of `prefill_chunk` tokens, each seeing the whole prefix
        and itself causally (the head's context grows chunk by chunk when `tap_layers` are given); returns the
        logits `[1, V]` after the last prompt token."""
        n, device = len(prompt_ids), self.device
        self.kv.reserve(sequence, n)
        tokens = torch.tensor(prompt_ids, device=device)
        slot_mapping = self.kv.slots(sequence, 0, n)
        block_table = self.kv.block_table(sequence).to(device)[None]  # [1, max_pages]
        for start in range(0, n, self.prefill_chunk):
            end = min(n, start + self.prefill_chunk)
            positions = torch.arange(start, end, device=device)
            meta = AttentionMetadata(
                positions=positions, slot_mapping=slot_mapping[start:end], block_tables=block_table,
                prefix_lens=torch.full((1,), start, dtype=torch.int32, device=device),
                query_starts=torch.tensor([0, end - start], dtype=torch.int32, device=device),
                visibility=causal_visibility(end - start, device))
            hidden, taps = self.target(tokens[start:end], meta, self.kv.pool, tap_layers)
            if tap_layers:
                self.head.extend_context(taps, positions, meta.slot_mapping, self._head_pool())
            sequence.length = end
        return self.target.logits(hidden[-1:])

    def _head_pool(self) -> torch.Tensor:
        return self.kv.pool[self.num_target_layers:]

    def runner(self, spec: SpeculativeParams | None, sampled: bool, num_sequences: int = 1) -> RoundRunner:
        """The runner of static rounds for this tree shape, greedy or sampled, over `num_sequences` rows (built
        once, reused)."""
        key = self.runner_key(spec, sampled, num_sequences)
        if key not in self._runners:
            static_round = StaticRound(self.target, self.head, self.kv, spec, sampled, num_sequences)
            if self.execution == "eager":
                static_round.pack_weights()
            runner = CompiledRunner(static_round) if self.execution == "compiled" else EagerRunner(static_round)
            if self.device.type == "cuda" and self.execution in ("compiled", "graphed"):
                if self._graph_memory_pool is None:
                    self._graph_memory_pool = torch.cuda.graph_pool_handle()
                runner = GraphedRunner(runner, self._graph_memory_pool)
            self._runners[key] = runner
        return self._runners[key]

    @staticmethod
    def runner_key(spec: SpeculativeParams | None, sampled: bool, num_sequences: int = 1) -> tuple:
        """What a compiled round is specialised on: the tree shape, whether it samples (not the sampling
        parameters, which are per-row tensors) and the number of rows."""
        return None if spec is None else (spec.budget, spec.width, spec.depth), sampled, num_sequences

    def _round(self, runner: RoundRunner, sequence: Sequence, stats: GenerationStats) -> list[int]:
        """One round on the host: reserve scratch and stage new pages, run the step, read its outcome (the one
        host read), trim the scratch the round did not keep."""
        table = runner.round.table([sequence])
        compiles, start = runner.compiles, time.perf_counter()
        count, emitted = read_outcome(runner(table).tolist()[0])  # the round's one host read
        if runner.compiles > compiles:
            stats.compile_s += time.perf_counter() - start
            stats.compiles += runner.compiles - compiles
            stats.recompiles += runner.calls > 1  # the first call builds the graph; any later build is a miss
        runner.round.finish([sequence], [count])
        stats.rounds += 1
        stats.target_forwards += 1
        stats.accept_hist[count] += 1
        return emitted
