"""The row-invariant projection kernel (nanojet/kernels/triton_linear.py) against `F.linear`: interpreter on CPU,
natively on CUDA. Its row invariance: tests/test_row_invariance.py."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports nanojet.kernels.triton_ops

import pytest  # noqa: E402
from test_kernels import DEVICES, TOLERANCE, device, randn  # noqa: E402,F401

from nanojet.kernels import reference, triton_ops  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features", [(5, 40, 96), (70, 33, 200), (1, 128, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(device, dtype, rows, out_features, in_features, bias):  # noqa: F811
    """Row counts across the 64-row tile, sizes off the tiles' multiples, a split K (128 x 2048, the router's
    shape), and the fp32 output the lm_head takes (one rounding, so it meets the fp32 tolerance)."""
    generator = torch.Generator().manual_seed(rows)
    x = randn(rows, in_features, dtype=dtype, device=device, generator=generator)
    weight = randn(out_features, in_features, dtype=dtype, device=device, generator=generator) * in_features ** -0.5
    b = randn(out_features, dtype=dtype, device=device, generator=generator) if bias else None
    out = triton_ops.linear(x, weight, b)
    expected = reference.linear(x, weight, b)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    logits = triton_ops.linear(x.view(1, rows, in_features), weight, b, torch.float32)
    assert logits.dtype == torch.float32 and logits.shape == (1, rows, out_features)
    torch.testing.assert_close(logits[0].double(), exact, **TOLERANCE[torch.float32])
