"""Triton kernels against the torch reference, and the reference attention against SDPA. (Their row invariance,
which losslessness in bf16 rests on: tests/test_row_invariance.py.)

Without CUDA the kernels run on CPU tensors under the Triton interpreter, which must be switched on before
`nanojet.kernels.triton_ops` defines them. With CUDA (and TRITON_INTERPRET unset or 0) the same cases run natively as
`gpu`-marked tests, plus a timing printout (`pytest -m gpu -s`).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports nanojet.kernels.triton_ops

import inspect  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from trees import tree_mask  # noqa: E402

from nanojet.kernels import reference, triton_ops  # noqa: E402

INTERPRETED = type(triton_ops._rms_norm_kernel).__name__ == "InterpretedFunction"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before nanojet.kernels.triton_ops loads")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETED or not torch.cuda.is_available(), reason="native Triton needs CUDA and TRITON_INTERPRET unset")]),
]
# bf16 tolerances allow a couple of ulps: the interpreter truncates fp32 -> bf16 where GPUs round to nearest.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def assert_rounds_like_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """On a GPU, where fp32 -> bf16 rounds to nearest as in torch, nearly every bf16 element must match bit for
    bit; a missed rounding point (e.g. HF's cast before the norm weight) breaks about a quarter of them."""
    if INTERPRETED or actual.dtype != torch.bfloat16:
        return
    same = (actual == expected).float().mean().item()
    assert same > 0.98, f"only {same:.1%} of bf16 elements match the reference bit for bit"


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def randn(*shape, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Drawn on CPU from a seeded generator (same values on every device; the global RNG is left alone)."""
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name", ["paged_attention", "rms_norm", "qk_norm_rope", "silu_and_mul", "store_kv",
                                  "move_kv", "fused_moe", "linear", "topk_routing"])
def test_triton_ops_take_the_reference_arguments(name):
    """nanojet/kernels/__init__.py calls both modules with the reference's positional arguments (the reference's keyword-only
    ones, a forward's plan, are its own)."""
    expected = [parameter.name for parameter in inspect.signature(getattr(reference, name)).parameters.values()
                if parameter.kind != inspect.Parameter.KEYWORD_ONLY]
    assert list(inspect.signature(getattr(triton_ops, name)).parameters)[:len(expected)] == expected


def test_a_kernel_triton_cannot_build_is_an_error_naming_kernel_and_shapes(monkeypatch):
    """E.g. a tile over the GPU's shared memory: a one-line error with the kernel and its inputs, no fallback."""
    from triton.runtime.errors import OutOfResources

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300000, 232448, "shared memory")
            return launch
    monkeypatch.setattr(triton_ops, "_rms_norm_kernel", Unbuildable())
    x = torch.zeros(3, 64)
    with pytest.raises(RuntimeError, match=r"Triton kernel rms_norm cannot run on cpu for inputs \[\[3, 64\] float32, "
                                           r"\[64\] float32\]: out of resource: shared memory"):
        triton_ops.rms_norm(x, torch.ones(64), 1e-6)


# ---------------------------------------------------------------------------------------------------------
# visibility masks among a sequence's new tokens: bool [n, n], row i = what query i sees


def causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()



def tree_parents(kind: str, n: int, generator: torch.Generator) -> list[int]:
    if kind == "chain":
        return [i - 1 for i in range(n)]
    if kind == "star":
        return [-1] + [0] * (n - 1)
    return [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, n)]


def block_mask(n: int, block: int, causal_between_blocks: bool) -> torch.Tensor:
    """Full attention inside blocks of `block` tokens; across blocks causal (earlier blocks visible) or none."""
    index = torch.arange(n) // block
    if causal_between_blocks:
        return index[None, :] <= index[:, None]
    return index[None, :] == index[:, None]


# ---------------------------------------------------------------------------------------------------------
# paged attention


def attention_case(sequences: list[tuple[int, torch.Tensor]], q_heads: int, kv_heads: int, head_dim: int,
                   page_size: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Inputs of one paged_attention step. `sequences` = [(prefix_len, new-token mask [n, n])]; each sequence
    gets scattered pages (shuffled pool, spare pages, block tables padded past its length)."""
    generator = torch.Generator().manual_seed(seed)
    pages_needed = [-(-(prefix + mask.shape[0]) // page_size) for prefix, mask in sequences]
    num_pages = sum(pages_needed) + 3
    order = torch.randperm(num_pages, generator=generator)
    block_tables = torch.zeros(len(sequences), max(pages_needed) + 2, dtype=torch.int32)
    used = 0
    for s, count in enumerate(pages_needed):
        block_tables[s, :count] = order[used:used + count]
        used += count
    counts = [mask.shape[0] for _, mask in sequences]
    width = max(max(counts), 1)
    masks = torch.cat([F.pad(mask, (0, width - mask.shape[1])) for _, mask in sequences])
    return dict(
        q=randn(sum(counts), q_heads, head_dim, dtype=dtype, device=device, generator=generator),
        k_cache=randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device, generator=generator),
        v_cache=randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device, generator=generator),
        block_tables=block_tables.to(device),
        prefix_lens=torch.tensor([prefix for prefix, _ in sequences], dtype=torch.int32, device=device),
        query_starts=torch.tensor([0] + counts).cumsum(0).to(torch.int32).to(device),
        visibility=reference.pack_visibility(masks).to(device),
        scale=head_dim ** -0.5,
    )


def check_attention(case: dict, **options) -> torch.Tensor:
    out = triton_ops.paged_attention(**case, **options)
    expected = reference.paged_attention(**case)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **TOLERANCE[case["q"].dtype])
    return out


def test_reference_attention_matches_sdpa():
    generator = torch.Generator().manual_seed(0)
    prefix, q_heads, kv_heads, head_dim, page_size = 23, 8, 2, 32, 8
    mask = tree_mask(tree_parents("random", 20, generator))
    case = attention_case([(prefix, mask)], q_heads, kv_heads, head_dim, page_size, torch.float32, "cpu")
    n = mask.shape[0]
    assert torch.equal(reference.unpack_visibility(case["visibility"], n), mask)

    logical = torch.arange(prefix + n)
    slots = case["block_tables"][0].long()[logical // page_size] * page_size + logical % page_size
    keys = case["k_cache"].flatten(0, 1)[slots].transpose(0, 1)[None]  # [1, Hkv, keys, D]
    values = case["v_cache"].flatten(0, 1)[slots].transpose(0, 1)[None]
    dense = torch.cat([torch.ones(n, prefix, dtype=torch.bool), mask], dim=1)  # [n, keys]
    expected = F.scaled_dot_product_attention(case["q"].transpose(0, 1)[None], keys, values, attn_mask=dense,
                                              scale=case["scale"], enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(reference.paged_attention(**case), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_varlen(device, dtype, q_heads, kv_heads, head_dim):
    """Prefill, decode, tree verify and an idle sequence in one launch; pages of 16 crossed everywhere."""
    generator = torch.Generator().manual_seed(1)
    sequences = [(0, causal_mask(13)), (37, causal_mask(1)), (45, tree_mask(tree_parents("random", 9, generator))),
                 (20, causal_mask(0))]
    check_attention(attention_case(sequences, q_heads, kv_heads, head_dim, 16, dtype, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_paged_attention_decode_long_prefix(device, dtype, num_splits):
    sequences = [(333, causal_mask(1)), (70, causal_mask(1)), (0, causal_mask(1))]
    check_attention(attention_case(sequences, 8, 2, 128, 16, dtype, device), num_splits=num_splits)


@pytest.mark.parametrize("kind", ["random", "chain", "star"])
@pytest.mark.parametrize("nodes", [1, 2, 33, 100])
def test_paged_attention_tree(device, kind, nodes):
    generator = torch.Generator().manual_seed(nodes)
    mask = tree_mask(tree_parents(kind, nodes, generator))
    check_attention(attention_case([(19, mask)], 4, 1, 64, 8, torch.float32, device, seed=nodes))


def test_paged_attention_tree_512_nodes(device):
    generator = torch.Generator().manual_seed(512)
    mask = tree_mask(tree_parents("random", 512, generator))
    check_attention(attention_case([(40, mask)], 2, 1, 16, 16, torch.bfloat16, device))


@pytest.mark.parametrize("causal_between_blocks", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_block_masks(device, causal_between_blocks, dtype):
    """The draft head's shapes: full blocks of 4 over a context prefix, several sequences, GQA 8."""
    sequences = [(30, block_mask(12, 4, causal_between_blocks)), (0, block_mask(7, 4, causal_between_blocks))]
    check_attention(attention_case(sequences, 8, 1, 128, 16, dtype, device))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_attention_query_that_sees_nothing(device, num_splits):
    mask = causal_mask(5)
    mask[2] = False
    case = attention_case([(0, mask), (10, mask)], 4, 2, 64, 8, torch.float32, device)
    out = check_attention(case, num_splits=num_splits)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # no prefix, nothing visible: zeros, not NaN
    assert out[7].abs().sum() > 0                          # same row with a prefix sees the prefix


def test_paged_attention_max_new_tokens_hint(device):
    generator = torch.Generator().manual_seed(3)
    sequences = [(5, causal_mask(3)), (17, tree_mask(tree_parents("random", 6, generator))), (9, causal_mask(1))]
    check_attention(attention_case(sequences, 4, 2, 64, 4, torch.bfloat16, device), max_new_tokens=6)


# ---------------------------------------------------------------------------------------------------------
# elementwise kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, shape, with_residual):
    generator = torch.Generator().manual_seed(0)
    x = randn(*shape, dtype=dtype, device=device, generator=generator)
    residual = randn(*shape, dtype=dtype, device=device, generator=generator) if with_residual else None
    weight = randn(shape[-1], dtype=dtype, device=device, generator=generator)
    normed, total = triton_ops.rms_norm(x, weight, 1e-6, residual)
    expected_normed, expected_total = reference.rms_norm(x, weight, 1e-6, residual)
    assert normed.dtype == expected_normed.dtype and total.dtype == expected_total.dtype
    torch.testing.assert_close(normed, expected_normed, **TOLERANCE[dtype])
    assert_rounds_like_reference(normed, expected_normed)
    if with_residual:
        torch.testing.assert_close(total, expected_total, **TOLERANCE[dtype])
        assert_rounds_like_reference(total, expected_total)
    else:
        assert total is x


def test_rms_norm_fp32_weight_promotes(device):
    generator = torch.Generator().manual_seed(0)
    x = randn(3, 64, dtype=torch.bfloat16, device=device, generator=generator)
    weight = randn(64, device=device, generator=generator)
    normed, _ = triton_ops.rms_norm(x, weight, 1e-6)
    expected, _ = reference.rms_norm(x, weight, 1e-6)
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, expected, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_qk_norm_rope(device, dtype, head_dim):
    """q and k are strided views of a fused qkv projection, as in the model; positions reach 40k.

    What losslessness needs of this kernel: a token's result must not depend on the tokens beside it (each token
    alone equals itself among the others, bit for bit), and it must stay close to the reference. Matching the
    reference's bits is not needed (plain and speculative decoding both run the kernel), and the GPU's sin, cos and
    rsqrt need not round as torch's do."""
    generator = torch.Generator().manual_seed(0)
    tokens, q_heads, kv_heads = 5, 4, 2
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, generator=generator)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim)
    q_weight = randn(head_dim, dtype=dtype, device=device, generator=generator)
    k_weight = randn(head_dim, dtype=dtype, device=device, generator=generator)
    positions = torch.randint(0, 40000, (tokens,), generator=generator).to(device)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device)
    args = (q_weight, k_weight, positions, inv_freq, 1e-6)
    # q*cos + rotate(q)*sin can cancel: allow one bf16 ulp of the products (|.| < 8), not of the result.
    tolerance = TOLERANCE[dtype] if dtype == torch.float32 else dict(atol=1 / 16, rtol=2e-2)
    together = triton_ops.qk_norm_rope(q, k, *args)
    for actual, expected in zip(together, reference.qk_norm_rope(q, k, *args)):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, **tolerance)
    for t in range(tokens):
        alone = triton_ops.qk_norm_rope(q[t:t + 1], k[t:t + 1], q_weight, k_weight, positions[t:t + 1], inv_freq, 1e-6)
        for one, among in zip(alone, together):
            assert torch.equal(one[0], among[t]), f"token {t} alone != among {tokens}"
    empty_q, k_only = triton_ops.qk_norm_rope(k[:, :0], k, *args)  # the draft head's K-only call
    assert empty_q.shape == (tokens, 0, head_dim)
    torch.testing.assert_close(k_only, reference.qk_norm_rope(k[:, :0], k, *args)[1], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 77), (2, 3, 2 * 1500)])
def test_silu_and_mul(device, dtype, shape):
    gate_up = randn(*shape, dtype=dtype, device=device, generator=torch.Generator().manual_seed(0)) * 4
    out = triton_ops.silu_and_mul(gate_up)
    expected = reference.silu_and_mul(gate_up)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    assert_rounds_like_reference(out, expected)


@pytest.mark.parametrize("source_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                      (torch.bfloat16, torch.bfloat16)])
def test_store_kv(device, source_dtype, cache_dtype):
    """Strided k/v (views of a fused projection), a padding slot (-1), writes across pages."""
    generator = torch.Generator().manual_seed(0)
    tokens, kv_heads, head_dim, pages, page_size = 6, 3, 64, 5, 4
    kv = randn(tokens, 2 * kv_heads * head_dim, dtype=source_dtype, device=device, generator=generator)
    k, v = (t.view(tokens, kv_heads, head_dim) for t in kv.chunk(2, dim=-1))
    slots = torch.tensor([3, 4, -1, 17, 0, 9], device=device)
    caches = [randn(pages, page_size, kv_heads, head_dim, dtype=cache_dtype, device=device, generator=generator)
              for _ in range(2)]
    expected = [c.clone() for c in caches]
    triton_ops.store_kv(*caches, k, v, slots)
    reference.store_kv(*expected, k, v, slots)
    for actual, wanted in zip(caches, expected):
        if source_dtype == cache_dtype or not INTERPRETED:
            assert torch.equal(actual, wanted)
        else:  # the interpreter truncates fp32 -> bf16 instead of rounding to nearest
            torch.testing.assert_close(actual, wanted, **TOLERANCE[cache_dtype])


@pytest.mark.parametrize("kept", [[0], [0, 1, 2], [0, 2, 3], [1, 2, 3, 4, 5, 6, 7], [0, 3, 4, 9, 13], [2, 5, 11],
                                  [0, 5, 9, 3, 4, 5, 6, 7], [0, 1, 2, 3]])
def test_move_kv_commit_pattern(device, kept):
    """Commit moves rows kept[j] -> j of the scratch, where a destination is often an earlier move's source
    (e.g. [1, 2, ...]: row 1 -> 0 and row 2 -> 1); every layer, k and v, across pages. The compiled round's
    fixed-size commit pads with identity moves (j -> j past the accepted count: [0, 5, 9, 3, 4, ...])."""
    generator = torch.Generator().manual_seed(len(kept))
    layers, pages, page_size, kv_heads, head_dim = 3, 8, 4, 2, 16
    pool = randn(layers, 2, pages, page_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device,
                 generator=generator)
    page_table = torch.randperm(pages, generator=generator)
    start = 5  # committed length: scratch starts mid-page

    def flat_slots(logical: torch.Tensor) -> torch.Tensor:
        return (page_table[logical // page_size] * page_size + logical % page_size).to(device)

    src = flat_slots(start + torch.tensor(kept))
    dst = flat_slots(start + torch.arange(len(kept)))
    expected = pool.clone()
    reference.move_kv(expected, src, dst)
    triton_ops.move_kv(pool, src, dst)
    assert torch.equal(pool, expected)


# ---------------------------------------------------------------------------------------------------------
# GPU timing printout (pytest -m gpu -s)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and native Triton")
def test_attention_timing():
    def timed(case: dict, repeats: int = 20) -> float:
        triton_ops.paged_attention(**case)
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(repeats):
            triton_ops.paged_attention(**case)
        torch.cuda.synchronize()
        return (time.perf_counter() - begin) / repeats

    generator = torch.Generator().manual_seed(0)
    prefix = 4096
    for name, mask in [("decode", causal_mask(1)), ("verify 64", tree_mask(tree_parents("random", 64, generator))),
                       ("verify 512", tree_mask(tree_parents("random", 512, generator))),
                       ("prefill 2048", causal_mask(2048))]:
        case = attention_case([(prefix, mask)], 32, 8, 128, 16, torch.bfloat16, "cuda")
        seconds = timed(case)
        kv_bytes = 2 * (prefix + mask.shape[0]) * 8 * 128 * 2
        print(f"\npaged_attention {name:>12} prefix {prefix}: {seconds * 1e6:8.1f} us, "
              f"K/V read once = {kv_bytes / seconds / 1e9:7.1f} GB/s")


@pytest.mark.parametrize("n", [1, 9])
def test_reference_attention_batched_path_equals_the_loop(n):
    """Steps where every sequence has the same number of new tokens (batched rounds, decode steps) take a batched
    path in the reference; it must agree with the per-sequence loop (forced here by one extra empty sequence,
    which the loop skips)."""
    generator = torch.Generator().manual_seed(3)
    masks = [tree_mask(tree_parents("random", n, generator)) if n > 1 else causal_mask(1) for _ in range(4)]
    sequences = list(zip([0, 37, 5, 16], masks))
    case = attention_case(sequences, 8, 2, 32, 8, torch.float32, "cpu")
    batched = reference.paged_attention(**case)
    looped_case = attention_case(sequences + [(3, causal_mask(0))], 8, 2, 32, 8, torch.float32, "cpu")
    looped_case.update(q=case["q"], k_cache=case["k_cache"], v_cache=case["v_cache"])
    looped_case["block_tables"][:4] = case["block_tables"][:, :looped_case["block_tables"].shape[1]]
    torch.testing.assert_close(batched, reference.paged_attention(**looped_case), atol=1e-6, rtol=1e-5)
