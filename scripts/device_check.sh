#!/usr/bin/env bash
# What a lent GPU (one H100/H200) runs first, in under 8 minutes: the GPU tests, the synthetic Qwen3-8B bench
# (AR and tree budgets 16/64/256; eager, CUDA graphs, compiled), a 200-step train_head.py run against a synthetic
# Qwen3-0.6B target in bf16, and the sampler's peak memory at N=512, V=151,936. Logs and bench JSON go to OUT_DIR;
# OUT_DIR/summary.json sums them up.
#
#   scripts/device_check.sh OUT_DIR             # on the GPU machine, from anywhere
#   scripts/device_check.sh --dry-run OUT_DIR   # print the plan and write a summary without running anything
#
# Every leg has a time limit (the compiled leg gets whatever is left of DEVICE_CHECK_SECONDS, default 470), so
# the script always finishes and the summary says which legs passed, failed or ran out of time.
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "error: give the folder for logs and the summary: scripts/device_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "$1" && cd "$1" && pwd)" || { echo "error: cannot create $1" >&2; exit 2; }
cd "$repo"
python="${PYTHON:-python3}"
total_seconds="${DEVICE_CHECK_SECONDS:-470}"
start=$(date +%s)
legs="$out/legs.tsv"
: > "$legs"
unset TRITON_INTERPRET  # native Triton: the interpreter would turn every CUDA kernel test into a skip

# run_leg NAME TIME_LIMIT COMMAND...: run with a limit, log to OUT_DIR/NAME.log, record the outcome.
run_leg() {
    local name="$1" limit="$2"
    shift 2
    local log="$out/$name.log" began rc status
    echo "== $name (limit ${limit}s): $*"
    if (( dry_run )); then
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "dry-run" "" "0" "$*" >> "$legs"
        return
    fi
    began=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124|137) status=timed-out ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - began ))" "$*" >> "$legs"
    echo "   $status (exit $rc, $(( $(date +%s) - began )) s); log: $log"
}

remaining() {
    echo $(( total_seconds - ($(date +%s) - start) ))
}

bench=("$python" bench.py --synthetic qwen3-8b --budgets 16,64,256 --samples 2 --max-new-tokens 64 --device cuda)
# CUDA graphs became the CUDA default with --enforce-eager as the opt-out; before that the default was eager and
# no flag ran graphs without compiling.
if "$python" bench.py --help 2>/dev/null | grep -q -- "--enforce-eager"; then
    eager_flags=(--enforce-eager)
    graphs_available=1
else
    eager_flags=()
    graphs_available=0
fi

run_leg gpu-tests 100 "$python" -m pytest -q -m gpu tests
run_leg bench-eager 75 "${bench[@]}" "${eager_flags[@]}" --json "$out/bench-eager.json"
if (( graphs_available )); then
    run_leg bench-graphs 75 "${bench[@]}" --json "$out/bench-graphs.json"
else
    printf '%s\t%s\t%s\t%s\t%s\n' "bench-graphs" "not-available" "" "0" \
        "bench.py has no --enforce-eager yet, so no CUDA-graph-only mode to run" >> "$legs"
fi
run_leg train-head 120 "$python" train_head.py --synthetic qwen3-0.6b --steps 200 --checkpoint-every 100 \
    --eval-prompts 2 --device cuda --out "$out/head-synthetic-0.6b"
run_leg sampling-memory 30 "$python" scripts/sampling_memory.py --device cuda
run_leg bench-compiled "$(( $(remaining) > 30 ? $(remaining) : 30 ))" "${bench[@]}" --compile \
    --json "$out/bench-compiled.json"

"$python" - "$out" "$(( $(date +%s) - start ))" "$dry_run" <<'EOF'
import json, re, subprocess, sys
from pathlib import Path

out, seconds, dry_run = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"


def device() -> dict:
    try:
        import torch, triton
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        return {"gpu": name, "torch": torch.__version__, "triton": triton.__version__}
    except Exception as error:  # the summary is still written
        return {"gpu": f"unknown ({error})"}


legs = []
for line in (out / "legs.tsv").read_text().splitlines():
    name, status, rc, leg_seconds, command = line.split("\t")
    leg = {"name": name, "status": status, "exit": int(rc) if rc else None, "seconds": int(leg_seconds),
           "command": command}
    log = out / f"{name}.log"
    if log.is_file():
        tail = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()
        leg["log"] = str(log)
        leg["log_tail"] = tail[-5:]
    report = out / f"{name}.json"
    if report.is_file():
        data = json.loads(report.read_text())
        leg["bench"] = {key: value for key, value in data.items() if key != "per_prompt"}
    if name == "train-head" and log.is_file():
        text = log.read_text(errors="replace")
        losses = re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", text)
        leg["train"] = {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                        "evals": [json.loads(l) for l in text.splitlines() if l.startswith('{"step"')]}
    legs.append(leg)
summary = {"dry_run": dry_run, **({} if dry_run else device()), "seconds": seconds, "legs": legs,
           "all_passed": all(leg["status"] == "passed" for leg in legs)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {out / 'summary.json'}")
for leg in legs:
    print(f"  {leg['name']:<15} {leg['status']:<13} {leg['seconds']:>4} s")
EOF
