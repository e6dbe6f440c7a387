"""MKL-packed weights (nanojet/model/packed_gemm.py): the same products as F.linear, only for the row counts and dtypes
they are made for, further copies only within a memory share, never under autograd."""
import pytest
import torch
import torch.nn.functional as F

from nanojet.model.packed_gemm import Linear, can_pack, linear, pack_module, pack_rows

needs_mkl = pytest.mark.skipif(not can_pack(torch.zeros(1, 1), 8), reason="torch built without MKL")


@needs_mkl
def test_packed_products_equal_plain_ones_at_their_row_count_only():
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    packed = {}
    pack_rows(packed, weight, 8)
    pack_rows(packed, weight, 16)  # a small weight gets a copy per row count
    assert list(packed) == [8, 16]
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


@needs_mkl
def test_further_row_counts_stay_within_the_memory_share(monkeypatch):
    """A weight's first copy is made whenever memory allows; copies for further row counts only while every copy
    alive stays under the share, and a copy freed gives its bytes back."""
    import nanojet.model.packed_gemm as packed_gemm
    weight = torch.randn(300, 64)
    size = 1.2 * weight.numel() * weight.element_size()
    monkeypatch.setattr(packed_gemm, "_held", {"bytes": 0, "limit": 2.5 * size})
    first, second = {}, {}
    for rows in (8, 16, 24):
        pack_rows(first, weight, rows)
    assert list(first) == [8, 16]  # the third copy would pass the limit
    pack_rows(second, weight, 8)
    assert list(second) == [8]  # a first copy is always made (memory permitting)
    del first
    import gc
    gc.collect()
    pack_rows(second, weight, 16)
    assert list(second) == [8, 16]  # the first dict's copies were given back
