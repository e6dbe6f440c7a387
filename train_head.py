"""Distill a JetFlow draft head from a frozen Qwen3 target: `python train_head.py` trains the embedded model's.

For random anchor positions a of a training sequence, the head sees `[x_a, MASK x (B-1)]` at positions a..a+B-1
and the target's taps of positions < a; block row j learns the target's distribution at position a+j-1 (the
token at depth j), by forward KL (optionally tempered) or cross-entropy on the target's argmax. Many anchors of
many sequences go through one head forward under a block-sparse mask. The anchor row has no loss; depth j can
be weighted by exp(-(j-1)/gamma). Output: a JetSpec / DFlash-format head directory.

Data (--data): `builtin` (the embedded model's training split of the CPython stdlib), or a jsonl file whose rows
carry `text`, `messages` (chat-templated) or `prompt` (with --regen the target first writes the response with
nanojet, which is what the head should imitate).
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from nanojet.cli import ArgumentParser
from nanojet.config import ModelConfig
from nanojet.distill import head_loss, training_mask  # noqa: F401 (training_mask: part of this script's API)
from nanojet.head import DraftHead, HeadConfig, load_head
from nanojet.llm import DEFAULT_MODEL, DTYPES, LLM, load_target, resolve_device, resolve_dtype
from nanojet.synthetic import SHAPES, synthetic_target
from nanojet.tokenizer import Tokenizer


def default_layer_ids(num_target_layers: int, count: int = 3) -> list[int]:
    """`count` taps spread evenly over layers 1 .. L-2 (never the last layer: its output is the final norm's input,
    tapping it stays lossless but lowers acceptance)."""
    last = num_target_layers - 2
    count = min(count, last + 1)
    if count == 1:
        return [last // 2]
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def load_corpus(data: str, tokenizer: Tokenizer, model_dir: Path, regen: bool, device: str) -> list[int]:
    """Training text as one id stream with <|endoftext|>-style separators."""
    separator = tokenizer.eos_token_ids[0]
    if data == "builtin":
        from weights.build_tiny import corpus
        return corpus(held_out=False).tolist()
    ids: list[int] = []
    llm = LLM(model_dir, device=device) if regen else None
    for line in Path(data).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "text" in row:
            ids += tokenizer.encode(row["text"])
        elif "messages" in row:
            ids += tokenizer.encode(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=False))
        elif "prompt" in row:
            prompt = row["prompt"]
            if tokenizer.has_chat_template:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=False)
            prompt_ids = tokenizer.encode(prompt)
            if llm is not None:
                from nanojet.sampling import SamplingParams
                prompt_ids += llm.generate(prompt_ids, SamplingParams(max_new_tokens=256)).token_ids
            ids += prompt_ids
        else:
            raise ValueError(f"{data}: a row needs 'text', 'messages' or 'prompt'; got keys {sorted(row)}")
        ids.append(separator)
    return ids


def evaluate_tau(target, head_dir: Path, prompts: list[list[int]]) -> dict:
    """Accepted tokens per round on held-out prompts (64 new tokens each, EOS ignored): a chain of B-1 drafts and
    a budget-64 tree. Reuses the training target; only the head is loaded, from its checkpoint."""
    from nanojet.engine import SpeculativeParams
    from nanojet.sampling import SamplingParams
    from nanojet.synthetic import build_engine
    head = load_head(head_dir, target.config, target.norm.dtype, target.norm.device).eval()
    new_tokens = 64
    engine = build_engine(target, head, max(map(len, prompts)) + new_tokens + 1, max_tree_nodes=64)
    depth = head.config.block_size - 1
    result = {}
    for name, spec in (("chain", SpeculativeParams(budget=depth + 1, width=1)), ("budget64", SpeculativeParams(64, 4))):
        rounds = accepted = 0
        for prompt in prompts:
            stats = engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), spec).stats
            rounds, accepted = rounds + stats.rounds, accepted + stats.accept_len * stats.rounds
        result[f"tau_{name}"] = round(accepted / max(1, rounds), 3)
    return result


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None, help="head directory (default: <model>/head-causal)")
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--regen", action="store_true", help="let the target write the responses to `prompt` rows")
    parser.add_argument("--head-layers", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--target-layer-ids", default=None, help="comma-separated (default: 3 spread, never last)")
    parser.add_argument("--bidirectional", action="store_true", help="full block mask (DFlash) instead of causal")
    parser.add_argument("--mask-token", default="<|mask|>", help="special token used for MASK rows")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--anchors", type=int, default=16, help="anchors per sequence per step")
    parser.add_argument("--loss", choices=["kl", "ce"], default="kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=None, help="depth weight exp(-(j-1)/gamma)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), default=None,
                        help="train against a random target of this published shape (--model gives the tokenizer)")
    parser.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the published head (the resume state keeps fp32)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (time-sliced jobs; --resume)")
    parser.add_argument("--eval-prompts", type=int, default=4,
                        help="held-out stdlib prompts for the tau eval at each checkpoint (0: off)")
    return parser.parse_args(argv)


def build_head(args, target_config: ModelConfig, tokenizer: Tokenizer) -> DraftHead:
    from dataclasses import replace
    ids = ([int(i) for i in args.target_layer_ids.split(",")] if args.target_layer_ids
           else default_layer_ids(target_config.num_hidden_layers))
    config = HeadConfig(layers=replace(target_config, num_hidden_layers=args.head_layers), block_size=args.block_size,
                        num_target_layers=target_config.num_hidden_layers, target_layer_ids=ids,
                        mask_token_id=tokenizer.token_id(args.mask_token), causal=not args.bidirectional)
    config.check_fits(target_config)
    head = DraftHead(config)
    for param in head.parameters():
        if param.dim() == 2:
            torch.nn.init.normal_(param, std=0.02)
    return head


def train(args) -> Path:
    out = args.out or args.model / ("head-bidirectional" if args.bidirectional else "head-causal")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = Tokenizer.from_dir(args.model)
    # The frozen target in the device's inference dtype (bf16 on CUDA, under autocast); the head keeps fp32 weights.
    dtype = resolve_dtype("auto", device)
    target = synthetic_target(args.synthetic, dtype, device) if args.synthetic else load_target(args.model, dtype, device)
    target.requires_grad_(False)
    state_path = out / "train_state.pt"
    if args.resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: {state_path} does not exist; train without --resume first")
        head = load_head(out, target.config, torch.float32, device)  # the config; fp32 weights come below
    else:
        head = build_head(args, target.config, tokenizer).to(device)
    stream = load_corpus(args.data, tokenizer, args.model, args.regen, args.device)
    if len(stream) < args.seq + 1:
        raise ValueError(f"the training data has {len(stream)} tokens, fewer than one sequence of {args.seq}")
    data = torch.tensor(stream)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    step = 0
    if args.resume:
        state = torch.load(state_path, weights_only=False)
        head.load_state_dict(state["head"])  # fp32 master weights: the published file may be bf16
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]

    def lr_at(s: int) -> float:
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - args.warmup) / max(1, args.steps - args.warmup))))

    eval_prompts = [tokenizer.encode(p) for p in held_out_prompts(args.eval_prompts)] if args.eval_prompts else []
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    start, first_step = time.time(), step
    while step < min(args.steps, args.stop_at or args.steps):
        starts = [rng.randrange(0, len(data) - args.seq) for _ in range(args.batch)]
        tokens = torch.stack([data[s:s + args.seq] for s in starts]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            loss, info = head_loss(target, head, tokens, args.anchors, args.loss, args.temperature, args.gamma, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed = time.time() - start
        rate = (step - first_step) / elapsed
        info["per_depth_accuracy"] = [round(x, 3) for x in info["per_depth_accuracy"].tolist()]  # the step's read
        print(f"\rstep {step}/{args.steps} loss {loss.item():.4f} acc@1 {info['per_depth_accuracy'][0]:.3f} "
              f"acc@{args.block_size - 1} {info['per_depth_accuracy'][-1]:.3f} "
              f"{rate * args.batch * args.seq:.0f} tok/s ETA {(args.steps - step) / rate / 60:.1f} min",
              end="", flush=True)
        if step % args.checkpoint_every == 0 or step in (args.steps, args.stop_at):
            head.save(out, DTYPES[args.save_dtype])
            torch.save({"step": step, "head": head.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "args": vars(args)}, state_path)
            print(f"\ncheckpoint at step {step}: loss {loss.item():.4f}, per-depth accuracy "
                  f"{info['per_depth_accuracy']}", flush=True)
            if eval_prompts:
                print(json.dumps({"step": step, **evaluate_tau(target, out, eval_prompts)}),
                      flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def held_out_prompts(count: int) -> list[str]:
    """Function headers from the held-out stdlib modules (never trained on by the target or the head)."""
    from weights.build_tiny import held_out_prompts as prompts
    return prompts(count)


if __name__ == "__main__":
    sys.exit(main())
