"""Log-probabilities of generated tokens: what a request with `SamplingParams.logprobs` gets back with its ids.

They are the target's raw distribution at each token's position: log_softmax of the model's logits, before the
logit bias, temperature, top-k and top-p (vLLM's default), so they say how likely the model found a token
whatever chose it. A round computes them from the verify logits of its accepted path's rows, plain decoding from
its one row and the first token from the prefill's last row, all with `logprob_words`, from the very logits the
token was chosen from. With and without speculation they are bit-identical where the target is row-invariant (the
CUDA kernels, docs/architecture.md); on the CPU they agree to fp32 rounding, not bit for bit: a tree's verify
forward and a one-token step multiply matrices of different row counts, which round differently in the last bits
(the tokens do not change).

In a round they travel in the round's one host read: each path row appends `1 + 2K` int64 words to the outcome
(the chosen token's log-prob, the K likeliest ids, their log-probs), fp32 values bit-cast to int32 and widened,
and `read_logprobs` turns them back into floats on the host.
"""
import struct
from dataclasses import dataclass

import torch


@dataclass
class TokenLogprobs:
    """The target's log-probabilities at one generated position."""
    token_id: int
    logprob: float                # of `token_id`, the token generated there
    top: list[tuple[int, float]]  # (id, log-prob) of the likeliest tokens, likeliest first (as many as asked)


def logprob_words(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """Raw logits `[N, V]` and the tokens chosen after them `[N]` -> int64 `[N, 1 + 2 * top]`: each token's
    log-prob, the `top` likeliest ids, their log-probs (fp32 bits). log-prob = logit - logsumexp: no `[N, V]`
    log-softmax is kept."""
    logits = logits.float()
    normalizer = logits.logsumexp(dim=-1, keepdim=True)  # [N, 1]
    chosen = _words(logits.gather(-1, tokens[:, None]) - normalizer)  # [N, 1]
    if top == 0:
        return chosen
    top_logits, top_ids = logits.topk(top, dim=-1)  # [N, top] each
    return torch.cat([chosen, top_ids, _words(top_logits - normalizer)], dim=-1)


def _words(values: torch.Tensor) -> torch.Tensor:
    """fp32 values as int64 words holding their bits (exact, and the outcome's dtype)."""
    return values.view(torch.int32).long()


def read_logprobs(words: list[int], tokens: list[int], top: int, wanted: int) -> list[TokenLogprobs]:
    """`logprob_words` read back for the rows of `tokens` (`1 + 2 * top` words each), keeping `wanted <= top`
    alternatives per token."""
    width = 1 + 2 * top
    floats = _floats(words[:width * len(tokens)])
    result = []
    for row, token in enumerate(tokens):
        start = row * width
        ids = words[start + 1:start + 1 + wanted]
        values = floats[start + 1 + top:start + 1 + top + wanted]
        result.append(TokenLogprobs(token, floats[start], list(zip(ids, values))))
    return result


def _floats(words: list[int]) -> list[float]:
    """Every word read as the fp32 whose bits it holds (id words read as nonsense, unused)."""
    return list(struct.unpack(f"<{len(words)}f", struct.pack(f"<{len(words)}I", *(w & 0xFFFFFFFF for w in words))))
