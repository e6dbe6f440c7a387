"""MKL-packed weights for the CPU's small matrix products (eager rounds on the CPU, fp32).

A round's matrix products have a few rows: a tree of 8 nodes, a draft block of 16. MKL's fp32 GEMM, which torch
runs on the CPU, is as fast for one or two rows as a matrix-vector product, but for 3..15 rows it costs about one
weight read per pair of rows; only from 16 rows on it is a proper GEMM. MKL's packed GEMM (`cblas_sgemm_pack`,
exposed as `torch.ops.mkl`) reorders a weight once for a given row count and then reads it once per product
(timings: docs/round-cost.md, `scripts/gemm_throughput.py`).

A round's shapes are static, so its row counts are known when it is built, and `pack_rows` reorders a weight for
each round shape that multiplies it by a row count where the packed GEMM was measured to win (3..31). A packed copy
is about 1.14x the weight's size. A weight's first copy is made while the machine has `MEMORY_HEADROOM` times its
size available; copies for further row counts (a budget sweep, several batch sizes) only while all the copies this
process holds stay under `EXTRA_COPIES_SHARE` of the memory that was available when the first was made, so a large
model keeps one copy and a small one gets a copy per shape (else a later shape in a sweep runs the slow GEMM and
looks worse than it is). `linear` uses the packed copy
when the input has exactly its rows and the weight has not been written since it was packed (its version counter),
and `kernels.linear` otherwise: `F.linear` on the CPU (other dtypes, prefill, autograd, torch.compile), the
row-invariant Triton kernel on a GPU (nanojet/kernels/triton_linear.py), where a projection's bits must not depend
on how many rows share it.
"""
import weakref
from pathlib import Path

import torch
from torch import nn

from nanojet import kernels

PACKED_ROWS = range(3, 32)  # row counts where the packed GEMM beat F.linear on the CPU
MEMORY_HEADROOM = 4  # pack only while MemAvailable >= this many packed copies
EXTRA_COPIES_SHARE = 0.25  # copies beyond a weight's first: all copies together under this share of MemAvailable
_held = {"bytes": 0, "limit": None}  # bytes of the packed copies alive in this process; the limit, set at the first


def can_pack(weight: torch.Tensor, rows: int) -> bool:
    return (rows in PACKED_ROWS and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"))


def available_memory_bytes() -> int | None:
    """Linux's MemAvailable, or None where /proc/meminfo cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def pack_rows(packed: dict[int, tuple[int, torch.Tensor]], weight: torch.Tensor, rows: int) -> None:
    """Give `weight` a copy reordered for products with `rows` rows, kept in `packed`, unless it has one for that
    count already or packing does not apply (device, dtype, row count, memory; see the module's docstring)."""
    if rows in packed or not can_pack(weight, rows):
        return
    size = 1.2 * weight.numel() * weight.element_size()
    available = available_memory_bytes()
    if available is not None and available < MEMORY_HEADROOM * size:
        return
    if _held["limit"] is None:
        _held["limit"] = EXTRA_COPIES_SHARE * available if available is not None else 0
    if packed and _held["bytes"] + size > _held["limit"]:
        return  # a further row count for this weight: only within the share
    copy = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    _held["bytes"] += size
    weakref.finalize(copy, _release, size)  # the copy dies with its dict (its model or round)
    packed[rows] = weight_version(weight), copy


def _release(size: float) -> None:
    _held["bytes"] -= size


def weight_version(weight: torch.Tensor) -> int:
    """The weight's in-place write counter; -1 for a tensor made under inference_mode, which keeps none (such as a
    draft vocabulary's lm_head rows, derived data nothing trains)."""
    return -1 if weight.is_inference() else weight._version


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: dict[int, tuple[int, torch.Tensor]] | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`kernels.linear(x, weight, bias, out_dtype)`, through the packed copy of `weight` for x's row count when there
    is a current one (`packed` as `pack_rows` fills it: row count -> (the weight's version when packed, packed
    copy))."""
    if packed and x.dim() == 2 and x.shape[0] in packed and not torch.compiler.is_compiling() \
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        version, copy = packed[x.shape[0]]
        if version == weight_version(weight):  # else the weight was written since (training): the copy is stale
            out = torch.ops.mkl._mkl_linear(x, copy, weight, bias, x.shape[0])
            return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)
    return kernels.linear(x, weight, bias, out_dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that holds packed copies of its weight (`pack_rows`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed: dict[int, tuple[int, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def pack_module(module: nn.Module, rows: int) -> None:
    """Pack every `Linear` inside `module` for products with `rows` rows."""
    for layer in module.modules():
        if isinstance(layer, Linear):
            pack_rows(layer.packed, layer.weight, rows)
