"""Token choice: greedy, or temperature / top-k / top-p sampling with noise keyed by (seed, position).

Sampling is Gumbel-max: `argmax(filtered_logits / T + g)` where the Gumbel noise `g` over the vocabulary is a
pure function of `(seed, absolute position of the token being chosen)`. Every tree node at the same depth
therefore sees the same noise as plain decoding at that position, which makes speculative decoding emit the
very same tokens as plain decoding for a given seed, at any temperature.
"""
import math
import numbers
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
NOISE_CHUNK_ELEMENTS = 1 << 21  # int64 temporaries of at most 16 MB while hashing noise
MAX_LOGIT_BIAS = 300  # biased tokens per request (OpenAI's limit); a biased round holds this many per row
MAX_LOGPROBS = 20     # alternatives per generated token (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    """How a request's tokens are chosen. `logit_bias` ({token id: -100..100}) is added to the target's logits
    before anything else (temperature, top-k, top-p, greedy); ids must lie in the model's vocabulary (checked
    when the request is added). `logprobs` None returns none; k returns each generated token's log-probability
    and the k likeliest alternatives (0..20), under the target's raw distribution (nanojet/engine/logprobs.py)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 128
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        # Checked here, not where they are used: a NaN temperature or a float top_k would otherwise sample
        # token 0 forever or fail deep inside a round with a message about tensors.
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"SamplingParams: {name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("top_k", "seed", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"SamplingParams: {name} must be an integer, got {value!r}")
            setattr(self, name, int(value))  # a numpy integer becomes a plain int
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"SamplingParams: seed must be in [0, 2^31), got {self.seed}")
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, numbers.Integral) or not (
                    0 <= self.logprobs <= MAX_LOGPROBS):
                raise ValueError(f"SamplingParams: logprobs must be None or an integer in 0..{MAX_LOGPROBS} (the "
                                 f"alternatives returned per token), got {self.logprobs!r}")
            self.logprobs = int(self.logprobs)
        self.logit_bias = _checked_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _checked_logit_bias(bias) -> dict[int, float] | None:
    """{token id: bias} with plain ints and floats, or None when there is none (an empty dict biases nothing)."""
    if not bias:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"SamplingParams: logit_bias must be a dict of at most {MAX_LOGIT_BIAS} {{token id: bias}} "
                         f"entries, got {bias!r:.80}")
    checked = {}
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"SamplingParams: logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or not -100 <= value <= 100):
            raise ValueError(f"SamplingParams: logit_bias values must be numbers in [-100, 100], got {value!r} for "
                             f"token {token}")
        checked[int(token)] = float(value)
    return checked


def bias_logits(logits: torch.Tensor, token_ids: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """logits `[N, V]` -> fp32 logits with `biases` `[N, M]` fp32 added at `token_ids` `[N, M]` int64 (the one
    definition of the logit bias: a request's first token and every round's rows go through it). Unused entries
    are id 0 with bias 0.0, which adds nothing: x + 0.0 is x, in any order."""
    return logits.float().scatter_add(-1, token_ids, biases)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 lanes (multipliers < 2^27, so products never overflow int64)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def gumbel_noise(seed: int | torch.Tensor, positions: torch.Tensor, vocab_size: int,
                 chunk_elements: int = NOISE_CHUNK_ELEMENTS) -> torch.Tensor:
    """`[N, V]` fp32 Gumbel noise; row i depends only on (seed, positions[i]). A 0-dim tensor seed keeps the
    value out of a compiled graph's constants (one graph serves every seed).

    The 32-bit hash runs on int64 lanes, about ten `[N, V]` int64 temporaries if done in one go (622 MB each at
    N=512, V=151,936), so it runs over column chunks of about `chunk_elements` elements instead; the values do
    not depend on the chunking. A decode step (N=1) still takes the whole vocabulary in one chunk."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=positions.device)
    row = _mix32((_mix32(positions.long() & _MASK32) ^ _mix32(seed)))[:, None] * 0x01000193  # [N, 1]
    noise = torch.empty(positions.shape[0], vocab_size, dtype=torch.float32, device=positions.device)
    columns_per_chunk = max(1024, chunk_elements // max(1, positions.shape[0]))
    for start in range(0, vocab_size, columns_per_chunk):
        end = min(vocab_size, start + columns_per_chunk)
        column = torch.arange(start, end, device=positions.device, dtype=torch.int64)
        bits = _mix32((row + column * 0x9E3779B1) & _MASK32)  # [N, chunk]
        uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # 24 random bits, strictly inside (0, 1)
        noise[:, start:end] = -torch.log(-torch.log(uniform))
    return noise


def sample(logits: torch.Tensor, positions: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits `[N, V]` of the rows that choose the tokens at `positions` `[N]` -> token ids `[N]` int64, every row
    with `params`: `sample_rows` with the same parameters on each row (one implementation of the filters)."""
    rows = logits.shape[0]

    def each(value, dtype):
        return torch.full((rows,), value, dtype=dtype, device=logits.device)
    return sample_rows(logits, positions, each(params.temperature, torch.float32), each(params.top_k, torch.int64),
                       each(params.top_p, torch.float32), each(params.seed, torch.int64))


def sample_rows(logits: torch.Tensor, positions: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """logits `[N, V]` -> token ids `[N]` int64, with parameters per row (`[N]` tensors each; temperature 0:
    greedy), so sequences with different sampling parameters share one batched round and one graph: temperature,
    then top-k (the k-th largest logit is the threshold; 0: off), then top-p (a token is dropped when the tokens
    ranked above it already reach top_p; the first always stays), then Gumbel-max with noise keyed by (seed,
    position)."""
    sampled = temperature > 0
    scaled = logits.float() / torch.where(sampled, temperature, 1.0)[:, None]
    vocab_size = logits.shape[-1]
    # top-k, with k per row: the k-th largest value is the threshold (0: no filter).
    k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size)
    kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    # top-p likewise; rows at top_p 1 keep every token (rounding in the cumulative sum must not drop the tail).
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    filtered = scaled.masked_fill(drop, float("-inf"))
    noise = gumbel_noise(seed, positions, vocab_size)
    return torch.where(sampled, noise.add_(filtered).argmax(dim=-1), logits.argmax(dim=-1))
