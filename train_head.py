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
from nanojet.head import DraftHead, HeadConfig, load_head
from nanojet.llm import DEFAULT_MODEL, DTYPES, LLM, load_target, resolve_device
from nanojet.tokenizer import Tokenizer


def default_layer_ids(num_target_layers: int, count: int = 3) -> list[int]:
    """`count` taps spread evenly over layers 1 .. L-2 (never the last layer: its output is the final norm's input,
    tapping it stays lossless but lowers acceptance)."""
    last = num_target_layers - 2
    count = min(count, last + 1)
    if count == 1:
        return [last // 2]
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def training_mask(lengths: list[int], anchors: list[list[int]], block_size: int, causal: bool) -> torch.Tensor:
    """Block-sparse bool mask `[Q, C + Q]` for blocks of several sequences flattened into one forward.

    Context rows are every sequence's positions laid end to end (C = sum of lengths); block rows are the blocks
    of every anchor, in order. A block of anchor a in sequence s sees s's context rows < a, and its own rows
    (all of them, or rows <= itself when causal) — exactly what the inference path shows the head."""
    context_size = sum(lengths)
    blocks = sum(len(a) for a in anchors)
    mask = torch.zeros(blocks * block_size, context_size + blocks * block_size, dtype=torch.bool)
    inner = torch.ones(block_size, block_size, dtype=torch.bool)
    inner = inner.tril() if causal else inner
    row, offset = 0, 0
    for length, sequence_anchors in zip(lengths, anchors):
        for anchor in sequence_anchors:
            rows = slice(row, row + block_size)
            mask[rows, offset:offset + anchor] = True
            mask[rows, context_size + row:context_size + row + block_size] = inner
            row += block_size
        offset += length
    return mask


def head_loss(target, head: DraftHead, tokens: torch.Tensor, anchors_per_sequence: int, loss_kind: str,
              temperature: float, gamma: float | None, generator: random.Random) -> tuple[torch.Tensor, dict]:
    """Loss of one batch `[batch, seq]` of token ids; returns (loss, per-depth accuracy of the head's argmax)."""
    batch, seq = tokens.shape
    block_size = head.config.block_size
    with torch.no_grad():
        hidden, taps = target.forward_dense(tokens, tap_layers=tuple(head.config.target_layer_ids))
        teacher_logits = target.logits(hidden)  # [batch, seq, V]: row p predicts the token at p + 1
    # An anchor needs context before it (a >= 1) and a full block of labels inside the sequence.
    anchors = [sorted(generator.sample(range(1, seq - block_size + 1), anchors_per_sequence)) for _ in range(batch)]
    positions = torch.arange(seq)
    context = head.project_context(taps.flatten(0, 1))
    block_tokens = torch.full((batch, anchors_per_sequence, block_size), head.config.mask_token_id)
    label_index = torch.zeros(batch, anchors_per_sequence, block_size - 1, dtype=torch.long)
    for b in range(batch):
        for i, a in enumerate(anchors[b]):
            block_tokens[b, i, 0] = tokens[b, a]
            label_index[b, i] = b * seq + a + torch.arange(block_size - 1)  # row j (1..B-1) <- position a+j-1
    block_positions = (torch.tensor(anchors)[:, :, None] + torch.arange(block_size)).flatten()
    mask = training_mask([seq] * batch, anchors, block_size, head.config.causal)
    out = head.forward_dense(context, positions.repeat(batch), target.embed_tokens(block_tokens.flatten()),
                             block_positions, mask)
    student = target.logits(out.view(batch, anchors_per_sequence, block_size, -1)[:, :, 1:])  # anchor row: no loss
    teacher = teacher_logits.flatten(0, 1)[label_index]  # [batch, anchors, B-1, V]
    if loss_kind == "kl":
        teacher_logp = torch.log_softmax(teacher / temperature, -1)
        student_logp = torch.log_softmax(student / temperature, -1)
        per_row = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    else:
        per_row = torch.nn.functional.cross_entropy(student.flatten(0, 2), teacher.argmax(-1).flatten(),
                                                    reduction="none").view(student.shape[:-1])
    depth = torch.arange(block_size - 1, dtype=torch.float32)
    weights = torch.exp(-depth / gamma) if gamma else torch.ones_like(depth)
    loss = (per_row.mean((0, 1)) * weights).sum() / weights.sum()
    accuracy = (student.argmax(-1) == teacher.argmax(-1)).float().mean((0, 1))
    return loss, {"per_depth_accuracy": [round(x, 3) for x in accuracy.tolist()]}


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


def evaluate_tau(model_dir: Path, head_dir: Path, prompts: list[list[int]], device: str) -> dict:
    """Accepted tokens per round on held-out prompts: a chain of B-1 drafts and a budget-64 tree."""
    from nanojet.engine import SpeculativeParams
    from nanojet.sampling import SamplingParams
    llm = LLM(model_dir, head=head_dir, device=device)
    depth = llm.head.config.block_size - 1
    result = {}
    for name, spec in (("chain", SpeculativeParams(budget=depth + 1, width=1)), ("budget64", SpeculativeParams(64, 4))):
        rounds = accepted = 0
        for prompt in prompts:
            stats = llm.generate(prompt, SamplingParams(max_new_tokens=64), spec).stats
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
    target = load_target(args.model, torch.float32, device).requires_grad_(False)
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
                print(json.dumps({"step": step, **evaluate_tau(args.model, out, eval_prompts, args.device)}),
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
