"""The kernel gate (nanojet/tools/kernel_gate.py): every Triton kernel specialisation the engine, the head and training
launch compiles for sm_80 and sm_90 with Triton's own compiler and ptxas, without a GPU, spills no register and
fits each architecture's shared memory.

The gate runs in subprocesses (one per architecture, side by side): this pytest process has TRITON_INTERPRET=1,
under which kernels are interpreted, and it must stay so for the other tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPABILITIES = (80, 90)
ALL_KERNELS = {"_paged_attention_kernel", "_visible_order_kernel", "_combine_splits_kernel", "_rms_norm_kernel",
               "_qk_norm_rope_kernel", "_silu_and_mul_kernel", "_store_kv_kernel", "_move_kv_kernel",
               "_moe_gate_up_kernel", "_moe_down_kernel", "_moe_sum_kernel", "_topk_routing_kernel",
               "_linear_kernel", "_split_k_sum_kernel"}


def run_gates() -> dict[int, tuple[int, dict | None, str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {c: subprocess.Popen([sys.executable, "-m", "nanojet.tools.kernel_gate", "--capability", str(c), "--json"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in CAPABILITIES}
    results = {}
    for capability, process in runs.items():
        out, err = process.communicate(timeout=900)
        lines = out.strip().splitlines()
        results[capability] = (process.returncode, json.loads(lines[-1]) if lines else None, err[-2000:])
    return results


def test_every_kernel_specialisation_compiles_for_sm80_and_sm90_without_spills():
    for capability, (returncode, report, err) in run_gates().items():
        assert report is not None, f"sm_{capability}: the gate printed no report:\n{err}"
        assert report["errors"] == [], report["errors"]  # each names the kernel and the workload/shape
        assert report["spills"] == [], report["spills"]
        assert report["over_shared_memory"] == [], report["over_shared_memory"]
        assert report["not_covered"] == []
        assert returncode == 0, err
        records = report["kernels"]
        assert {r["kernel"] for r in records} == ALL_KERNELS
        assert all(r["registers"] > 0 for r in records)  # ptxas's log was read for every kernel
        attention = [r for r in records if r["kernel"] == "_paged_attention_kernel"]
        # Both split-K modes, bf16 tensor-core and fp32 exact dots, GQA groups 2 and 4; tiles fixed per dtype
        # (row invariance): 64 rows in bf16, 16 in fp32, whatever the row count.
        constants = [r["constants"] for r in attention]
        assert {(c["SPLIT_K"], c["COMPUTE_FP32"]) for c in constants} == {(a, b) for a in (0, 1) for b in (0, 1)}
        assert {(c["COMPUTE_FP32"], c["BLOCK_R"]) for c in constants} == {(0, 64), (1, 16)}
        assert {c["GROUP"] for c in constants} == {2, 4}
        linear = [r for r in records if r["kernel"] == "_linear_kernel"]
        # One specialisation per weight shape and dtype, whatever the row count; split K and one K range each.
        assert {(r["constants"]["PARTIAL"], r["constants"]["COMPUTE_FP32"]) for r in linear} == \
            {(a, b) for a in (0, 1) for b in (0, 1)}
        launched_by = {w for r in records for w in r["launched_by"]}
        for workload in ("tree verify qwen3-8b bfloat16 n=512", "draft block qwen3-0.6b float32 n=16",
                         "prefill qwen3-8b bfloat16 n=512", "commit qwen3-8b float32 n=1",
                         "training step qwen3-0.6b bfloat16 n=1024",
                         "projections qwen3-30b-a3b qwen3-0.6b bfloat16 n=1"):
            assert workload in launched_by
