"""Draft vocabulary: the frequent-token subset a draft head scores (as EAGLE-3 does), chosen from training data.

Drafting scores every block row against the target's lm_head; at 151,936 tokens that product is most of a
draft's cost. A head with a draft vocabulary scores only its tokens (the lm_head rows of those ids), so it can
never draft a token outside it. Verification is untouched (the target still scores the whole vocabulary), so
output stays exactly plain decoding's; only acceptance can drop, when the target's next token is a rare one.

On disk: `draft_vocab.json` in the head's directory, `{"token_ids": [...]}`: the target token ids, distinct and
ascending. A loader that does not know the file ignores it and drafts over the whole vocabulary, so a head folder
with the file still loads everywhere (vLLM, SGLang, older nanojet). It is JSON, not safetensors, because loaders
(nanojet's included) read every `*.safetensors` file of a folder as weights and refuse unknown tensors.
"""
import json
from collections.abc import Iterable
from pathlib import Path

import torch

FILE_NAME = "draft_vocab.json"


def select_draft_vocab(token_ids: Iterable[int] | torch.Tensor, vocab_size: int, size: int,
                       always: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids of `token_ids` (ties to the lower id), plus the ids in `always` (EOS and the
    like, which a head must be able to draft however rare they are in the data), sorted. Fewer ids than `size`
    when the data holds fewer distinct ones; never more than `size`."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size must lie in 1..{vocab_size} (the target's vocabulary), got {size}")
    ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids,
                          dtype=torch.int64).flatten()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}")
    counts = torch.bincount(ids, minlength=vocab_size).double()
    forced = torch.tensor(sorted(set(always)), dtype=torch.int64)
    counts[forced] = float("inf")  # first in, whatever the data says
    # Stable sort on -count: equal counts keep ascending id order, so the choice is deterministic.
    order = torch.sort(-counts, stable=True).indices
    chosen = order[:size]
    return chosen[counts[chosen] > 0].sort().values


def save_draft_vocab(head_dir: str | Path, token_ids: torch.Tensor) -> None:
    (Path(head_dir) / FILE_NAME).write_text(json.dumps({"token_ids": token_ids.tolist()}) + "\n")


def load_draft_vocab(head_dir: str | Path, vocab_size: int) -> torch.Tensor | None:
    """The head's draft vocabulary, or None when its folder has none (it drafts over the whole vocabulary)."""
    path = Path(head_dir) / FILE_NAME
    if not path.is_file():
        return None
    fix = "rewrite it with train_head.py --draft-vocab N, or delete it to draft over the whole vocabulary"
    try:
        ids = json.loads(path.read_text())["token_ids"]
        ids = torch.tensor(ids, dtype=torch.int64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError):
        raise ValueError(f"{path} must hold {{\"token_ids\": [integers]}}; {fix}") from None
    if ids.dim() != 1 or ids.numel() == 0 or not bool((ids[1:] > ids[:-1]).all()) \
            or not 0 <= int(ids[0]) <= int(ids[-1]) < vocab_size:
        raise ValueError(f"{path}: the draft vocabulary must be distinct ascending token ids in 0..{vocab_size - 1}; "
                         f"{fix}")
    return ids
