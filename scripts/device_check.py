"""What a lent GPU (one H100/H200) runs first, within 8 minutes (`DEVICE_CHECK_SECONDS`, default 465): each leg has
its own time limit, so the check always ends with a summary of what passed, failed, ran out of time or was not
available, and the figures each leg measured. Run it through scripts/device_check.sh:

    scripts/device_check.sh OUT_DIR             # on the GPU machine; logs, JSON reports and OUT_DIR/summary.json
    scripts/device_check.sh --dry-run OUT_DIR   # the plan and a summary, without running anything (CPU)

Legs, most important first (a leg gets at most what is left; with under 20 s left it is skipped, and says so):
  gpu-tests           pytest -m gpu (passed / failed / errors / skipped from its JUnit XML)
  bench-8b            synthetic Qwen3-8B, CUDA graphs: AR step and its floor, round cost in AR steps at budgets
                      16/64/256, capture seconds, host syncs per round (and where any beyond the outcome read sit)
  compile-time        the 8B round compiled (36 layers, plain and budget 64): seconds per round shape, target 60
  lossless-*          speculative == plain on the embedded model (scripts/lossless_check.py), bf16 and fp32
  bench-moe           synthetic Qwen3-30B-A3B: AR step and its floor
  train-head          100 training steps on CUDA against a synthetic Qwen3-0.6B
  projection-speed    scripts/projection_speed.py, where that script exists
"""
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_check_report import figures, print_table  # noqa: E402  (beside this file)

TOTAL_SECONDS = int(os.environ.get("DEVICE_CHECK_SECONDS", "465"))
KILL_AFTER = 10  # seconds a leg gets after SIGINT before it is killed
BENCH = ["bench.py", "--device", "cuda"]
LOSSLESS = ["scripts/lossless_check.py", "--budgets", "2,8,16,64,256", "--prompts", "6", "--max-new-tokens", "64",
            "--batch", "8", "--device", "cuda"]
LOSSLESS_COMPILED = ["scripts/lossless_check.py", "--runners", "compiled", "--budgets", "8,64", "--prompts", "2",
                     "--max-new-tokens", "32", "--batch", "4", "--device", "cuda"]


def legs(out: Path, python: str) -> list[tuple[str, int, list[str] | None]]:
    """(name, time limit in seconds, command or None when not available) of every leg, in the order they run."""
    tests = [python, "-m", "pytest", "-q", "-m", "gpu", "tests", "-rA", "-p", "no:cacheprovider",
             f"--junitxml={out / 'gpu-tests.xml'}"]
    if _has_module("pytest_timeout"):
        tests += ["--timeout", "60"]
    projection = ROOT / "scripts" / "projection_speed.py"
    return [
        ("gpu-tests", 90, tests),
        ("bench-8b", 50, [python, *BENCH, "--synthetic", "qwen3-8b", "--budgets", "16,64,256", "--samples", "2",
                          "--max-new-tokens", "64", "--json", str(out / "bench-8b.json")]),
        ("compile-time", 125, [python, "scripts/compile_time.py", "--shape", "qwen3-8b", "--layers", "36",
                               "--budgets", "1,64", "--device", "cuda", "--cold",
                               "--json", str(out / "compile-time.json")]),
        ("lossless-bf16", 40, [python, *LOSSLESS, "--dtype", "bfloat16", "--runners", "eager,graphed",
                               "--json", str(out / "lossless-bf16.json")]),
        ("lossless-fp32", 25, [python, *LOSSLESS, "--dtype", "float32", "--runners", "graphed",
                               "--json", str(out / "lossless-fp32.json")]),
        ("bench-moe", 35, [python, *BENCH, "--synthetic", "qwen3-30b-a3b", "--budgets", "16", "--samples", "1",
                           "--max-new-tokens", "32", "--json", str(out / "bench-moe.json")]),
        ("train-head", 40, [python, "train_head.py", "--synthetic", "qwen3-0.6b", "--steps", "100",
                            "--checkpoint-every", "100", "--eval-prompts", "2", "--device", "cuda",
                            "--out", str(out / "head-synthetic-0.6b")]),
        ("projection-speed", 20, [python, "scripts/projection_speed.py", "--shapes", "qwen3-8b,qwen3-30b-a3b",
                                  "--rows", "1,2,4,8,16,32,64", "--json", str(out / "projection-speed.json")]
         if projection.is_file() else None),
        # Compiling the embedded model's round shapes takes what is left; its graphed and eager runs come first.
        # Compiling takes a few seconds per round shape: fewer shapes (budgets, batch) than the other lossless legs.
        ("lossless-compiled-bf16", 0, [python, *LOSSLESS_COMPILED, "--dtype", "bfloat16",
                                       "--json", str(out / "lossless-compiled-bf16.json")]),
        ("lossless-compiled-fp32", 0, [python, *LOSSLESS_COMPILED, "--dtype", "float32",
                                       "--json", str(out / "lossless-compiled-fp32.json")]),
    ]


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def run_leg(name: str, limit: int, command: list[str], out: Path) -> dict:
    """Run `command` under `limit` seconds (SIGINT, then a kill), its output in OUT/NAME.log."""
    log = out / f"{name}.log"
    began = time.monotonic()
    with log.open("w") as sink:
        done = subprocess.run(["timeout", "--signal=INT", f"--kill-after={KILL_AFTER}", str(limit), *command],
                              stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    status = {0: "passed", 124: "timed-out", 137: "timed-out"}.get(done.returncode, "failed")
    return {"status": status, "exit": done.returncode, "seconds": round(time.monotonic() - began), "log": str(log)}


def run_all(out: Path, dry_run: bool, python: str) -> list[dict]:
    """Every leg in order, each within its limit and what is left of the total (a dry run pretends each leg takes
    its whole limit); a leg of limit 0 shares what is left with the other such legs after it."""
    start, pretended = time.monotonic(), 0
    results = []
    plan = legs(out, python)
    for index, (name, limit, command) in enumerate(plan):
        left = TOTAL_SECONDS - (pretended if dry_run else round(time.monotonic() - start))
        sharing = sum(1 for _, later, _ in plan[index:] if later == 0)
        limit = min(limit, left) if limit else left // max(1, sharing)
        leg = {"name": name, "limit_s": limit, "command": shlex.join(command) if command else None}
        print(f"== {name} (limit {limit} s): {leg['command'] or 'not available'}", flush=True)
        if command is None:
            leg.update(status="not-available", seconds=0)
        elif limit < 20:
            leg.update(status="skipped", seconds=0, reason=f"{max(left, 0)} s left of {TOTAL_SECONDS}")
        elif dry_run:
            leg.update(status="dry-run", seconds=0)
            pretended += limit
        else:
            leg.update(run_leg(name, limit, command, out))
            leg["figures"] = figures(name, out, leg)
        print(f"   {leg['status']} ({leg['seconds']} s)", flush=True)
        results.append(leg)
    return results


def device() -> dict:
    try:
        import torch
        import triton
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        return {"gpu": name, "torch": torch.__version__, "triton": triton.__version__}
    except Exception as error:  # the summary is still written
        return {"gpu": f"unknown ({error})"}


def main(argv: list[str]) -> int:
    dry_run = bool(argv) and argv[0] == "--dry-run"
    argv = argv[1:] if dry_run else argv
    if len(argv) != 1:
        print("error: give the folder for logs and the summary: scripts/device_check.sh [--dry-run] OUT_DIR",
              file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)  # native Triton: the interpreter would turn CUDA kernel tests to skips
    start = time.monotonic()
    results = run_all(out, dry_run, os.environ.get("PYTHON", sys.executable))
    summary = {"dry_run": dry_run, **({} if dry_run else device()), "seconds": round(time.monotonic() - start),
               "budget_s": TOTAL_SECONDS, "legs": results,
               "all_passed": all(leg["status"] in ("passed", "not-available") for leg in results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out / 'summary.json'}")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
