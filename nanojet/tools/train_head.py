"""Distill a JetFlow draft head from a frozen Qwen3 target: `nanojet-train` (`python train_head.py` in a checkout)
trains the embedded model's.

The loss (block row j learns the target's distribution at depth j, many anchors per forward) is
nanojet/train/distill.py's. Output: a JetSpec / DFlash-format head directory.

Data (--data): `builtin` (the embedded model's stdlib training split) or a jsonl file of `text`, `messages` or
`prompt` rows (with --regen the target first writes the response, which is what the head should imitate).

Output goes to a new directory, runs/head-<kind>-<date>, unless --out names one; replacing an existing head needs
--overwrite. Ctrl-C (or SIGTERM) saves a checkpoint after the step in flight and exits 130 (143); a second one
stops at once, except while a checkpoint is being written, which always completes. `--resume --out DIR`
continues from the checkpoint. A closed or full stdout (`| head -1`) only ends the progress lines. A loss that
turns NaN or infinite stops the run with one line and exit 1, keeping the last checkpoint. Bad input: exit 2.
"""
import argparse
import datetime
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from nanojet.bench.synthetic import SHAPES, synthetic_target
from nanojet.llm import (
    DEFAULT_MODEL,
    DTYPES,
    load_target,
    resolve_device,
    resolve_dtype,
)
from nanojet.model.config import ModelConfig
from nanojet.model.draft_vocab import select_draft_vocab
from nanojet.model.head import DraftHead, HeadConfig, load_head
from nanojet.model.packed_gemm import available_memory_bytes as host_available_bytes
from nanojet.tokenizer import Tokenizer
from nanojet.tools.cli import (
    ArgumentParser,
    GracefulStop,
    finite_float,
    say,
    stop_status,
)
from nanojet.train.data import load_corpus
from nanojet.train.distill import head_loss, training_mask  # noqa: F401 (training_mask: part of this script's API)
from nanojet.train.state import (
    LEGACY_NAME,
    load_train_state,
    save_head,
    save_train_state,
    state_exists,
)


class Diverged(Exception):
    """The loss (or the weights) stopped being finite: the run failed, and its last checkpoint is kept."""


def default_layer_ids(num_target_layers: int, count: int = 3) -> list[int]:
    """`count` taps spread evenly over layers 1 .. L-2 (never the last layer: its output is the final norm's input,
    tapping it stays lossless but lowers acceptance)."""
    last = num_target_layers - 2
    count = min(count, last + 1)
    if count == 1:
        return [last // 2]
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def evaluate_tau(target, head_dir: Path, prompts: list[list[int]]) -> dict:
    """Accepted tokens per round on held-out prompts (64 new tokens each, EOS ignored) and acceptance by depth (the
    share of rounds that accepted the draft at depth d): a chain of B-1 drafts and a budget-64 tree. Reuses the
    training target; only the head is loaded, from its checkpoint."""
    from nanojet.bench.synthetic import build_engine
    from nanojet.engine.request import SpeculativeParams
    from nanojet.train.head_eval import acceptance
    head = load_head(head_dir, target.config, target.norm.dtype, target.norm.device).eval()
    new_tokens = 64
    engine = build_engine(target, head, max(map(len, prompts)) + new_tokens + 1, max_tree_nodes=64)
    depth = head.config.block_size - 1
    result = {}
    for name, spec in (("chain", SpeculativeParams(budget=depth + 1, width=1)), ("budget64", SpeculativeParams(64, 4))):
        measured = acceptance(engine, prompts, spec, new_tokens, depth)
        result[f"tau_{name}"], result[f"accept_by_depth_{name}"] = measured["tau"], measured["accept_by_depth"]
    return result


# The head's shape: flags a new head is built from, and a resumed head keeps (conflicting flags are refused).
HEAD_SHAPE_DEFAULTS = {"head_layers": 2, "block_size": 8, "target_layer_ids": None, "bidirectional": False,
                       "mask_token": "<|mask|>"}


def resolve_head_shape(args, parser: ArgumentParser) -> None:
    """Fill the head-shape flags: from the saved head under --resume (refusing a flag that says otherwise),
    else from the defaults."""
    if not args.resume:
        for name, default in HEAD_SHAPE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        return
    config_path = args.out / "config.json"
    try:
        saved = HeadConfig.from_dict(json.loads(config_path.read_text()))
    except FileNotFoundError:
        parser.error(f"--resume: no head at {args.out} ({config_path} is missing); train one without --resume")
    except (ValueError, json.JSONDecodeError) as error:
        parser.error(f"--resume: {config_path} is not a readable head config ({error})")
    if args.mask_token is not None:  # compared as ids: a token has one id but may be written more than one way
        try:
            mask_id = Tokenizer.from_dir(args.model).token_id(args.mask_token)
        except (ValueError, FileNotFoundError) as error:
            parser.error(f"--mask-token: {error}")
        if mask_id != saved.mask_token_id:
            parser.error(f"--mask-token {args.mask_token} (id {mask_id}) conflicts with the resumed head in "
                         f"{args.out} (mask token id {saved.mask_token_id}); drop the flag, or train a new head")
    kept = {"head_layers": saved.layers.num_hidden_layers, "block_size": saved.block_size,
            "target_layer_ids": saved.target_layer_ids, "bidirectional": not saved.causal}
    for name, value in kept.items():
        given = getattr(args, name)
        if given is not None and given != value:
            parser.error(f"--{name.replace('_', '-')} {given} conflicts with the resumed head in {args.out} "
                         f"({name.replace('_', ' ')} {value}); drop the flag, or train a new head without --resume")
        setattr(args, name, value)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="the frozen target: a Qwen3 checkpoint directory (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=None,
                        help="head directory to write (default: a new runs/head-<causal|bidirectional>-<date>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a head that --out already holds")
    parser.add_argument("--data", default="builtin",
                        help="builtin (the embedded model's training split) or a .jsonl file of text / messages / "
                             "prompt rows")
    parser.add_argument("--regen", action="store_true",
                        help="let the target write the training text: responses to `prompt` rows, or with --data "
                             "builtin to function headers of the training split (cached, see --regen-cache)")
    parser.add_argument("--regen-prompts", type=int, default=2000, help="--regen --data builtin: prompts answered")
    parser.add_argument("--regen-tokens", type=int, default=192, help="--regen --data builtin: tokens per response")
    parser.add_argument("--regen-cache", type=Path, default=None,
                        help="--regen --data builtin: cache file (default runs/regen/<model>-<settings hash>.jsonl; "
                             "reused when it exists)")
    parser.add_argument("--head-layers", type=int, default=None,
                        help=f"Qwen3 decoder layers in the head (default {HEAD_SHAPE_DEFAULTS['head_layers']}; "
                             f"--resume: the saved head's)")
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"rows of the head's block: the anchor and block-size - 1 drafted depths (default "
                             f"{HEAD_SHAPE_DEFAULTS['block_size']}; --resume: the saved head's)")
    parser.add_argument("--target-layer-ids", default=None,
                        help="target layers whose outputs the head reads, comma-separated (default: 3 spread "
                             "evenly, never the last)")
    parser.add_argument("--bidirectional", action="store_const", const=True, default=None,
                        help="full block mask (DFlash) instead of causal")
    parser.add_argument("--mask-token", default=None,
                        help=f"special token used for MASK rows (default {HEAD_SHAPE_DEFAULTS['mask_token']})")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps in all (a resumed run counts on)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--anchors", type=int, default=16, help="anchors per sequence per step")
    parser.add_argument("--loss", choices=["kl", "ce"], default="kl",
                        help="kl: forward KL to the target's distribution; ce: cross-entropy on its argmax")
    parser.add_argument("--temperature", type=finite_float, default=1.0,
                        help="softmax temperature of both distributions in the KL loss")
    parser.add_argument("--gamma", type=finite_float, default=None,
                        help="depth weight exp(-(j-1)/gamma) (default: every depth weighs the same)")
    parser.add_argument("--lr", type=finite_float, default=1e-3, help="peak AdamW learning rate (cosine decay)")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order, anchors and initial weights")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train (auto: CUDA if available)")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), default=None,
                        help="train against a random target of this published shape (--model gives the tokenizer)")
    parser.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the published head (the resume state keeps fp32)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="save the head and the resume state every this many steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training state saved in --out (its train_state/ folder)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (time-sliced jobs; --resume)")
    parser.add_argument("--eval-prompts", type=int, default=4,
                        help="held-out stdlib prompts for the tau eval at each checkpoint (0: off)")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                        help="draft only the N most frequent tokens of the training data (draft_vocab.json; "
                             "nanojet/model/draft_vocab.py); default: the whole vocabulary")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, least in (("steps", 1), ("batch", 1), ("seq", 2), ("anchors", 1), ("head_layers", 1),
                        ("block_size", 2), ("checkpoint_every", 1), ("warmup", 0), ("eval_prompts", 0),
                        ("stop_at", 1), ("regen_prompts", 1), ("regen_tokens", 1), ("draft_vocab", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    for name in ("lr", "temperature", "gamma"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be > 0, got {value}")
    if args.target_layer_ids is not None:
        try:
            args.target_layer_ids = [int(i) for i in args.target_layer_ids.split(",")]
        except ValueError:
            parser.error(f"--target-layer-ids takes comma-separated layer indices like 1,2,4; "
                         f"got {args.target_layer_ids!r}")
    if args.regen and args.synthetic:
        parser.error("--regen needs a real target to write responses; drop --synthetic (its weights are random)")
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the head directory whose training continues")
    resolve_head_shape(args, parser)
    room = args.seq - args.block_size  # an anchor needs context before it and a full block of labels after it
    if args.anchors > room:
        parser.error(f"--anchors {args.anchors} does not fit: a --seq {args.seq} sequence has room for {max(room, 0)} "
                     f"anchors with --block-size {args.block_size}; lower --anchors or raise --seq")
    return args


def default_out(bidirectional: bool) -> Path:
    """A new directory per run, so training never overwrites a head (the shipped ones included) by default."""
    kind = "bidirectional" if bidirectional else "causal"
    return Path("runs") / f"head-{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    holds_head = (out / "config.json").is_file() or (out / "model.safetensors").is_file()
    if holds_head and not (resume or overwrite):
        raise ValueError(f"--out {out} already holds a head; pass --overwrite to replace it, --resume to continue "
                         f"its training, or another --out")
    if resume and not state_exists(out) and not (out / LEGACY_NAME).is_file():
        raise FileNotFoundError(f"--resume: {out} holds no training state; train without --resume first")


def step_memory_bytes(args, target: ModelConfig) -> int:
    """A lower bound on one training step's memory (fp32): the teacher's logits over every position, the
    student's logits and KL terms (with their gradients) over every draft row, and each head layer's attention
    scores over the block-sparse mask (kept for backward). Weights and smaller activations come on top."""
    vocab, rows = target.vocab_size, args.batch * args.anchors * args.block_size
    teacher = args.batch * args.seq * vocab
    student = 5 * args.batch * args.anchors * (args.block_size - 1) * vocab
    scores = 2 * args.head_layers * target.num_attention_heads * rows * (args.batch * args.seq + rows)
    return 4 * (teacher + student + scores)


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory where the step runs: CUDA's free bytes, else /proc/meminfo's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def check_step_fits(args, target: ModelConfig, available: int | None) -> None:
    if args.seq > target.max_position_embeddings:
        raise ValueError(f"--seq {args.seq} exceeds the target's context ({target.max_position_embeddings} tokens, "
                         f"max_position_embeddings); lower --seq")
    needed = step_memory_bytes(args, target)
    if available is not None and needed > available:
        raise ValueError(f"one step of --batch {args.batch} --seq {args.seq} --anchors {args.anchors} needs at least "
                         f"{needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB free; lower --batch, "
                         f"--seq or --anchors")


def build_head(args, target_config: ModelConfig, tokenizer: Tokenizer) -> DraftHead:
    from dataclasses import replace
    ids = args.target_layer_ids or default_layer_ids(target_config.num_hidden_layers)
    config = HeadConfig(layers=replace(target_config, num_hidden_layers=args.head_layers), block_size=args.block_size,
                        num_target_layers=target_config.num_hidden_layers, target_layer_ids=ids,
                        mask_token_id=tokenizer.token_id(args.mask_token), causal=not args.bidirectional)
    config.check_fits(target_config)
    head = DraftHead(config)
    for param in head.parameters():
        if param.dim() == 2:
            torch.nn.init.normal_(param, std=0.02)
    return head


def train(args, stop: GracefulStop | None = None) -> Path:
    """Train (or with --resume continue) a head; returns its directory. `stop` (armed under main) ends the run
    after the current step with a checkpoint, raising KeyboardInterrupt (Terminated after SIGTERM). A loss or
    weights that are not finite raise Diverged before anything is saved."""
    stop = stop or GracefulStop()  # never armed: a plain call trains to the end
    out = args.out or default_out(args.bidirectional)
    check_out(out, args.resume, args.overwrite)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = Tokenizer.from_dir(args.model)
    # The frozen target in the device's inference dtype (bf16 on CUDA, under autocast); the head keeps fp32 weights.
    dtype = resolve_dtype("auto", device)
    target = synthetic_target(args.synthetic, dtype, device) if args.synthetic else load_target(args.model, dtype, device)
    target.requires_grad_(False)
    check_step_fits(args, target.config, available_memory_bytes(device))
    if args.resume:
        head = load_head(out, target.config, torch.float32, device)  # the config; fp32 weights come below
    else:
        head = build_head(args, target.config, tokenizer).to(device)
    if args.anchors > args.seq - head.config.block_size:
        raise ValueError(f"--anchors {args.anchors} does not fit: the head's block of {head.config.block_size} leaves "
                         f"room for {args.seq - head.config.block_size} anchors in a --seq {args.seq} sequence")
    stream = load_corpus(args.data, tokenizer, args.model, args.regen, args.device, args.regen_prompts,
                         args.regen_tokens, args.regen_cache)
    if len(stream) < args.seq + 1:
        raise ValueError(f"the training data has {len(stream)} tokens, fewer than one sequence of {args.seq}")
    data = torch.tensor(stream)
    if args.draft_vocab:
        head.draft_vocab = select_draft_vocab(data, target.config.vocab_size, args.draft_vocab,
                                              always=tokenizer.eos_token_ids).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    step, saved_step = 0, None
    if args.resume:
        step = saved_step = load_train_state(out, head, optimizer, rng)  # fp32 master weights (the head may be bf16)
        if step >= min(args.steps, args.stop_at or args.steps):
            raise ValueError(f"--resume: {out} is at step {step} already; raise --steps (or --stop-at) past it")

    def lr_at(s: int) -> float:
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - args.warmup) / max(1, args.steps - args.warmup))))

    def diverged(what: str) -> Diverged:
        kept = (f"the checkpoint of step {saved_step} in {out} is kept (--resume --out {out} continues from it)"
                if saved_step is not None else "no checkpoint was saved")
        return Diverged(f"{what} at step {step}: training diverged (try a lower --lr than {args.lr:g}); {kept}")

    def save_checkpoint() -> None:
        nonlocal saved_step
        if not all(bool(torch.isfinite(param).all()) for param in head.parameters()):
            raise diverged("the head's weights are not finite")
        with stop.saving():  # a second Ctrl-C waits for the save to complete
            save_head(head, out, DTYPES[args.save_dtype])
            save_train_state(out, step, head, optimizer, rng, vars(args))
        saved_step = step

    eval_prompts = [tokenizer.encode(p) for p in held_out_prompts(args.eval_prompts)] if args.eval_prompts else []
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    start, first_step = time.time(), step
    say(f"training a head in {out}")
    stop.arm()  # from here Ctrl-C and SIGTERM end the run with a checkpoint
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
        loss_value = loss.item()  # the step's one read of the loss
        if not math.isfinite(loss_value):
            raise diverged(f"the loss is not finite ({loss_value})")
        elapsed = time.time() - start
        rate = (step - first_step) / elapsed
        info["per_depth_accuracy"] = [round(x, 3) for x in info["per_depth_accuracy"].tolist()]
        say(f"\rstep {step}/{args.steps} loss {loss_value:.4f} acc@1 {info['per_depth_accuracy'][0]:.3f} "
            f"acc@{args.block_size - 1} {info['per_depth_accuracy'][-1]:.3f} "
            f"{rate * args.batch * args.seq:.0f} tok/s ETA {(args.steps - step) / rate / 60:.1f} min", end="")
        if step % args.checkpoint_every == 0 or step in (args.steps, args.stop_at):
            save_checkpoint()
            say(f"\ncheckpoint at step {step}: loss {loss_value:.4f}, per-depth accuracy {info['per_depth_accuracy']}")
            if eval_prompts:
                say(json.dumps({"step": step, **evaluate_tau(target, out, eval_prompts)}))
        if stop.requested:
            if saved_step != step:
                save_checkpoint()
            stop.stop(f"checkpoint saved at step {step}; continue with --resume --out {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with GracefulStop() as stop:
            train(args, stop)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        say()  # end the progress line
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stopped:  # Ctrl-C or SIGTERM (Terminated)
        word, status = stop_status(stopped)
        print(f"\n{word}{f': {stopped}' if str(stopped) else ''}", file=sys.stderr)
        return status
    return 0


def held_out_prompts(count: int) -> list[str]:
    """Function headers from the held-out stdlib modules (never trained on by the target or the head)."""
    from nanojet.weights.build_tiny import held_out_prompts as prompts
    return prompts(count)

