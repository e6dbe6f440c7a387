"""Seconds to compile one round, per round shape, for synthetic targets of several depths: does compile time grow
with the number of decoder layers?

    python scripts/compile_time.py --shape qwen3-0.6b --layers 2,14,28 --budgets 1,8 [--device cpu|cuda]
        [--way auto|whole|layerwise] [--json OUT]

Each depth compiles in a fresh process with inductor's graph caches off, so tracing, AOT autograd, lowering and code
generation all run every time (on CUDA the CUDA-graph capture is included, as bench.py reports it). The kernels
themselves (C++ or Triton, nearly all the same at every depth) come from a kernel cache that a first, unreported
compile of each depth fills, so the figures show what grows with depth rather than the compiler's fixed costs;
`--cold` reports first-ever compiles instead (an empty cache per depth). Budget 1 is plain decoding; a larger budget
is a speculative round with the synthetic (random) draft head, width 4. Besides seconds, each round reports
`fx_nodes`: the FX nodes the compiler was handed, a nested compile region's body counted once however often the
graph calls it (`nanojet/engine/runners.py`). `--way` picks how the round compiles (`CompiledRunner`): whole, one
graph (the CPU default), or layerwise, the target's layers through one compiled layer (the CUDA default)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help="a synthetic shape (nanojet/bench/synthetic.py)")
    parser.add_argument("--layers", default="2,14,28", help="comma-separated target depths")
    parser.add_argument("--budgets", default="1,8", help="comma-separated tree budgets (1: plain decoding)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on the CPU), float32, bfloat16")
    parser.add_argument("--vocab", type=int, default=None, help="cut the vocabulary (default: the published one)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--cold", action="store_true", help="an empty kernel cache for every depth")
    parser.add_argument("--way", default="auto", choices=("auto", "whole", "layerwise"),
                        help="the round in one graph, or the target's layers through one compiled layer "
                             "(auto: the engine's default, layerwise on CUDA, whole on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--one-depth", type=int, default=None, help=argparse.SUPPRESS)  # the per-depth child
    return parser.parse_args(argv)


def measure_depth(args: argparse.Namespace, layers: int) -> None:
    """Compile each budget's round once on a synthetic target of `layers` layers; prints a JSON line per round
    (seconds and FX nodes) as soon as it is built."""
    import torch

    from nanojet.bench.synthetic import build_engine, synthetic_models
    from nanojet.engine.request import SpeculativeParams
    from nanojet.engine.sampling import SamplingParams
    from nanojet.llm import resolve_dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    target, head = synthetic_models(args.shape, resolve_dtype(args.dtype, device), device, layers=layers,
                                    vocab=args.vocab)
    engine = build_engine(target, head, max_model_len=256, max_tree_nodes=max(budgets), execution="compiled")
    if args.way != "auto":
        engine.compile_layerwise = args.way == "layerwise"
    prompt = torch.randint(target.config.vocab_size, (16,)).tolist()
    for budget in budgets:
        spec = None if budget == 1 else SpeculativeParams(budget, 4)
        out = engine.generate(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True), spec)
        runner = engine.runner(spec, sampled=False)
        print(json.dumps({"layers": layers, "budget": budget, "compile_s": round(out.stats.compile_s, 2),
                          "compiles": out.stats.compiles,
                          "fx_nodes": getattr(getattr(runner, "inner", runner), "fx_nodes", None)}), flush=True)


def compile_environment(cache: str) -> dict:
    """A child's environment: inductor's kernel cache in `cache`, its graph caches off (so every graph is traced,
    lowered and generated anew), and this checkout importable."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton",
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_depth(args: argparse.Namespace, layers: int, cache: str):
    """`measure_depth` in a child process, with inductor's kernel cache in `cache` and its graph caches off; yields
    each round's figures as the child reports them."""
    command = [sys.executable, __file__, "--one-depth", str(layers), "--shape", args.shape, "--budgets", args.budgets,
               "--device", args.device, "--dtype", args.dtype, "--way", args.way]
    command += [f"--{name}={value}" for name, value in (("vocab", args.vocab), ("threads", args.threads)) if value]
    environment = compile_environment(cache)
    with tempfile.TemporaryFile(mode="w+") as errors:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=environment) as child:
            for line in child.stdout:
                if line.startswith("{"):
                    yield json.loads(line)
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"compiling the {layers}-layer round failed:\n{errors.read()[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_depth is not None:
        measure_depth(args, args.one_depth)
        return 0
    import torch
    depths = [int(n) for n in args.layers.split(",")]
    mode = "cold: an empty kernel cache per depth" if args.cold else "kernels cached by a first, unreported run"
    print(f"compile seconds per round shape, {args.shape} ({args.device}, way {args.way}; {mode})")
    print(f"{'layers':>6} {'budget':>6} {'compile s':>10} {'FX nodes':>9}")
    result = {"shape": args.shape, "device": args.device, "way": args.way, "cold": args.cold,
              "torch": torch.__version__, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="nanojet-compile-time-") as shared:
        for layers in [] if args.cold else depths:  # fill the kernel cache: each depth's taps add a kernel or two
            list(run_depth(args, layers, shared))
        for layers in depths:
            for row in run_depth(args, layers, tempfile.mkdtemp(dir=shared) if args.cold else shared):
                result["rounds"].append(row)
                print(f"{row['layers']:>6} {row['budget']:>6} {row['compile_s']:>10.1f} {row['fx_nodes'] or '-':>9}",
                      flush=True)
                if args.json:  # after every round: a run cut short keeps what was measured
                    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
