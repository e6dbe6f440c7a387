"""Paged attention is row-invariant (issue 27): a row's output bits depend on its query, the keys it may see and
their logical positions only, not on how many rows share the launch, their order, or whether its keys sit in
committed pages or in a round's scratch slots (`nanojet/kernels/triton_attention.py`, module docstring).

Without CUDA the kernel runs under the Triton interpreter in fp32 (bf16 dots cannot be interpreted); with CUDA the
same checks run natively in bf16 and fp32 (`gpu`-marked)."""
import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the Triton kernels

import pytest  # noqa: E402
from trees import build_tree, tree_mask  # noqa: E402

from nanojet.kernels import reference, triton_attention  # noqa: E402

INTERPRETED = type(triton_attention._paged_attention_kernel).__name__ == "InterpretedFunction"
SETTINGS = [
    pytest.param("cpu", torch.float32, marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before the kernels load")),
    *(pytest.param("cuda", dtype, marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETED or not torch.cuda.is_available(), reason="native Triton needs CUDA and TRITON_INTERPRET unset")])
      for dtype in (torch.bfloat16, torch.float32)),
]


class Pool:
    """One layer's K/V cache whose pages are handed out in a shuffled order. Slots no sequence stored hold NaN, so a
    kernel that multiplied a key or value it may not see, even by a zero weight, would poison the row."""

    def __init__(self, pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                 generator: torch.Generator):
        shape = (pages, page_size, kv_heads, head_dim)
        self.k = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.v = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.page_size = page_size
        self.free = torch.randperm(pages, generator=generator).tolist()

    def sequence(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
        """A new sequence holding `keys`, `values` `[n, Hkv, D]` at logical slots 0 .. n-1; its block-table row of
        `width` pages (padded with page 0, never read past its keys)."""
        count = -(-keys.shape[0] // self.page_size)
        table = torch.zeros(width, dtype=torch.int32)
        table[:count] = torch.tensor([self.free.pop() for _ in range(count)], dtype=torch.int32)
        logical = torch.arange(keys.shape[0])
        slots = (table.long()[logical // self.page_size] * self.page_size + logical % self.page_size).to(self.k.device)
        self.k.view(-1, *self.k.shape[2:])[slots] = keys.to(self.k.device)
        self.v.view(-1, *self.v.shape[2:])[slots] = values.to(self.v.device)
        return table


def attend(pool: Pool, sequences: list[tuple], q_heads: int, **options) -> list[torch.Tensor]:
    """One paged_attention launch over `sequences` `[(block-table row, prefix_len, q [n, Hq, D], mask [n, n])]`;
    each sequence's output rows."""
    width = max(max(mask.shape[0] for *_, mask in sequences), 1)
    masks = [torch.nn.functional.pad(mask, (0, width - mask.shape[1])) for *_, mask in sequences]
    counts = [mask.shape[0] for *_, mask in sequences]
    device = pool.k.device
    out = triton_attention.paged_attention(
        torch.cat([q for _, _, q, _ in sequences]).to(device), pool.k, pool.v,
        torch.stack([table for table, *_ in sequences]).to(device),
        torch.tensor([prefix for _, prefix, *_ in sequences], dtype=torch.int32, device=device),
        torch.tensor([0] + counts).cumsum(0).to(torch.int32).to(device),
        reference.pack_visibility(torch.cat(masks)).to(device), pool.k.shape[-1] ** -0.5, **options)
    return list(out.split(counts))



def tree_parents(kind: str, nodes: int, generator: torch.Generator) -> list[int]:
    """A chain (a prefill chunk is one), a round's tree from random draft rows (depth <= 7), or a deep random tree
    (each node hangs under the previous one or, half the time, under any earlier one)."""
    if kind == "chain":
        return list(range(-1, nodes - 1))
    if kind == "round":
        logprobs = torch.randn(7, 50, generator=generator).log_softmax(-1)
        parents = build_tree(torch.tensor(0), logprobs, budget=nodes, width=3).parents.tolist()
        assert len(parents) == nodes
        return parents
    draws = torch.rand(nodes, generator=generator)
    return [-1] + [i - 1 if draws[i] < 0.5 else int(draws[i] * 2 * i) % i for i in range(1, nodes)]


def node_mismatches(device: str, dtype: torch.dtype, kind: str, committed: int, nodes: int, page_size: int,
                    num_splits: int | None, seed: int = 0) -> list[int]:
    """Nodes of a tree over `committed` keys whose output differs in any bit from a decode step's: one query,
    prefix_len = committed + depth, its path's keys committed in pages at positions committed .. committed+depth-1
    and its own key after them. Both launches use block tables of one width, as the engine's do."""
    generator = torch.Generator().manual_seed(seed)
    q_heads, kv_heads, head_dim = 4, 1, 32
    parents = tree_parents(kind, nodes, generator)
    mask = tree_mask(parents)
    keys, values = (torch.randn(committed + nodes, kv_heads, head_dim, generator=generator).to(dtype)
                    for _ in range(2))
    q = torch.randn(nodes, q_heads, head_dim, generator=generator).to(dtype)
    width = -(-(committed + nodes) // page_size) + 1
    pool = Pool(-(-(committed + nodes) // page_size) * (nodes + 1) + nodes + 2, page_size, kv_heads, head_dim,
                dtype, device, generator)
    tree_table = pool.sequence(keys, values, width)  # node i's key at scratch slot committed + i
    tree_out, = attend(pool, [(tree_table, committed, q, mask)], q_heads, num_splits=num_splits)
    expected = reference.paged_attention(q.to(device), pool.k, pool.v, tree_table[None].to(device),
                                         torch.tensor([committed], dtype=torch.int32, device=device),
                                         torch.tensor([0, nodes], dtype=torch.int32, device=device),
                                         reference.pack_visibility(mask).to(device), head_dim ** -0.5)
    tolerance = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(tree_out, expected, **tolerance)  # the invariant is not bought with a wrong answer
    mismatched = []
    for node in range(nodes):
        path = mask[node].nonzero().flatten()  # ancestors, then the node itself
        rows = torch.cat([torch.arange(committed), committed + path])
        decode_table = pool.sequence(keys[rows], values[rows], width)
        depth = len(path) - 1
        alone, = attend(pool, [(decode_table, committed + depth, q[node:node + 1], torch.ones(1, 1, dtype=torch.bool))],
                        q_heads, num_splits=num_splits)
        if not torch.equal(alone[0], tree_out[node]):
            mismatched.append(node)
    return mismatched


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("kind,committed,nodes,page_size,num_splits", [
    ("deep", 37, 40, 4, None),    # 37 keys: not a multiple of any tile; paths of ~20 cross tiles of 16 and 32
    ("deep", 45, 40, 16, 3),      # splits of 48 keys: paths cross a split boundary (and tiles)
    ("round", 21, 32, 1, 2),      # a round's shape, one key per page
    ("chain", 13, 30, 8, 4),      # a prefill chunk: row i against decoding position 13 + i
])
def test_tree_node_equals_its_decode_step(device, dtype, kind, committed, nodes, page_size, num_splits):
    assert node_mismatches(device, dtype, kind, committed, nodes, page_size, num_splits) == []


def sequence_cases(pool: Pool, generator: torch.Generator, width: int, q_heads: int, lengths: list[tuple]) -> list:
    """`[(prefix_len, kind, n)]` -> attend's sequences: each with its own keys (prefix + n of them) in pages."""
    cases = []
    for prefix, kind, n in lengths:
        keys, values = (torch.randn(prefix + n, *pool.k.shape[2:], generator=generator).to(pool.k.dtype)
                        for _ in range(2))
        q = torch.randn(n, q_heads, pool.k.shape[-1], generator=generator).to(pool.k.dtype)
        cases.append((pool.sequence(keys, values, width), prefix, q, tree_mask(tree_parents(kind, n, generator))))
    return cases


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("num_splits", [None, 4])
def test_a_sequence_alone_equals_it_among_2_to_300_rows(device, dtype, num_splits):
    """A decode row, a tree and a prefill chunk, each launched alone and among other sequences: 2, 9, 64 and 300
    rows in all (split: up to 64), in two orders. GQA group 3 (5 tokens per 16-row fp32 program, one padding row)."""
    generator = torch.Generator().manual_seed(1)
    q_heads, kv_heads, head_dim, page_size, width = 3, 1, 16, 8, 40
    pool = Pool(400, page_size, kv_heads, head_dim, dtype, device, generator)
    probes = sequence_cases(pool, generator, width, q_heads, [(37, "chain", 1), (21, "deep", 11), (13, "chain", 7)])
    alone = [attend(pool, [probe], q_heads, num_splits=num_splits)[0] for probe in probes]
    # rows in all -> (the probes launched, the other sequences)
    layouts = {2: ([0], [(50, "chain", 1)]), 9: ([0, 2], [(3, "chain", 1)]),
               64: ([0, 1, 2], [(5, "chain", 42), (60, "deep", 3)]),
               300: ([0, 1, 2], [(5, "chain", 278), (60, "deep", 3)])}
    if num_splits is not None:
        del layouts[300]  # under the interpreter, merging 300 x 3 rows' splits costs more than it tells
    for total_rows, (chosen, other_lengths) in layouts.items():
        others = sequence_cases(pool, generator, width, q_heads, other_lengths)
        batch = [sequence for pair in zip(others + [None] * 3, [probes[i] for i in chosen] + [None] * 3)
                 for sequence in pair if sequence is not None]  # probes and others interleaved
        for order in (batch, batch[::-1]):
            outputs = attend(pool, order, q_heads, num_splits=num_splits)
            assert sum(len(out) for out in outputs) == total_rows
            for i in chosen:
                assert torch.equal(outputs[next(j for j, s in enumerate(order) if s is probes[i])], alone[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the rule a GPU gets (no CUDA needed to ask it)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(16, 8, 128), (32, 8, 128), (40, 8, 128), (8, 1, 64)])
def test_launch_config_does_not_depend_on_the_row_count(dtype, device, q_heads, kv_heads, head_dim):
    k_cache = torch.empty(4, 16, kv_heads, head_dim, dtype=dtype, device=device)
    for table_keys in (256, 40960 + 512):
        first = None
        for rows in range(1, 301):
            for sequences in (1, 3, 64):
                q = torch.empty(rows, q_heads, head_dim, dtype=dtype, device=device)
                config = triton_attention.launch_config(q, k_cache,
                                                        torch.empty(sequences, table_keys // 16, dtype=torch.int32))
                first = first or config
                assert config == first, (rows, sequences)
        group = q_heads // kv_heads
        assert first.tokens_per_program * group <= first.block_rows
        assert first.split_keys % first.block_keys == 0  # split boundaries are tile boundaries
        assert first.num_splits * first.split_keys >= table_keys
        if device == "meta" and table_keys > 256:
            assert first.num_splits > 1  # a decode step over a long table still spreads over the GPU


def rows_dependent(choice: str):
    """`launch_config` with one choice made from the number of query rows, as the kernel made it before."""
    honest = triton_attention.launch_config

    def planted(q, k_cache, block_tables, num_splits=None):
        config = honest(q, k_cache, block_tables, num_splits)
        if q.shape[0] == 1:
            return config
        if choice == "block_keys":
            return dataclasses.replace(config, block_keys=2 * config.block_keys,
                                       split_keys=-(-config.split_keys // (2 * config.block_keys)) * 2
                                       * config.block_keys)
        split_keys = -(-(block_tables.shape[1] * k_cache.shape[1]) // 2 // config.block_keys) * config.block_keys
        return dataclasses.replace(config, split_keys=split_keys,
                                   num_splits=-(-(block_tables.shape[1] * k_cache.shape[1]) // split_keys))
    return planted


@pytest.mark.parametrize("choice", ["block_keys", "num_splits"])
def test_a_row_count_dependent_choice_is_caught(monkeypatch, choice):
    """The check above is not vacuous: planting a choice made from the row count (tile width, or split count)
    makes tree nodes differ from their decode steps."""
    if not INTERPRETED:
        pytest.skip("runs the interpreted fp32 kernel")
    monkeypatch.setattr(triton_attention, "launch_config", rows_dependent(choice))
    assert node_mismatches("cpu", torch.float32, "deep", 37, 40, 4, None) != []
