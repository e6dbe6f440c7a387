"""Generation over token ids: prefill, speculative rounds (draft -> tree -> verify -> accept -> commit), stops.

Invariant between rounds (DESIGN.md section 1): the target's KV and the head's context hold positions
0 .. n-2; the anchor x_{n-1} (the last emitted token) has no KV yet. Plain decoding is the same round with a
one-node tree, so both modes share every line that decides which token comes next.
"""
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .head import DraftHead
from .kv_cache import KVCache, Sequence
from .qwen3 import Qwen3
from .round_runners import CompiledRunner, EagerRunner, GraphedRunner, RoundRunner
from .sampling import SamplingParams, sample
from .static_round import StaticRound
from .toolchain import check_toolchain
from .tree import accept, anchor_tree, build_tree, read_outcome, round_outcome

# How rounds run: "eager" builds each round's metadata on the host (the reference); "static" runs the static-shape
# round over persistent buffers without compiling (what the other modes build graphs of); "compiled" is
# torch.compile, inside one CUDA graph per round shape on CUDA; "graphed" is the CUDA graph alone (CUDA only).
EXECUTIONS = ("eager", "static", "compiled", "graphed")


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
                 head: DraftHead | None = None, execution: str = "eager"):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}; got {execution!r}")
        if execution == "graphed" and kv_cache.pool.device.type != "cuda":
            raise ValueError("execution 'graphed' needs CUDA (CUDA graphs); use 'compiled' on the CPU")
        check_toolchain(kv_cache.pool.device, execution)
        self.execution = execution
        self._runners: dict[tuple, RoundRunner] = {}
        self._graph_memory_pool = None
        self.target = target
        self.head = head
        self.kv = kv_cache
        self.profile = False  # on CUDA: synchronize to time each part of a round (GenerationStats.time_split)
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.num_target_layers = target.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.kv.pool.device

    def _timed(self, stats: GenerationStats, part: str, start: float) -> float:
        if self.device.type == "cuda":
            if not self.profile:
                return start  # a split needs a device sync per part; off the hot path unless asked for
            torch.cuda.synchronize()
        now = time.perf_counter()
        stats.time_split[part] += now - start
        return now

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
            stats.target_forwards = 1
            start = time.perf_counter()
            runner = None
            while True:
                new = self._truncate(new, len(prompt_ids), len(emitted), params, stats)
                emitted += new
                if on_tokens and new:
                    on_tokens(new)
                if stats.finish_reason:
                    break
                if self.execution == "eager":
                    new = self._round(sequence, torch.tensor(emitted[-1], device=self.device), params,
                                      spec if drafting else None, taps, stats)
                    continue
                if runner is None:
                    runner = self.runner(spec if drafting else None, params)
                    runner.round.begin(sequence, emitted[-1], params.seed)
                new = self._static_round(runner, sequence, stats)
            stats.decode_s = time.perf_counter() - start - stats.compile_s
        finally:
            self.kv.free(sequence)
        stats.new_tokens = len(emitted)
        return Generation(token_ids=emitted, stats=stats)

    def _truncate(self, new: list[int], prompt_len: int, done: int, params: SamplingParams,
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
        n = len(prompt_ids)
        tokens = torch.tensor(prompt_ids, device=self.device)
        positions = torch.arange(n, device=self.device)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        meta = self.kv.step_metadata([sequence], [positions], [causal])
        hidden, taps = self.target(tokens, meta, self.kv.pool, tap_layers)
        sequence.length = n
        if tap_layers:
            self.head.extend_context(taps, positions, meta.slot_mapping, self._head_pool())
        logits = self.target.logits(hidden[-1:])
        if first_token_ids:
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[:, first_token_ids] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        return sample(logits, positions[-1:] + 1, params)[0]

    def _head_pool(self) -> torch.Tensor:
        return self.kv.pool[self.num_target_layers:]

    def _draft(self, sequence: Sequence, anchor: torch.Tensor) -> torch.Tensor:
        """One head forward over `[anchor, MASK x (B-1)]` -> draft log-probs `[B-1, V]` (row d-1: depth d)."""
        block_size = self.head.config.block_size
        block = torch.full((block_size,), self.head.config.mask_token_id, device=self.device)
        block[0] = anchor
        positions = sequence.length + torch.arange(block_size, device=self.device)
        meta = self.kv.step_metadata([sequence], [positions], [self.head.block_visibility()])
        hidden = self.head(self.target.embed_tokens(block), meta, self._head_pool())
        return torch.log_softmax(self.target.logits(hidden[1:]), dim=-1)

    def _round(self, sequence: Sequence, anchor: torch.Tensor, params: SamplingParams,
               spec: SpeculativeParams | None, tap_layers: tuple[int, ...], stats: GenerationStats) -> list[int]:
        start = time.perf_counter()
        if spec is None:
            tree = anchor_tree(anchor)
        else:
            logprobs = self._draft(sequence, anchor)
            start = self._timed(stats, "draft", start)
            tree = build_tree(anchor, logprobs, spec.budget, spec.width, spec.depth)
            start = self._timed(stats, "tree", start)

        positions = sequence.length + tree.depths  # the anchor sits at n-1 = sequence.length
        meta = self.kv.step_metadata([sequence], [positions], [tree.visibility], packed=True)
        hidden, taps = self.target(tree.tokens, meta, self.kv.pool, tap_layers)
        choices = sample(self.target.logits(hidden), positions + 1, params)  # the target's token after each node
        start = self._timed(stats, "verify", start)

        path, count = accept(tree, choices)  # path is padded past `count` with its last node
        count, emitted = read_outcome(round_outcome(tree, choices, path, count).tolist())  # the one host read
        path = path[:count]
        start = self._timed(stats, "accept", start)

        self.kv.commit(sequence, path, num_layers=self.num_target_layers)
        if spec is not None:
            self.head.extend_context(taps[path], positions[path], meta.slot_mapping[:count], self._head_pool())
        self._timed(stats, "commit", start)
        stats.rounds += 1
        stats.target_forwards += 1
        stats.accept_hist[count] += 1
        return emitted

    def runner(self, spec: SpeculativeParams | None, params: SamplingParams) -> RoundRunner:
        """The runner of static rounds for this tree shape and sampling mode (built once, reused)."""
        key = self.runner_key(spec, params)
        if key not in self._runners:
            static_round = StaticRound(self.target, self.head, self.kv, spec, params)
            runner = CompiledRunner(static_round) if self.execution == "compiled" else EagerRunner(static_round)
            if self.device.type == "cuda" and self.execution in ("compiled", "graphed"):
                if self._graph_memory_pool is None:
                    self._graph_memory_pool = torch.cuda.graph_pool_handle()
                runner = GraphedRunner(runner, self._graph_memory_pool)
            self._runners[key] = runner
        return self._runners[key]

    @staticmethod
    def runner_key(spec: SpeculativeParams | None, params: SamplingParams) -> tuple:
        """What a compiled round is specialised on: the tree shape and the sampling mode (not the seed)."""
        return (None if spec is None else (spec.budget, spec.width, spec.depth),
                params.temperature, params.top_k, params.top_p)

    def _static_round(self, runner: RoundRunner, sequence: Sequence, stats: GenerationStats) -> list[int]:
        table = runner.round.table(sequence)
        compiles, start = runner.compiles, time.perf_counter()
        count, emitted = read_outcome(runner(table).tolist())  # the round's one host read
        if runner.compiles > compiles:
            stats.compile_s += time.perf_counter() - start
            stats.compiles += runner.compiles - compiles
            stats.recompiles += runner.calls > 1  # the first call builds the graph; any later build is a miss
        runner.round.finish(sequence, count)
        stats.rounds += 1
        stats.target_forwards += 1
        stats.accept_hist[count] += 1
        return emitted
