"""MKL-packed weights for the CPU's small matrix products (eager rounds on the CPU, fp32).

A round's matrix products have a few rows: a tree of 8 nodes, a draft block of 16. MKL's fp32 GEMM, which torch
runs on the CPU, is as fast for one or two rows as a matrix-vector product, but for 3..15 rows it costs about one
weight read per pair of rows, and only from 16 rows on it switches to a proper GEMM (measured on this project's
2-core machine, 151,936 x 1,024 lm_head: 1 row 20 ms, 8 rows 71 ms, 15 rows 123 ms, 16 rows 50 ms). MKL's packed
GEMM (`cblas_sgemm_pack`, exposed as `torch.ops.mkl`) reorders a weight once for a given row count and then
reads it once per product: 8 rows 32 ms, 15 rows 37 ms, 16 rows 37 ms.

A round's shapes are static, so its row counts are known when it is built, and `pack_rows` reorders each weight
once per row count the round uses (a copy about 1.14x the weight's size each; only counts where the packed GEMM
was measured to win, 3..31). `linear` uses the packed copy when the input has exactly those rows, and is plain
`F.linear` otherwise (other devices and dtypes, prefill, autograd, torch.compile).
"""
import torch
import torch.nn.functional as F
from torch import nn

PACKED_ROWS = range(3, 32)  # row counts where the packed GEMM beat F.linear on the CPU


def can_pack(weight: torch.Tensor, rows: int) -> bool:
    return (rows in PACKED_ROWS and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"))


def pack_rows(packed: dict[int, torch.Tensor], weight: torch.Tensor, rows: int) -> None:
    """Add `weight` reordered for products with `rows` rows to `packed` (a no-op where packing does not apply)."""
    if rows not in packed and can_pack(weight, rows):
        packed[rows] = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed copy of `weight` for x's row count when there is one."""
    if packed and not torch.compiler.is_compiling() and x.dim() == 2 and x.shape[0] in packed \
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return torch.ops.mkl._mkl_linear(x, packed[x.shape[0]], weight, bias, x.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that holds packed copies of its weight (`pack_rows`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def pack_module(module: nn.Module, rows: int) -> None:
    """Pack every `Linear` inside `module` for products with `rows` rows."""
    for layer in module.modules():
        if isinstance(layer, Linear):
            pack_rows(layer.packed, layer.weight, rows)
