"""One generation request: what to generate (prompt, `SamplingParams`, `SpeculativeParams`), its progress, what it
reports (`GenerationStats`) and the rule that ends it (`Request.cut`)."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.logprobs import TokenLogprobs
from nanojet.engine.sampling import SamplingParams


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
    prefill_s: float = 0.0  # arrival to first token (queueing included)
    decode_s: float = 0.0   # first token to finish, less compile_s
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
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when `SamplingParams.logprobs` asked


@dataclass(eq=False)
class Request:
    """One generation: what to generate, and its progress (owned by the engine's thread). `spec` None (or a
    budget of 1): plain decoding."""
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    spec: SpeculativeParams | None = None
    first_token_ids: list[int] | None = None  # token healing: the first token must be one of these
    # Called on the engine's thread with each batch of final ids, and once more with [] when it finishes.
    on_update: Callable[["Request", list[int]], None] | None = None
    # Set by `Engine.add` from the round's shape: target tokens one of its rounds verifies (the padded tree), and
    # KV slots past the committed ones a round writes (that tree, or the head's draft block).
    round_tokens: int = 1
    scratch_slots: int = 1
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # one per output id when params.logprobs is set ([] until then)
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

    def __post_init__(self) -> None:
        if self.spec is not None and self.spec.budget == 1:
            self.spec = None  # a one-node tree is plain decoding
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def context(self) -> list[int]:
        """The tokens whose K/V must be in the pool before a round: all committed tokens but the anchor."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def ready(self) -> bool:
        """Prefilled and holding an anchor: it can take part in a round."""
        return bool(self.output_ids) and self.prefilled == len(self.prompt_ids) + len(self.output_ids) - 1

    def cancel(self) -> None:
        """Ask the engine to stop this request (any thread); it is dropped before the next round."""
        self.cancelled = True

    def cut(self, tokens: list[int], eos_token_ids: set[int], max_model_len: int) -> list[int]:
        """The stop rule: cut newly final tokens at EOS (kept in the ids), max_new_tokens or the context limit, and
        record why in `stats.finish_reason`."""
        done = len(self.output_ids)
        for i, token in enumerate(tokens):
            if token in eos_token_ids and not self.params.ignore_eos:
                self.stats.finish_reason = "eos"
            elif done + i + 1 == self.params.max_new_tokens:
                self.stats.finish_reason = "length"
            elif len(self.prompt_ids) + done + i + 1 == max_model_len:
                self.stats.finish_reason = "context"
            else:
                continue
            return tokens[:i + 1]
        return tokens
