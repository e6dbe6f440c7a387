"""How good a draft head is: acceptance in real rounds, and how its draft distributions fit the target's.

`acceptance` runs the engine (the target verifies, so this is what speculation gains): tau (tokens emitted per
round, bonus included) and acceptance by depth (the share of rounds that accepted at least d drafted tokens).

`draft_fit` looks inside: on text the target wrote greedily, every position is an anchor, and block row j is
compared with the target's distribution at depth j (teacher forcing, no tree). Per depth it reports
- `top1`: the head's argmax is the target's token;
- `best_path`: depths 1..j all top-1, i.e. the tree's best-scored path (per-depth argmaxes; the head scores
  every depth independently) is accepted at least to depth j. This is what a chain accepts;
- `in_top4_path`: depths 1..j all within the head's top 4: what a width-4 tree could accept at most;
- `draft_logp` / `target_logp`: mean log-prob of the target's token under the head and under the target;
- `kl`: forward KL(target || head), in nats.
"""
from collections import Counter

import torch

from nanojet.engine.sampling import SamplingParams
from nanojet.model.head import DraftHead
from nanojet.model.qwen3 import Qwen3
from nanojet.train.distill import block_logits


def acceptance(engine, prompts: list[list[int]], spec, new_tokens: int, depth: int) -> dict:
    """tau and acceptance by depth 1..`depth` over greedy generations of `new_tokens` (EOS ignored) after each
    prompt."""
    histogram = Counter()  # tokens emitted per round (bonus included) -> rounds
    for prompt in prompts:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        histogram += engine.generate(prompt, params, spec).stats.accept_hist
    rounds = max(1, sum(histogram.values()))
    return {"tau": round(sum(k * n for k, n in histogram.items()) / rounds, 3),
            "accept_by_depth": [round(sum(n for k, n in histogram.items() if k > d) / rounds, 3)
                                for d in range(1, depth + 1)]}


@torch.no_grad()
def draft_fit(target: Qwen3, head: DraftHead, sequences: list[list[int]], starts: list[int],
              anchors_per_forward: int = 64) -> dict:
    """Per-depth fit (see the module doc) over every anchor a >= starts[i] of sequence i that has a full
    block of labels after it. Sequences should be the target's own greedy text, so that the token at depth j is
    the target's choice given the tokens before it."""
    block = head.config.block_size
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for ids, start in zip(sequences, starts, strict=True):
        tokens = torch.tensor([ids], device=target.norm.device)
        positions = list(range(max(1, start), len(ids) - block + 1))
        for first in range(0, len(positions), anchors_per_forward):
            anchors = torch.tensor([positions[first:first + anchors_per_forward]], device=tokens.device)
            teacher, student = (x[0].float() for x in block_logits(target, head, tokens, anchors))  # [A, B-1, V]
            teacher_logp, student_logp = teacher.log_softmax(-1), student.log_softmax(-1)
            chosen = teacher.argmax(-1, keepdim=True)  # [A, B-1, 1]
            top1 = (student.argmax(-1, keepdim=True) == chosen).squeeze(-1).float()
            in_top4 = (student.topk(4, -1).indices == chosen).any(-1).float()
            row = {"top1": top1, "best_path": top1.cumprod(1), "in_top4_path": in_top4.cumprod(1),
                   "draft_logp": student_logp.gather(-1, chosen).squeeze(-1),
                   "target_logp": teacher_logp.gather(-1, chosen).squeeze(-1),
                   "kl": (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)}
            for name, value in row.items():
                sums[name] = sums.get(name, 0) + value.sum(0)
            count += anchors.shape[1]
    if count == 0:
        raise ValueError(f"draft_fit: no sequence is longer than the head's block ({block} tokens)")
    return {"anchors": count, **{name: [round(v, 3) for v in (total / count).tolist()] for name, total in sums.items()}}
