"""The fused-MoE Triton kernel against the torch reference (interpreter on CPU, natively on CUDA), at awkward
routings: experts without tokens, one token, every token on one expert, top-8 of 128, several tiles per expert;
and the reference against a per-token loop that is obviously right."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports nanojet.kernels.triton_ops

import pytest  # noqa: E402
from test_kernels import DEVICES, TOLERANCE, assert_rounds_like_reference, device  # noqa: E402,F401

from nanojet import kernels  # noqa: E402
from nanojet.kernels import reference, triton_ops  # noqa: E402
from nanojet.kernels.triton_moe import moe_block_sizes, sort_pairs_by_expert  # noqa: E402


def moe_case(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
             device: str, experts_used: list[int] | None = None, seed: int = 0) -> dict:  # noqa: F811
    """Random inputs; each token's k distinct experts are drawn from `experts_used` (default: all)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts_used if experts_used is not None else range(num_experts))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:top_k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=generator)
    weights = weights / weights.sum(-1, keepdim=True)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(dtype=dtype, device=device)
    return dict(hidden=randn(num_tokens, hidden), gate_up=randn(num_experts, 2 * inter, hidden, scale=hidden ** -0.5),
                down=randn(num_experts, hidden, inter, scale=inter ** -0.5), topk_weights=weights.to(dtype).to(device),
                topk_ids=ids.to(device))


CASES = {  # (tokens, experts, top_k, hidden, inter, experts tokens may pick)
    "most-experts-empty": (5, 8, 2, 40, 24, [1, 4, 6]),
    "single-token": (1, 8, 2, 40, 24, None),
    "every-token-on-one-expert": (7, 6, 1, 40, 24, [3]),
    "top8-of-128": (3, 128, 8, 32, 16, None),
    "several-tiles-per-expert": (70, 2, 1, 24, 40, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference(device, name, dtype):  # noqa: F811 (the fixture imported above)
    tokens, experts, top_k, hidden, inter, used = CASES[name]
    case = moe_case(tokens, experts, top_k, hidden, inter, dtype, device, used)
    got = triton_ops.fused_moe(**case)
    expected = reference.fused_moe(**{k: v.cpu() for k, v in case.items()})
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE[dtype])
    assert_rounds_like_reference(got.cpu(), expected)


def test_several_tiles_per_expert_really_happen():
    """The last case above must span several BLOCK_M tiles of one expert in both dtypes, or it tests nothing."""
    for fp32 in (True, False):
        assert 70 > moe_block_sizes(fp32)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_routing_matches_reference(device, dtype, renormalize):  # noqa: F811
    """The router's softmax / top-k kernel: top-8 of 128 and top-2 of 6 (E not a power of two). The logits are
    distinct multiples of 1/8 (exact in bf16), so no two experts tie and both must pick the same ids."""
    generator = torch.Generator().manual_seed(1)
    for experts, top_k in ((128, 8), (6, 2)):
        ranks = torch.stack([torch.randperm(experts, generator=generator) for _ in range(9)])
        logits = ((ranks - experts / 2) / 8).to(dtype=dtype, device=device)
        weights, ids = triton_ops.topk_routing(logits, top_k, renormalize)
        expected_weights, expected_ids = reference.topk_routing(logits.cpu(), top_k, renormalize)
        assert weights.dtype == dtype and ids.dtype == torch.int64
        assert torch.equal(ids.cpu(), expected_ids)
        torch.testing.assert_close(weights.cpu(), expected_weights, **TOLERANCE[dtype])


def test_reference_equals_a_per_token_loop():
    case = moe_case(6, 8, 3, 16, 12, torch.float64, "cpu")
    expected = torch.zeros(6, 16, dtype=torch.float64)
    for t in range(6):
        for j in range(3):
            e = case["topk_ids"][t, j]
            gate, up = (case["gate_up"][e] @ case["hidden"][t]).chunk(2)
            expected[t] += case["topk_weights"][t, j] * (case["down"][e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(reference.fused_moe(**case), expected)


@pytest.mark.parametrize("block_m", [16, 64])
def test_pairs_sorted_into_single_expert_tiles(block_m):
    ids = torch.tensor([[5, 1], [1, 2], [5, 1], [0, 5]])
    sorted_pairs, block_experts = sort_pairs_by_expert(ids, 8, block_m)
    assert sorted_pairs.numel() == block_experts.numel() * block_m
    tiles = sorted_pairs.view(-1, block_m)
    flat = ids.flatten()
    seen = []
    for tile, expert in zip(tiles.tolist(), block_experts.tolist()):
        pairs = [p for p in tile if p < 8]
        if expert == 8:  # past the last run: padding only
            assert not pairs
            continue
        assert pairs and all(flat[p] == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == list(range(8))
    assert block_experts.tolist()[:4] == [0, 1, 2, 5]  # runs in expert order; experts 3, 4, 6, 7 have no tile


def test_moe_layer_on_the_triton_kernel(tmp_path):
    """A loaded MoE layer (router + stacked experts from an HF checkpoint) gives the same output on both backends."""
    from conftest import make_engine, write_hf_moe_model
    write_hf_moe_model(tmp_path, seed=7, num_hidden_layers=1, num_experts=16, num_experts_per_tok=4)
    layer = make_engine(tmp_path).target.layers[0].mlp
    h = torch.randn(11, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(h)
        kernels.set_backend("triton")
        try:
            got = layer(h)
        finally:
            kernels.set_backend(None)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


def test_example_args_fit_the_kernel():
    """What the ahead-of-time kernel gate launches: valid routing (distinct experts per token, all in range)."""
    from nanojet.kernels.triton_moe import example_args
    hidden, gate_up, down, weights, ids = example_args(5, 32, 16, 16, 4, torch.float32)
    assert gate_up.shape == (16, 32, 32) and down.shape == (16, 32, 16) and ids.dtype == torch.int64
    assert all(len(set(row)) == 4 for row in ids.tolist()) and int(ids.max()) < 16
    generator = torch.Generator().manual_seed(0)
    for tensor, scale in ((hidden, 1.0), (gate_up, 32 ** -0.5), (down, 16 ** -0.5)):  # sums of O(1) terms
        tensor.normal_(0.0, scale, generator=generator)
    torch.testing.assert_close(triton_ops.fused_moe(hidden, gate_up, down, weights, ids),
                               reference.fused_moe(hidden, gate_up, down, weights, ids), **TOLERANCE[torch.float32])
