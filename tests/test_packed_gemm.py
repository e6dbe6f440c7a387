"""MKL-packed weights (nanojet/packed_gemm.py): the same products as F.linear, only for the row counts and dtypes
they are made for, one packed copy per weight, never under autograd."""
import pytest
import torch
import torch.nn.functional as F

from nanojet.packed_gemm import Linear, can_pack, linear, pack_module, pack_rows

needs_mkl = pytest.mark.skipif(not can_pack(torch.zeros(1, 1), 8), reason="torch built without MKL")


@needs_mkl
def test_packed_products_equal_plain_ones_at_their_row_count_only():
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    packed = {}
    pack_rows(packed, weight, 8)
    pack_rows(packed, weight, 16)  # one packed copy per weight: the first row count keeps it
    assert list(packed) == [8]
    for rows in (1, 8, 16):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(linear(x, weight, bias, packed), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    for rows, dtype in ((2, torch.float32), (32, torch.float32), (8, torch.bfloat16)):
        none = {}
        pack_rows(none, weight.to(dtype), rows)
        assert none == {}, (rows, dtype)


@needs_mkl
def test_a_packed_linear_still_trains():
    torch.manual_seed(0)
    layer = Linear(64, 32)
    pack_module(layer, 8)
    assert list(layer.packed) == [8]
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).sum().backward()  # autograd takes F.linear: the packed op has no backward
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        layer.weight.add_(1.0)  # a training step: the packed copy is stale and must not be used
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
