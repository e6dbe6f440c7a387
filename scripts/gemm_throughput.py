"""The matrix products of a verify forward, timed alone: what the CPU's fp32 GEMM reaches for N tree rows.

    python scripts/gemm_throughput.py --shape qwen3-0.6b --rows 1,8,64 --threads 2

For each product of one decoder layer (fused qkv, o, fused gate_up, down) and the lm_head, with N rows, through
torch's `F.linear` (plain) and MKL's packed GEMM where nanojet's CPU rounds use it (`nanojet/model/packed_gemm.py`):
milliseconds and GFLOP/s. The last lines add up a whole forward (layers x the four products + the lm_head) at the
best of the two: a floor a verify of N nodes cannot beat on this machine. Each weight is timed alone and stays warm
in the caches, so one row here is faster than a real decode step, which streams every weight from memory.
Weights are random; the products are what counts.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanojet.bench.synthetic import synthetic_config  # noqa: E402
from nanojet.model.packed_gemm import can_pack  # noqa: E402


def timed(run, seconds: float = 0.3) -> float:
    """Mean seconds per call after one warmup call, over at least 3 calls and `seconds` of wall time."""
    run()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return (time.perf_counter() - start) / calls


def best_time(weight: torch.Tensor, rows: int) -> tuple[float, float, float | None]:
    """(best seconds, plain seconds, packed seconds or None) of x `[rows, K]` @ weight `[N, K]`.T."""
    x = torch.randn(rows, weight.shape[1])
    plain = timed(lambda: F.linear(x, weight))
    packed = None
    if can_pack(weight, rows):
        copy = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        packed = timed(lambda: torch.ops.mkl._mkl_linear(x, copy, weight, None, rows))
    return min(plain, packed or plain), plain, packed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help="a published Qwen3 shape (nanojet/bench/synthetic.py)")
    parser.add_argument("--rows", default="1,8,64", help="comma-separated row counts (tree nodes)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = synthetic_config(args.shape)
    hidden, q_size = config.hidden_size, config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    products = {"qkv": (q_size + 2 * kv_size, hidden), "o": (hidden, q_size),
                "gate_up": (2 * config.intermediate_size, hidden), "down": (hidden, config.intermediate_size),
                "lm_head": (config.vocab_size, hidden)}
    weights = {name: torch.randn(*shape) for name, shape in products.items()}
    forward_s = {}
    for rows in (int(r) for r in args.rows.split(",")):
        total = 0.0
        for name, weight in weights.items():
            best, plain, packed = best_time(weight, rows)
            gflop = 2 * rows * weight.numel() / 1e9
            packed_text = f"packed {packed * 1e3:8.3f} ms {gflop / packed:6.0f} GFLOP/s" if packed else "packed -"
            print(f"rows {rows:4d} {name:8s} {tuple(weight.shape)}: plain {plain * 1e3:8.3f} ms "
                  f"{gflop / plain:6.0f} GFLOP/s | {packed_text}")
            total += best * (1 if name == "lm_head" else config.num_hidden_layers)
        forward_s[rows] = total
    for rows, seconds in forward_s.items():
        print(f"{args.shape}: the matrix products of a forward over {rows} rows take {seconds * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
