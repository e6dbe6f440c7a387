"""Row invariance (issue 27): on the Triton path a row's output bits depend only on that row, never on how many rows
share the launch or where it sits among them, so a tree node verified among many rows and the same token decoded
alone agree bit for bit in bf16 (nanojet/kernels/README.md, *Row invariance*).

Each kernel is checked two ways: rows computed alone equal the same rows among 2..300 rows at the first, a middle
and the last position (torch.equal), and the launch configuration (constexprs, warps, stages and every grid
dimension but the rows') is the same for every row count from 1 to 300. A planted row-dependent tile choice must
fail both checks. Without CUDA the kernels run under the Triton interpreter in fp32 (small shapes); on a GPU the
same checks run natively in bf16 and fp16, and a small random Qwen3 (dense and MoE) must compute a token alone as
it does among 65."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports nanojet.kernels.triton_ops

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
from test_kernels import INTERPRETED  # noqa: E402

from nanojet import kernels  # noqa: E402
from nanojet.kernels import triton_linear, triton_moe, triton_ops  # noqa: E402

NATIVE = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                            reason="native Triton needs CUDA and TRITON_INTERPRET unset")
CASES = [  # (device, dtype)
    pytest.param("cpu", torch.float32, marks=pytest.mark.skipif(not INTERPRETED, reason="needs the interpreter")),
    pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.gpu, NATIVE]),
    pytest.param("cuda", torch.float16, marks=[pytest.mark.gpu, NATIVE]),
]
BATCH_SIZES = (2, 17, 65, 300)
LINEAR_SHAPES = [  # (N, K, bias, fp32 output): K not a multiple of the tiles; (24, 300) splits K (fp32 tiles)
    (40, 96, False, False), (33, 200, True, False), (24, 300, True, False), (24, 300, False, True)]


def draw(*shape, generator, dtype, device, scale=1.0):
    return (scale * torch.randn(*shape, generator=generator)).to(dtype=dtype, device=device)


def assert_rows_invariant(op, rows: dict, sizes=BATCH_SIZES) -> None:
    """`op(**rows)` returns a tuple of tensors with one entry per input row. Each of three probe rows (rows 0..2 of
    `rows`) computed alone must equal itself placed at position 0, size // 2 and size - 1 of a batch of `size` rows
    (the others drawn from the rest), for every size."""
    probes = {name: value[:3] for name, value in rows.items()}
    pool = {name: value[3:] for name, value in rows.items()}
    alone = [op(**{name: value[j:j + 1] for name, value in probes.items()}) for j in range(3)]
    for size in sizes:
        positions = sorted({0, size // 2, size - 1})
        batch = {name: value[:size].clone() for name, value in pool.items()}
        for j, position in enumerate(positions):
            for name, value in batch.items():
                value[position] = probes[name][j]
        outputs = op(**batch)
        for j, position in enumerate(positions):
            for index, (single, among) in enumerate(zip(alone[j], outputs)):
                assert torch.equal(among[position], single[0]), \
                    f"output {index} of probe {j}: alone != at row {position} of {size}"


def linear_case(shape, dtype, device, rows=300 + 3, seed=0):
    out_features, in_features, bias, fp32_out = shape
    generator = torch.Generator().manual_seed(seed)
    weight = draw(out_features, in_features, generator=generator, dtype=dtype, device=device, scale=in_features ** -0.5)
    b = draw(out_features, generator=generator, dtype=dtype, device=device) if bias else None
    x = draw(rows, in_features, generator=generator, dtype=dtype, device=device)
    return x, weight, b, torch.float32 if fp32_out else None


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear(device, dtype, shape):
    x, weight, bias, out_dtype = linear_case(shape, dtype, device)
    assert_rows_invariant(lambda x: (triton_ops.linear(x, weight, bias, out_dtype),), dict(x=x))


def test_the_split_k_shape_splits():
    assert triton_linear.linear_config(24, 300, torch.float32).split_k > 1  # else test_linear misses the sum kernel
    assert triton_linear.linear_config(40, 96, torch.float32).split_k == 1


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, with_residual):
    generator = torch.Generator().manual_seed(1)
    x, residual = (draw(303, 96, generator=generator, dtype=dtype, device=device) for _ in range(2))
    weight = draw(96, generator=generator, dtype=dtype, device=device)
    if with_residual:
        assert_rows_invariant(lambda x, residual: triton_ops.rms_norm(x, weight, 1e-6, residual),
                              dict(x=x, residual=residual))
    else:
        assert_rows_invariant(lambda x: triton_ops.rms_norm(x, weight, 1e-6)[:1], dict(x=x))


@pytest.mark.parametrize("device,dtype", CASES)
def test_qk_norm_rope(device, dtype):
    """q and k are strided views of a fused qkv projection, as in the model; positions reach 40k."""
    generator = torch.Generator().manual_seed(2)
    q_heads, kv_heads, head_dim = 4, 2, 64
    qkv = draw(303, (q_heads + 2 * kv_heads) * head_dim, generator=generator, dtype=dtype, device=device)
    positions = torch.randint(0, 40000, (303,), generator=generator).to(device)
    q_weight, k_weight = (draw(head_dim, generator=generator, dtype=dtype, device=device) for _ in range(2))
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device)

    def op(qkv, positions):
        q = qkv[:, :q_heads * head_dim].view(-1, q_heads, head_dim)
        k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(-1, kv_heads, head_dim)
        return triton_ops.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, 1e-6)
    assert_rows_invariant(op, dict(qkv=qkv, positions=positions))


@pytest.mark.parametrize("device,dtype", CASES)
def test_silu_and_mul(device, dtype):
    gate_up = draw(303, 2 * 77, generator=torch.Generator().manual_seed(3), dtype=dtype, device=device, scale=4.0)
    assert_rows_invariant(lambda gate_up: (triton_ops.silu_and_mul(gate_up),), dict(gate_up=gate_up))


def moe_weights(dtype, device, experts=8, hidden=40, inter=24, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return (draw(experts, 2 * inter, hidden, generator=generator, dtype=dtype, device=device, scale=hidden ** -0.5),
            draw(experts, hidden, inter, generator=generator, dtype=dtype, device=device, scale=inter ** -0.5))


def moe_tokens(count, dtype, device, experts=8, top_k=2, hidden=40, seed=5):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(count)])
    weights = torch.rand(count, top_k, generator=generator)
    return dict(hidden=draw(count, hidden, generator=generator, dtype=dtype, device=device),
                topk_weights=(weights / weights.sum(-1, keepdim=True)).to(dtype=dtype, device=device),
                topk_ids=ids.to(device))


@pytest.mark.parametrize("device,dtype", CASES)
def test_fused_moe_token_alone_equals_it_among_64_in_any_order(device, dtype):
    """64 tokens x top-2 of 8 experts: about 16 pairs per expert, so tokens land at different rows of different
    tiles as the batch changes."""
    gate_up, down = moe_weights(dtype, device)

    def op(hidden, topk_weights, topk_ids):
        return (triton_ops.fused_moe(hidden, gate_up, down, topk_weights, topk_ids),)
    tokens = moe_tokens(67, dtype, device)
    assert_rows_invariant(op, tokens, sizes=(64,))
    batch = {name: value[:64] for name, value in tokens.items()}
    expected = op(**batch)[0]
    for seed in range(3):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(seed)).to(device)
        assert torch.equal(op(**{name: value[order] for name, value in batch.items()})[0], expected[order])


@pytest.mark.parametrize("device,dtype", CASES)
def test_router(device, dtype):
    """The router's projection and its softmax / top-k, as `SparseMoE.route` runs them: 4 of 16 experts."""
    generator = torch.Generator().manual_seed(6)
    gate = draw(16, 64, generator=generator, dtype=dtype, device=device, scale=0.5)
    h = draw(303, 64, generator=generator, dtype=dtype, device=device)
    assert_rows_invariant(lambda h: triton_ops.topk_routing(triton_ops.linear(h, gate), 4, True), dict(h=h))


# ---------------------------------------------------------------------------------------------------------------------
# launch configurations: recorded at the launch, for every row count from 1 to 300


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the grid's non-row dimensions
    (the first is the rows' everywhere) and the keyword arguments (constexprs, warps, stages) and runs nothing."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid[1:]), tuple(sorted(kwargs.items()))))
        return launch


KERNELS = [(triton_ops, "_rms_norm_kernel"), (triton_ops, "_qk_norm_rope_kernel"), (triton_ops, "_silu_and_mul_kernel"),
           (triton_ops, "_store_kv_kernel"), (triton_linear, "_linear_kernel"), (triton_linear, "_split_k_sum_kernel"),
           (triton_moe, "_moe_gate_up_kernel"), (triton_moe, "_moe_down_kernel"), (triton_moe, "_moe_sum_kernel"),
           (triton_moe, "_topk_routing_kernel")]


def launches_by_row_count(monkeypatch, row_counts=range(1, 301)) -> dict[int, set]:
    """Row count -> the set of launches every row-wise kernel made (recorded, not run) for that many rows."""
    log = []
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name, log))
    dtype = torch.float32
    gate_up, down = moe_weights(dtype, "cpu")
    weights = {shape: linear_case(shape, dtype, "cpu", rows=0)[1:] for shape in LINEAR_SHAPES}
    norm_weight, inv_freq = torch.ones(96), torch.ones(16)
    caches = [torch.zeros(4, 8, 2, 32) for _ in range(2)]
    by_rows = {}
    for rows in row_counts:
        log.clear()
        x = torch.zeros(rows, 96)
        triton_ops.rms_norm(x, norm_weight, 1e-6)
        triton_ops.rms_norm(x, norm_weight, 1e-6, x)
        qkv = torch.zeros(rows, 8 * 32)
        triton_ops.qk_norm_rope(qkv[:, :128].view(rows, 4, 32), qkv[:, 128:192].view(rows, 2, 32), norm_weight[:32],
                                norm_weight[:32], torch.zeros(rows, dtype=torch.int64), inv_freq, 1e-6)
        triton_ops.store_kv(*caches, qkv[:, 128:192].view(rows, 2, 32), qkv[:, 192:].view(rows, 2, 32),
                            torch.full((rows,), -1))
        triton_ops.silu_and_mul(torch.zeros(rows, 2 * 77))
        for (weight, bias, out_dtype), shape in zip(weights.values(), LINEAR_SHAPES):
            triton_ops.linear(torch.zeros(rows, shape[1]), weight, bias, out_dtype)
        tokens = moe_tokens(rows, dtype, "cpu")
        triton_ops.fused_moe(tokens["hidden"], gate_up, down, tokens["topk_weights"], tokens["topk_ids"])
        triton_ops.topk_routing(torch.zeros(rows, 16), 4, True)
        by_rows[rows] = set(log)
    return by_rows


def assert_one_launch_configuration(by_rows: dict[int, set]) -> None:
    first_rows, first = next(iter(by_rows.items()))
    launched = {name for name, _, _ in first}
    assert launched == {name for _, name in KERNELS}, launched
    for rows, launches in by_rows.items():
        assert launches == first, f"{rows} rows launch {launches - first}, {first_rows} rows {first - launches}"


def test_launch_configuration_does_not_change_with_the_row_count(monkeypatch):
    assert_one_launch_configuration(launches_by_row_count(monkeypatch))


def test_a_planted_row_dependent_tile_is_caught(monkeypatch):
    """An M-dependent choice of the kind cuBLAS makes (a shorter K step from 17 rows on) fails both checks."""
    unplanted = triton_ops.linear

    def planted(x, weight, bias=None, out_dtype=None):
        config = triton_linear.linear_config(*weight.shape, x.dtype)
        if x.reshape(-1, x.shape[-1]).shape[0] > 16:
            config = replace(config, block_k=config.block_k // 2)
        return unplanted(x, weight, bias, out_dtype, config)
    monkeypatch.setattr(triton_ops, "linear", planted)
    with pytest.raises(AssertionError, match="launch"):
        assert_one_launch_configuration(launches_by_row_count(monkeypatch, row_counts=(1, 16, 17)))
    monkeypatch.undo()
    if not INTERPRETED:
        return
    monkeypatch.setattr(triton_ops, "linear", planted)
    x, weight, bias, out_dtype = linear_case(LINEAR_SHAPES[0], torch.float32, "cpu")
    with pytest.raises(AssertionError, match="alone != at row"):
        assert_rows_invariant(lambda x: (triton_ops.linear(x, weight, bias, out_dtype),), dict(x=x))


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile and the whole target forward


def test_compiled_kernels_stay_opaque_and_compute_the_eager_bits():
    """Traced for the Triton path, the row-invariant kernels are custom ops: the graph holds no matmul or norm of
    the compiler's own (whose tiles would follow the row count), and it computes what eager execution computes."""
    generator = torch.Generator().manual_seed(7)

    def weights(*shape):
        return draw(*shape, generator=generator, dtype=torch.float32, device="cpu", scale=shape[-1] ** -0.5)
    w_qkv, w_gate_up, w_down, w_router, w_head = weights(128, 64), weights(96, 64), weights(64, 48), weights(8, 64), \
        weights(40, 64)
    norm, head_norm, inv_freq = weights(64) + 1, weights(32) + 1, torch.rand(16, generator=generator)

    def layer(x, residual, positions):
        h, residual = kernels.rms_norm(x, norm, 1e-6, residual)
        qkv = kernels.linear(h, w_qkv)
        q, k = kernels.qk_norm_rope(qkv[:, :64].view(-1, 2, 32), qkv[:, 64:96].view(-1, 1, 32), head_norm,
                                    head_norm, positions, inv_freq, 1e-6)
        routing = kernels.topk_routing(kernels.linear(h, w_router), 2, True)
        out = kernels.linear(kernels.silu_and_mul(kernels.linear(h, w_gate_up)), w_down) + q.flatten(1)
        final, _ = kernels.rms_norm(out, norm, 1e-6)
        return kernels.linear(final, w_head, None, torch.float32), k, residual, *routing

    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    inputs = (weights(5, 64), weights(5, 64), torch.arange(5) * 1000)
    kernels.set_backend("triton")
    try:
        expected = layer(*inputs)
        got = torch.compile(layer, backend=keep_graph, fullgraph=True)(*inputs)
    finally:
        kernels.set_backend(None)
    code = "\n".join(graph.code for graph in graphs)
    for op in ("linear", "add_rms_norm", "rms_norm", "qk_norm_rope", "silu_and_mul", "topk_routing"):
        assert f"torch.ops.nanojet.{op}" in code
    assert "torch._C._nn.linear" not in code and "torch.rms_norm" not in code
    for actual, wanted in zip(got, expected, strict=True):
        assert torch.equal(actual, wanted)


@pytest.mark.gpu
@NATIVE
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_target_forward_computes_a_token_alone_as_among_65(moe):
    """A small random Qwen3 in bf16 on CUDA: after a 40-token prefix, 65 sibling tree nodes (each at position 40,
    seeing the prefix and itself) give the same hidden rows and logits, bit for bit, as each node verified alone."""
    from conftest import step_metadata

    from nanojet.bench.synthetic import random_module
    from nanojet.engine.kv_cache import KVCache, Sequence
    from nanojet.model.config import ModelConfig
    from nanojet.model.qwen3 import Qwen3
    experts = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, norm_topk_prob=True)
    config = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, **(experts if moe else {}))
    torch.manual_seed(0)
    target = random_module(Qwen3, config, torch.bfloat16, torch.device("cuda"))
    cache = KVCache(2, 2, 64, 16, 16, 16, torch.bfloat16, torch.device("cuda"))
    sequence, prefix = Sequence(), 40
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        meta = step_metadata(cache, [sequence], [torch.arange(prefix)], [torch.ones(prefix, prefix).tril().bool()])
        target(torch.randint(0, 512, (prefix,), generator=generator).cuda(), meta, cache.pool)
        sequence.length = prefix

        def verify(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = tokens.numel()
            meta = step_metadata(cache, [sequence], [torch.full((n,), prefix)], [torch.eye(n, dtype=torch.bool)])
            hidden, _ = target(tokens.cuda(), meta, cache.pool)
            return hidden, target.logits(hidden)
        tokens = torch.randint(0, 512, (65,), generator=generator)
        hidden, logits = verify(tokens)
        for i in (0, 31, 64):
            alone_hidden, alone_logits = verify(tokens[i:i + 1])
            assert torch.equal(alone_hidden[0], hidden[i]), f"node {i}: hidden state alone != among 65"
            assert torch.equal(alone_logits[0], logits[i]), f"node {i}: logits alone != among 65"
