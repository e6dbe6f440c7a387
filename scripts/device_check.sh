#!/usr/bin/env bash
# What a lent GPU (one H100/H200) runs first, in under 8 minutes: the GPU tests, the synthetic Qwen3-8B and
# Qwen3-30B-A3B benches, the 8B round's compile time, lossless checks on the embedded model (bf16 and fp32; eager,
# CUDA graphs, compiled), 100 training steps on CUDA and the projection speeds. Each leg has a time limit; logs,
# JSON reports and OUT_DIR/summary.json (every leg's status and figures) go to OUT_DIR. The legs and their limits
# are in scripts/device_check.py.
#
#   scripts/device_check.sh OUT_DIR             # on the GPU machine, from anywhere
#   scripts/device_check.sh --dry-run OUT_DIR   # print the plan and write a summary without running anything
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
exec "${PYTHON:-python3}" "$repo/scripts/device_check.py" "$@"
