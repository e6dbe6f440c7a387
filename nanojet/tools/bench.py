"""Benchmark nanojet: plain (AR) against speculative decoding on one engine, prompt by prompt (`nanojet-bench`
installed, `python bench.py` in a checkout).

    python bench.py --budget 64                                    # embedded model, held-out stdlib prompts
    python bench.py --budgets 1,8,16,32,64,128,256 --json out.json --plot out.png --profile
    python bench.py --model DIR --prompts ../shared/data/humaneval.jsonl --samples 16 --peer hf
    python bench.py --synthetic qwen3-8b --budgets 1,64            # random weights in the real shapes (GPU)
    python bench.py --compile --budgets 1,8                        # compiled rounds (inside CUDA graphs on a GPU)
    python bench.py --synthetic qwen3-30b-a3b --synthetic-layers 2 --experts-touched --budgets 1,16,256  # MoE
    python bench.py --concurrency 1,4,16 --samples 16 --budgets 4,8 --http   # serving: continuous batching

After one warmup generation per mode, each prompt runs AR and then every budget, so drift (clocks, caches,
other load) hits all modes alike. Speeds use decode time only (prefill excluded). With --compile the warmup
builds every graph; its time is reported on its own line, and a graph built while measuring is reported too.
AR and speculative decoding emit the same ids, so speedup = AR decode time / speculative decode time, which is
what users wait for. Every speculative output is compared with AR token for token; a mismatch exits 1 naming
the prompt and budget (not with --synthetic: random weights are full of near-ties, and that mode measures
latency, not output).
Bad input (an unwritable --json or --plot too: both are checked before measuring) prints one line on stderr
and exits 2; Ctrl-C prints one line and exits 130.
"""
import argparse
import importlib
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from nanojet.bench import serving as serving_bench
from nanojet.bench.device_stats import (
    copy_bandwidth,
    host_syncs_per_round,
    matvec_bandwidth,
    prefill_memory,
    syncs_beyond_outcome_read,
    weight_bytes_per_step,
)
from nanojet.bench.moe_stats import expert_touch_curve, print_expert_curve
from nanojet.bench.prompt_sets import builtin_prompts, read_prompts
from nanojet.bench.report import COMPONENTS, print_report
from nanojet.bench.synthetic import SHAPES, build_engine, synthetic_models
from nanojet.engine.engine import Engine, default_execution
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.round import synced_clock
from nanojet.engine.sampling import SamplingParams
from nanojet.llm import (
    DEFAULT_HEAD_NAME,
    DEFAULT_MODEL,
    DTYPES,
    LLM,
    resolve_device,
    resolve_dtype,
)
from nanojet.model.config import ModelConfig
from nanojet.tools.cli import add_runtime_flags, check_writable, finite_float

MAX_BUDGET = 512  # LLM's max_tree_nodes
SYNTHETIC_PROMPT_TOKENS = 128


class NotLossless(Exception):
    """Speculative decoding emitted other ids than plain decoding."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 (in main), not argparse's usage block
        raise ValueError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: the embedded model)")
    p.add_argument("--head", default="auto", help="draft head directory, or 'auto' (<model>/head-causal)")
    p.add_argument("--prompts", default=None, help="jsonl: each row's prompt, question, problem or turns[0] "
                                                   "(default: held-out stdlib code prompts)")
    p.add_argument("--samples", type=int, default=8, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    budgets = p.add_mutually_exclusive_group()
    budgets.add_argument("--budget", type=int, default=None, help="draft tree nodes per round (default 64)")
    budgets.add_argument("--budgets", default=None, help="comma-separated sweep, e.g. 1,8,16,32,64,128,256")
    p.add_argument("--width", type=int, default=4, help="candidates per tree depth")
    p.add_argument("--depth", type=int, default=None, help="tree depth limit (default: head block size - 1)")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (sampling is lossless too)")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_runtime_flags(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure to this JSON file")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="acceptance and speedup vs budget (matplotlib)")
    p.add_argument("--profile", action="store_true", help="per-component latency of a round and of an AR step "
                                                          "(eager rounds only: a compiled round is one graph)")
    p.add_argument("--synthetic", default=None, choices=sorted(SHAPES),
                   help="random weights in a real Qwen3 shape and a random head: no checkpoint needed")
    p.add_argument("--synthetic-layers", type=int, default=None, help="cut the synthetic depth (quick CPU checks)")
    p.add_argument("--synthetic-vocab", type=int, default=None, help="cut the synthetic vocabulary")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="with --synthetic: the random head drafts over token ids 0..N-1 only, a draft vocabulary of "
                        "N (random weights have no data to choose it by; a checkpoint's head brings its own)")
    p.add_argument("--experts-touched", action="store_true", help="MoE targets: experts a verify touches per layer "
                   "against one decode step, per budget (counts, no timing; eager); then exit")
    p.add_argument("--peer", default=None, choices=["hf"], help="also time Hugging Face transformers generate")
    p.add_argument("--concurrency", default=None, help="serving mode: batch limits, e.g. 1,4,16")
    p.add_argument("--http", action="store_true", help="serving mode: also through python -m nanojet.serve")
    p.add_argument("--step-tokens", type=int, default=512, help="serving mode: target tokens per scheduler step")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="with --synthetic: only prefill this many random tokens; print time and peak memory")
    args = p.parse_args(argv)
    if args.budgets is None:
        args.budgets = [64 if args.budget is None else args.budget]
    else:
        try:
            args.budgets = sorted({int(b) for b in args.budgets.split(",")})
        except ValueError:
            raise ValueError(f"--budgets takes comma-separated integers like 1,8,64; got {args.budgets!r}") from None
    if not all(1 <= b <= MAX_BUDGET for b in args.budgets):
        raise ValueError(f"budgets must lie in 1..{MAX_BUDGET} (tree nodes per round); got {args.budgets}")
    if args.concurrency is not None:
        args.concurrency = serving_bench.parse_concurrency(args.concurrency, args.synthetic or args.peer)
    if args.draft_vocab is not None and not args.synthetic:
        raise ValueError("--draft-vocab gives a --synthetic head a draft vocabulary; a checkpoint head has its own "
                         "(train_head.py --draft-vocab N)")
    if args.prefill_tokens is not None and not args.synthetic:
        raise ValueError("--prefill-tokens measures a --synthetic target; add --synthetic NAME")
    for name in ("samples", "max_new_tokens", "threads", "width", "depth", "synthetic_layers", "synthetic_vocab",
                 "prefill_tokens", "draft_vocab"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out:
            check_writable(out, flag)  # now, not after the whole run
    if args.experts_touched and (args.compile or args.peer):
        raise ValueError("--experts-touched counts experts in eager rounds: drop --compile / --peer")
    if args.peer and (args.temperature > 0 or args.synthetic):
        raise ValueError("--peer hf compares greedy decoding of a checkpoint: drop --temperature / --synthetic")
    return args


def require(module: str, flag: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{flag} needs {module}, which is not installed (pip install {module})") from None


def synthetic_setup(args, dtype: torch.dtype, device: torch.device):
    """Random target in a published shape and a random head of the published JetSpec size, plus random prompts."""
    torch.manual_seed(args.seed)
    target, head = synthetic_models(args.synthetic, dtype, device, args.synthetic_layers, args.synthetic_vocab)
    vocab = target.config.vocab_size
    if args.draft_vocab:
        if args.draft_vocab > vocab:
            raise ValueError(f"--draft-vocab {args.draft_vocab} exceeds the synthetic vocabulary ({vocab} tokens)")
        head.draft_vocab = torch.arange(args.draft_vocab, device=device)
    prompts = [torch.randint(vocab - 1, (SYNTHETIC_PROMPT_TOKENS,)).tolist() for _ in range(args.samples)]
    engine = build_engine(target, head, SYNTHETIC_PROMPT_TOKENS + args.max_new_tokens + 1, max(args.budgets),
                          execution=default_execution(device, args.compile, args.enforce_eager),
                          prefill_chunk=args.prefill_chunk)
    return engine, prompts, {"synthetic": args.synthetic, "layers": target.config.num_hidden_layers,
                             "vocab_size": vocab, "draft_vocab": args.draft_vocab,
                             "prompts_source": f"random ids ({SYNTHETIC_PROMPT_TOKENS} tokens)"}


def checkpoint_setup(args, dtype_name: str):
    model = Path(args.model) if args.model else DEFAULT_MODEL
    ModelConfig.from_dir(model)  # name a missing model before a missing head
    head = model / DEFAULT_HEAD_NAME if args.head == "auto" else Path(args.head)
    if not (head / "config.json").is_file():
        raise FileNotFoundError(f"no draft head at {head}; train one (train_head.py) or pass --head DIR")
    llm = LLM(model, head=head, device=args.device, dtype=dtype_name, max_tree_nodes=MAX_BUDGET,
              compile=args.compile, enforce_eager=args.enforce_eager, prefill_chunk=args.prefill_chunk,
              max_num_seqs=max(args.concurrency or [1]))
    chat = llm.tokenizer.has_chat_template if args.chat is None else args.chat
    texts = read_prompts(Path(args.prompts), args.samples) if args.prompts else builtin_prompts(args.samples)
    prompts = [llm.encode_prompt(text, chat) for text in texts]
    for index, ids in enumerate(prompts):  # fail now, not after minutes of benchmarking
        if len(ids) >= llm.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the model's context holds {llm.max_model_len}")
    return llm.engine, prompts, {"model": str(model), "head": str(head), "chat_template": chat,
                                 "prompts_source": args.prompts or "builtin: held-out stdlib code"}


class HFPeer:
    """Hugging Face transformers greedy `generate` on the same checkpoint, forced to the same token count;
    decode time = time(n tokens) - time(1 token)."""

    def __init__(self, model: str, dtype: torch.dtype, device: torch.device):
        transformers = require("transformers", "--peer hf")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        self._generate([0], 2)  # warmup

    def _generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        inputs = torch.tensor([ids], device=self.model.device)
        start = synced_clock()
        # token_healing off: the engine decodes the encoded prompt as is (and HF's healing would need a tokenizer)
        out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=0, token_healing=False)
        return out[0, len(ids):].tolist(), synced_clock() - start

    def run(self, ids: list[int], n: int) -> dict:
        first_s = self._generate(ids, 1)[1]
        tokens, total_s = self._generate(ids, n)
        return {"new_tokens": n, "total_s": total_s, "decode_s": max(total_s - first_s, 1e-9), "token_ids": tokens}


def mismatch(prompt: int, budget: int, ar: list[int], spec: list[int], dtype: torch.dtype) -> str:
    at = next((i for i, (a, s) in enumerate(zip(ar, spec)) if a != s), min(len(ar), len(spec)))
    ar_token, spec_token = (ids[at] if at < len(ids) else "end" for ids in (ar, spec))
    hint = "" if dtype == torch.float32 else ("; in reduced precision a near-tie can flip: rerun with "
                                              "--dtype float32 to tell rounding from a bug")
    return (f"not lossless: prompt {prompt}, budget {budget}: token {at} differs (AR {ar_token}, speculative "
            f"{spec_token}; {len(ar)} vs {len(spec)} tokens){hint}")


def measure(engine: Engine, prompts: list[list[int]], params: SamplingParams, args, peer: HFPeer | None):
    """Warm up each mode, then per prompt: AR, every budget, the peer. Returns per-prompt records and the
    GenerationStats of each mode ("ar" or a budget)."""
    specs = {b: SpeculativeParams(b, args.width, args.depth) for b in args.budgets}
    warmup = {}  # compile / capture seconds of each mode (0 when eager)
    for name, spec in [("ar", None), *specs.items()]:
        out = engine.generate(prompts[0], replace(params, max_new_tokens=min(16, params.max_new_tokens)), spec)
        warmup[name] = out.stats.compile_s
    runs, per_prompt = {"ar": [], **{b: [] for b in specs}}, []
    try:
        for index, ids in enumerate(prompts):
            print(f"\rbench: prompt {index + 1}/{len(prompts)} ({len(ids)} tokens)", end="", file=sys.stderr,
                  flush=True)
            ar = engine.generate(ids, params, None)
            runs["ar"].append(ar.stats)
            entry = {"prompt": index, "prompt_tokens": len(ids), "spec": {}, "ar": {
                **summarize([ar.stats], 0), "finish_reason": ar.stats.finish_reason, "token_ids": ar.token_ids}}
            for budget, spec in specs.items():
                out = engine.generate(ids, params, spec)
                lossless = out.token_ids == ar.token_ids
                if not lossless and not args.synthetic:
                    raise NotLossless(mismatch(index, budget, ar.token_ids, out.token_ids, engine.kv.pool.dtype))
                runs[budget].append(out.stats)
                depth = depth_limit(args, engine.head.config.block_size, budget)
                entry["spec"][str(budget)] = {**summarize([out.stats], depth), "lossless": lossless}
            if peer:
                entry["peer_hf"] = peer.run(ids, len(ar.token_ids))
                entry["peer_hf"]["agrees_with_ar"] = entry["peer_hf"]["token_ids"] == ar.token_ids
            per_prompt.append(entry)
    finally:
        print(file=sys.stderr)  # end the progress line
    measured = [s for stats in runs.values() for s in stats]
    compiled = {"compile_s": warmup, "graphs_built_while_measuring": sum(s.compiles for s in measured)}
    if engine.device.type == "cuda":
        modes = [("ar", None), *specs.items()]
        compiled["host_syncs_per_round"] = {name: host_syncs_per_round(engine, prompts[0], params, spec)
                                            for name, spec in modes}
        compiled["syncs_beyond_outcome_read"] = {name: syncs_beyond_outcome_read(engine, prompts[0], params, spec)
                                                 for name, spec in modes}
    return per_prompt, runs, compiled


def depth_limit(args, block_size: int, budget: int) -> int:
    """Depths a budget's tree can reach (0: budget 1 is plain decoding)."""
    return 0 if budget == 1 else min(block_size - 1, args.depth or block_size)


def summarize(runs: list, depth: int) -> dict:
    """GenerationStats of several prompts, token-weighted, over decode time (prefill emits the first token, so
    decode emits new_tokens - 1)."""
    decode_s, decode_tokens = sum(s.decode_s for s in runs), sum(max(0, s.new_tokens - 1) for s in runs)
    new_tokens, forwards = sum(s.new_tokens for s in runs), sum(s.target_forwards for s in runs)
    rounds = sum(s.rounds for s in runs)
    hist, split = sum((s.accept_hist for s in runs), Counter()), sum((s.time_split for s in runs), Counter())
    per_round = max(1, rounds)
    return {"new_tokens": new_tokens, "decode_tokens": decode_tokens, "decode_s": decode_s, "rounds": rounds,
            "target_forwards": forwards, "prefill_s": sum(s.prefill_s for s in runs),
            "decode_tokens_per_s": decode_tokens / max(decode_s, 1e-9),
            "s_per_decode_token": decode_s / max(1, decode_tokens), "round_ms": 1e3 * decode_s / per_round,
            "tau": sum(k * n for k, n in hist.items()) / per_round, "tokens_per_forward": new_tokens / max(1, forwards),
            "accept_hist": {str(k): n for k, n in sorted(hist.items())},
            # share of rounds that accepted >= d drafted tokens (a round's count k = accepted drafts + the bonus)
            "accept_rate_by_depth": [sum(n for k, n in hist.items() if k > d) / per_round for d in range(1, depth + 1)],
            "time_split_ms_per_round": {c: 1e3 * split[c] / per_round for c in COMPONENTS if c in split}}


def aggregate(args, config: dict, per_prompt: list[dict], runs: dict, extra: dict) -> dict:
    ar, rows = summarize(runs["ar"], 0), []
    for budget in args.budgets:
        spec = summarize(runs[budget], depth_limit(args, config["head_block_size"], budget))
        rows.append({"budget": budget, "ar_tokens_per_s": ar["decode_tokens_per_s"],
                     "spec_tokens_per_s": spec["decode_tokens_per_s"],
                     "speedup": ar["s_per_decode_token"] / max(spec["s_per_decode_token"], 1e-12),
                     "round_over_ar_step": spec["round_ms"] / max(ar["round_ms"], 1e-12),
                     "lossless": all(p["spec"][str(budget)]["lossless"] for p in per_prompt), **spec})
    extra["ar_step_ms"] = ar["round_ms"]
    extra["achieved_bytes_per_s"] = extra["weight_bytes_per_step"] / (ar["round_ms"] / 1e3)
    extra["roofline_step_ms"] = 1e3 * extra["weight_bytes_per_step"] / extra["matvec_bytes_per_s"]
    if "copy_bytes_per_s" in extra:
        extra["bandwidth_fraction"] = extra["achieved_bytes_per_s"] / extra["copy_bytes_per_s"]
    if "peer_hf" in per_prompt[0]:
        peers = [p["peer_hf"] for p in per_prompt]
        tokens, decode_s = sum(p["new_tokens"] - 1 for p in peers), sum(p["decode_s"] for p in peers)
        extra["peer_hf"] = {"decode_tokens_per_s": tokens / decode_s,
                            "agrees_with_ar": sum(p["agrees_with_ar"] for p in peers)}
    return {"config": config, "ar": ar, "budgets": rows, **extra, "per_prompt": per_prompt}


def check_plot_format(path: str) -> None:
    """--plot needs matplotlib, and a file type it writes (named by the extension)."""
    require("matplotlib", "--plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    formats = FigureCanvasAgg.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--plot {path}: matplotlib cannot write {Path(path).suffix or 'extensionless'} files; "
                         f"end the name in one of {', '.join(f'.{name}' for name in sorted(formats))}")


def plot(path: str, rows: list[dict]) -> None:
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in zip(axes, ("tau", "speedup"), ("tau (tokens per round)", "speedup over AR (decode)")):
        axis.plot([r["budget"] for r in rows], [r[key] for r in rows], "o-")
        axis.axhline(1.0, color="grey", linestyle=":")
        axis.set_xscale("log", base=2)
        axis.set(xlabel="tree budget (nodes per round)", ylabel=label)
    figure.tight_layout()
    figure.savefig(path)


def prefill_report(args, dtype: torch.dtype, device: torch.device) -> int:
    """--prefill-tokens: the chunked prefill of one long random prompt on the synthetic target, nothing else."""
    torch.manual_seed(args.seed)
    target, _ = synthetic_models(args.synthetic, dtype, device, args.synthetic_layers, args.synthetic_vocab)
    if args.prefill_tokens >= target.config.max_position_embeddings:
        raise ValueError(f"--prefill-tokens {args.prefill_tokens} exceeds the model's "
                         f"{target.config.max_position_embeddings} positions")
    result = prefill_memory(target, args.prefill_tokens, args.prefill_chunk)
    print(f"prefill {result['prefill_tokens']} tokens in chunks of {result['prefill_chunk']}: "
          f"{result['prefill_s']:.1f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(KV pool {result['kv_pool_bytes'] / 2**30:.2f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **result}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.plot:
            check_plot_format(args.plot)  # fail before the run, not after it
        if args.threads:
            torch.set_num_threads(args.threads)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos or bool(args.synthetic))
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
        if args.prefill_tokens:
            return prefill_report(args, dtype, device)
        engine, prompts, config = (synthetic_setup(args, dtype, device) if args.synthetic else
                                   checkpoint_setup(args, dtype_name))
        if args.experts_touched:
            rows = expert_touch_curve(engine, prompts[0], args.budgets, args.width, args.max_new_tokens)
            print_expert_curve(rows, engine.target.config)
            if args.json:
                Path(args.json).write_text(json.dumps({"config": config, "experts_touched": rows}, indent=1) + "\n")
            return 0
        if args.profile and engine.execution != "eager":
            raise ValueError("--profile times the parts of eager rounds (a graphed or compiled round is one graph); "
                             "add --enforce-eager on CUDA, or drop --compile")
        engine.profile = args.profile  # per-part timing (device syncs on CUDA) only when a split is asked for
        extra = {"weight_bytes_per_step": weight_bytes_per_step(engine.target),
                 "matvec_bytes_per_s": matvec_bandwidth(device, dtype)}
        if device.type == "cuda":
            extra["copy_bytes_per_s"] = copy_bandwidth(device)
        config.update(head_block_size=engine.head.config.block_size, device=str(device), dtype=dtype_name,
                      torch=torch.__version__, samples=len(prompts), max_new_tokens=args.max_new_tokens,
                      budgets=args.budgets, width=args.width, depth=args.depth, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, threads=torch.get_num_threads(),
                      compile=args.compile, execution=engine.execution)
        if args.concurrency:
            return serving_bench.report(engine, prompts, params, args, config)
        peer = HFPeer(config["model"], dtype, device) if args.peer else None
        per_prompt, runs, extra["compiled"] = measure(engine, prompts, params, args, peer)
    except (NotLossless, serving_bench.Mismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = aggregate(args, config, per_prompt, runs, extra)
    print_report(result, args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(args.plot, result["budgets"])
    return 0

