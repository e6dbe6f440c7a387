"""Row-invariant `y = x @ W^T (+ b)` in Triton: the target's projections, its lm_head and the MoE router on a GPU.

The invariant: a row's output bits depend only on that row and the weights, never on how many rows share the
launch or where the row sits among them. cuBLAS does not promise this: it picks other kernels, tilings and split-K
counts for other row counts, so a tree node verified among k+1 rows and the same token decoded alone round
differently in bf16 (issue 27). Here every choice that shapes the arithmetic comes from `linear_config(N, K,
dtype)`, a function of the weight's shape and dtype only:

- rows are padded to a fixed `BLOCK_M` (64 in bf16/fp16), so the same `tl.dot` tile shapes multiply every row,
  whichever of the tile's rows it is, and padding rows (zeros) only reach their own outputs;
- the reduction over K runs in `BLOCK_K` steps in order, each step accumulated in fp32;
- when the weight has too few `BLOCK_N` column tiles to keep the GPU's memory busy at one row, K is split into
  `split_k` fixed ranges whose fp32 partial sums are added in split order by a second kernel (no atomics);
- the row count is a runtime argument Triton does not specialise on, so every row count runs one compiled kernel.

Speed: at 1 to 64 rows a projection is bound by reading the weights once. With `BLOCK_M` = 64 one row tile covers
every decode batch and tree up to 64 nodes, so the weights stream once whatever the row count; the padded rows cost
tensor-core work (64 multiply-adds per weight element, under the roughly 200 per byte an H100/H200 can do while
streaming), not memory traffic. `BLOCK_N` and `split_k` give at least `MIN_PROGRAMS` programs (about one per
multiprocessor of an H100/H200), each keeping `num_stages - 1` weight tiles in flight. Timings:
scripts/projection_speed.py (a GPU).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MIN_PROGRAMS = 128  # programs a one-tile launch should have: about one per multiprocessor (132 on an H100/H200)
MIN_K_BLOCKS_PER_SPLIT = 4  # a split shorter than this cannot fill the software pipeline


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def linear_config(out_features: int, in_features: int, dtype: torch.dtype) -> LinearConfig:
    """The launch configuration for a weight `[out_features, in_features]` multiplied in `dtype`: a function of the
    weight's shape and dtype only, never of the row count (see the module's docstring)."""
    if dtype == torch.float32:  # exact fp32 dots (FMA, no tensor cores): small tiles keep registers free
        block_m, block_k, widths, warps, stages = 32, 32, (32,), 4, 2
    else:  # bf16 / fp16 tensor-core dots
        block_m, block_k, widths, warps, stages = 64, 128, (64, 32), 4, 4
    block_n = next((w for w in widths if triton.cdiv(out_features, w) >= MIN_PROGRAMS), widths[-1])
    column_tiles, k_blocks = triton.cdiv(out_features, block_n), triton.cdiv(in_features, block_k)
    split = 1
    while column_tiles * split < MIN_PROGRAMS and k_blocks >= 2 * split * MIN_K_BLOCKS_PER_SPLIT:
        split *= 2
    return LinearConfig(block_m, block_n, block_k, split, warps, stages)


@triton.jit(do_not_specialize=["num_rows"])
def _linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, num_rows, out_features, in_features, k_per_split,
                   stride_x, stride_w, stride_out_split, stride_out,
                   HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, COMPUTE_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One `BLOCK_M x BLOCK_N` output tile over one K range. Row tiles vary fastest in the grid, so the programs
    that read one weight tile (prefill's row tiles) run side by side and share it through L2."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_valid = rows < num_rows
    # Columns past the end read the last weight row again (never stored): the weight loads need no mask.
    weight_rows = tl.minimum(cols, out_features - 1).to(tl.int64)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_cols = w_ptr + weight_rows[None, :] * stride_w
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + ks[None, :], mask=row_valid[:, None], other=0.0)
            w = tl.load(w_cols + ks[:, None])  # [BLOCK_K, BLOCK_N]
        else:
            k_valid = ks < k_end
            x = tl.load(x_rows + ks[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            w = tl.load(w_cols + ks[:, None], mask=k_valid[:, None], other=0.0)
        if COMPUTE_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    mask = row_valid[:, None] & (cols < out_features)[None, :]
    if PARTIAL:  # fp32 partial sums of this split; `_split_k_sum_kernel` adds them up
        out_rows = out_ptr + split.to(tl.int64) * stride_out_split + rows.to(tl.int64)[:, None] * stride_out
        tl.store(out_rows + cols[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + weight_rows).to(tl.float32)[None, :]
        out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
        tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_sum_kernel(partial_ptr, bias_ptr, out_ptr, out_features, stride_split, stride_partial, stride_out,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One row's block of columns: the splits' partial sums added in split order, then the bias, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < out_features
    acc = tl.load(partial_ptr + row * stride_partial + cols, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial_ptr + split * stride_split + row * stride_partial + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_sum_config(out_features: int) -> dict:
    block = min(1024, triton.next_power_of_2(out_features))
    return dict(BLOCK=block, num_warps=max(1, min(8, block // 256)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, config: LinearConfig | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x `[..., K]`, weight `[N, K]` (same dtype), bias `[N]`: fp32 accumulation,
    the bias added in fp32, rounded once to `out_dtype` (default x's dtype; fp32 for the lm_head's logits).
    `config` overrides `linear_config` (measurements and tests only: the engine must not pass one)."""
    if x.dtype != weight.dtype:
        raise ValueError(f"linear needs x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    out_features, in_features = weight.shape
    out = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype or x.dtype, device=x.device)
    rows = x.reshape(-1, in_features)
    num_rows = rows.shape[0]
    if out.numel() == 0:
        return out
    if in_features == 0:
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    rows, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (rows, weight))
    out_rows = out.view(num_rows, out_features)
    config = config or linear_config(out_features, in_features, x.dtype)
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.block_k), config.split_k) * config.block_k
    partial = None
    if config.split_k > 1:
        partial = torch.empty(config.split_k, num_rows, out_features, dtype=torch.float32, device=x.device)
    target = out_rows if partial is None else partial
    grid = (triton.cdiv(num_rows, config.block_m), triton.cdiv(out_features, config.block_n), config.split_k)
    _linear_kernel[grid](
        rows, weight, bias if bias is not None else weight, target, num_rows, out_features, in_features,
        k_per_split, rows.stride(0), weight.stride(0), partial.stride(0) if partial is not None else 0,
        target.stride(-2), HAS_BIAS=bias is not None, PARTIAL=partial is not None,
        EVEN_K=in_features % config.block_k == 0,
        COMPUTE_FP32=x.dtype == torch.float32 or _interpreted(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if partial is not None:
        sum_config = split_k_sum_config(out_features)
        _split_k_sum_kernel[(num_rows, triton.cdiv(out_features, sum_config["BLOCK"]))](
            partial, bias if bias is not None else partial, out_rows, out_features, partial.stride(0),
            partial.stride(1), out_rows.stride(0), SPLIT_K=config.split_k, HAS_BIAS=bias is not None, **sum_config)
    return out


def _interpreted() -> bool:
    """The interpreter multiplies bf16 `tl.dot` operands as raw bits: 16-bit inputs are multiplied in fp32 there."""
    return type(_linear_kernel).__name__ == "InterpretedFunction"
