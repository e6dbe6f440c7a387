"""Paged attention in Triton whose every output row is computed the same way however many rows share the launch.

Why: speculative decoding is lossless only if a tree node, verified among k+1 rows, gets in bf16 the bits the
plain decode step at its position gets alone. So a row's bits may depend on its query, the keys it may see and
their logical positions, and on nothing else: not on how many rows share the launch, their order, the batch, or
whether its keys sit in committed pages or in the round's scratch slots. Three rules give that.

- Keys are walked by logical position. A query's keys are its sequence's prefix (positions 0 .. prefix-1, read
  through the block table), then the new tokens its visibility bits name, in index order, at positions prefix,
  prefix+1, ... In a tree those are the node's ancestors and itself (an ancestor has a smaller index and a smaller
  depth), so a node at depth d of a round over L committed keys meets, at the same positions, the keys the decode
  step at position L+d meets; a row of a causal prefill chunk meets what decoding it would.
- Tiles and splits start at fixed logical positions: tiles of BLOCK_N keys and splits of `split_keys` keys (a
  multiple of BLOCK_N), both counted from position 0, and a row stops after its own last key. Tile shapes, warps
  and the split size are functions of the dtypes, the head shape and the block table's width (`launch_config`),
  never of the number of rows. Splits are merged over a fixed-width vector in split order; a split past a row's
  keys has log-sum-exp -inf and weighs exactly 0.
- A row's arithmetic is its own. A program holds all G query heads of a fixed number of consecutive tokens of one
  sequence (its BLOCK_R rows). Each row keeps its own online-softmax state; row i of a tile's products depends
  on row i of the operands only; and a tile that a row may not see leaves its state bit for bit as it was (the
  rescale is exp2(0) = 1 and the added terms are 0). So the tiles a program walks for its other rows do not
  touch a row, and a row walks the tiles its decode step would, in the same order.

Loads: the prefix below the tile holding position `prefix` is the same for every token of a sequence, so a
program loads each of its tiles once for all its rows. When every row sees its first new tokens and no others
(prefill, decode, a causal or full draft block, a chain), the new tokens sit at their own slots and the whole walk
is shared, each row masked at its own end. Otherwise (a tree) each token then walks its own keys: the i-th new
token it sees is listed for it beforehand (`_visible_order_kernel`, one pass over the bits per launch).

Cost, against a kernel free to choose by row count: the split size is fixed by the table, so launches of many rows
split too (fp32 partials of splits x T x Hq x D, then a merge launch); bf16 programs always take 64 rows, of
which a decode step uses G; each token of a tree walks its last prefix tile and its path apart from the others.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Tiles and warps (`_warps`) are chosen so that no specialisation the engine launches spills registers on sm_80
# or sm_90 at head_dim 128: nanojet/tools/kernel_gate.py compiles every one with ptxas and fails CI on a spill.
# 64-row bf16 tiles take eight warps (four spilled on sm_80). fp32 inputs use exact (FMA, "ieee") dots, whose
# operands need far more registers, so they get small tiles, and four warps (with eight, ptxas spilled them).
MAX_BLOCK_ROWS = 64       # query rows (token x head) per program
MAX_TILE_ELEMENTS = 4096  # rows x head_dim above which a key tile shrinks from 64 to 32 keys
FP32_MAX_BLOCK_ROWS = 16
FP32_BLOCK_KEYS = 16
MAX_SPLITS = 32
MIN_KEYS_PER_SPLIT = 256
ORDER_BLOCK_TOKENS = 64  # queries per program of `_visible_order_kernel`
LOG2_E = 1.4426950408889634


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, keys, key_valid, visible,
                 kv_head, dims, dim_valid, qk_scale, stride_k_page, stride_k_slot, stride_k_head,
                 stride_v_page, stride_v_slot, stride_v_head,
                 PAGE_SIZE: tl.constexpr, COMPUTE_FP32: tl.constexpr):
    """Fold keys `[BLOCK_N]` (logical slots, read through the block table) into the online softmax state.
    `visible` `[BLOCK_R or 1, BLOCK_N]` masks scores; `key_valid` guards the loads."""
    pages = tl.load(block_table_row_ptr + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
    offsets = keys % PAGE_SIZE
    k_rows = pages * stride_k_page + offsets * stride_k_slot + kv_head * stride_k_head
    v_rows = pages * stride_v_page + offsets * stride_v_slot + kv_head * stride_v_head
    k_t = tl.load(k_cache_ptr + k_rows[None, :] + dims[:, None],
                  mask=key_valid[None, :] & dim_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :],
                mask=key_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if COMPUTE_FP32:
        scores = tl.dot(q, k_t.to(tl.float32), input_precision="ieee")
    else:
        scores = tl.dot(q, k_t.to(q.dtype))
    scores = tl.where(visible, scores * qk_scale, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row that has seen nothing yet keeps m = -inf; shifting by 0 instead avoids exp2(-inf - -inf) = NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(scores - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if COMPUTE_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["blocks_per_sequence", "stride_visibility", "stride_order"])
def _visible_order_kernel(query_starts_ptr, visibility_ptr, order_ptr, counts_ptr, blocks_per_sequence,
                          stride_visibility, stride_order, BLOCK_T: tl.constexpr):
    """For each query of a block of BLOCK_T: how many new tokens of its sequence it sees (`counts`), and their
    indices in increasing order (the first `count` entries of its `order` row). The i-th of them is the query's
    key at logical position prefix + i."""
    sequence = tl.program_id(0) // blocks_per_sequence
    block = tl.program_id(0) % blocks_per_sequence
    query_begin = tl.load(query_starts_ptr + sequence)
    num_new = tl.load(query_starts_ptr + sequence + 1) - query_begin
    if block * BLOCK_T >= num_new:
        return
    token = query_begin + block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_valid = token < query_begin + num_new
    order_row = order_ptr + token.to(tl.int64) * stride_order  # [BLOCK_T]
    bit = tl.arange(0, 32)
    seen = tl.zeros([BLOCK_T], tl.int32)
    for word in range(0, tl.cdiv(num_new, 32)):
        new_index = word * 32 + bit
        words = tl.load(visibility_ptr + token * stride_visibility + word, mask=token_valid, other=0)
        bits = tl.where((new_index < num_new)[None, :], (words[:, None] >> bit[None, :]) & 1, 0)  # [BLOCK_T, 32]
        rank = seen[:, None] + tl.cumsum(bits, axis=1) - 1
        tl.store(order_row[:, None] + rank, tl.broadcast_to(new_index[None, :], (BLOCK_T, 32)), mask=bits != 0)
        seen += tl.sum(bits, axis=1)
    tl.store(counts_ptr + token, seen, mask=token_valid)


@triton.jit
def _attend_shared(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, key_begin, key_end, row_key_end,
                   kv_head, dims, dim_valid, qk_scale, stride_k_page, stride_k_slot, stride_k_head,
                   stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE: tl.constexpr, COMPUTE_FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Positions `key_begin .. key_end-1` at their own logical slots, each tile loaded once for every row; row r
    sees the positions below `row_key_end[r]`."""
    for start in range(key_begin, key_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < key_end
        visible = key_valid[None, :] & (keys[None, :] < row_key_end[:, None])  # [BLOCK_R, BLOCK_N]
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, keys,
                                     key_valid, visible, kv_head, dims, dim_valid, qk_scale,
                                     stride_k_page, stride_k_slot, stride_k_head,
                                     stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE, COMPUTE_FP32)
    return m_i, l_i, acc


@triton.jit
def _attend_own(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, order_row_ptr, key_begin,
                key_end, mine, prefix, kv_head, dims, dim_valid, qk_scale,
                stride_k_page, stride_k_slot, stride_k_head, stride_v_page, stride_v_slot, stride_v_head,
                PAGE_SIZE: tl.constexpr, COMPUTE_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """One token's positions `key_begin .. key_end-1`, for its rows (`mine` `[BLOCK_R]`) only: a prefix position
    at its slot, position prefix + i at the slot of the i-th new token the token sees (its `order` row)."""
    for start in range(key_begin, key_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        key_valid = positions < key_end
        new_index = tl.load(order_row_ptr + positions - prefix, mask=key_valid & (positions >= prefix), other=0)
        keys = tl.where(positions < prefix, positions, prefix + new_index)
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, keys,
                                     key_valid, mine[:, None] & key_valid[None, :], kv_head, dims, dim_valid,
                                     qk_scale, stride_k_page, stride_k_slot, stride_k_head,
                                     stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE, COMPUTE_FP32)
    return m_i, l_i, acc


@triton.jit
def _attend_rows(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, order_ptr, stride_order,
                 first_token, query_end, key_begin, key_end, prefix, row_key_end, in_order, row_valid,
                 token_in_program, kv_head, dims, dim_valid, qk_scale, stride_k_page, stride_k_slot, stride_k_head,
                 stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE: tl.constexpr, COMPUTE_FP32: tl.constexpr,
                 TOKENS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's positions `key_begin .. key_end-1`: tiles every row reads alike once for all of them, then,
    unless every row sees its first new tokens only (`in_order`), each token's own keys from the tile holding
    position `prefix` on."""
    own_begin = prefix // BLOCK_N * BLOCK_N  # the first tile in which a tree's tokens may see different keys
    shared_end = tl.where(in_order == 1, key_end, tl.minimum(key_end, own_begin))
    m_i, l_i, acc = _attend_shared(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, key_begin,
                                   shared_end, row_key_end, kv_head, dims, dim_valid, qk_scale,
                                   stride_k_page, stride_k_slot, stride_k_head, stride_v_page, stride_v_slot,
                                   stride_v_head, PAGE_SIZE, COMPUTE_FP32, BLOCK_N)
    if in_order == 0:
        for t in range(0, tl.minimum(TOKENS_PER_PROGRAM, query_end - first_token)):
            mine = row_valid & (token_in_program == t)
            token_key_end = tl.minimum(key_end, tl.max(tl.where(mine, row_key_end, 0), axis=0))
            m_i, l_i, acc = _attend_own(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
                                        order_ptr + (first_token + t).to(tl.int64) * stride_order,
                                        tl.maximum(key_begin, own_begin), token_key_end, mine, prefix,
                                        kv_head, dims, dim_valid, qk_scale, stride_k_page, stride_k_slot,
                                        stride_k_head, stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE,
                                        COMPUTE_FP32, BLOCK_N)
    return m_i, l_i, acc


# Runtime sizes that only enter address arithmetic are not specialised on (== 1, multiple of 16): one compiled
# variant per tile configuration serves every tree size, table width and split size.
@triton.jit(do_not_specialize=["num_tokens", "num_q_heads", "blocks_per_sequence", "split_keys",
                               "stride_block_table", "stride_order"])
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, prefix_lens_ptr, query_starts_ptr, order_ptr, counts_ptr,
        out_ptr, partial_out_ptr, partial_lse_ptr,
        qk_scale, num_tokens, num_q_heads, blocks_per_sequence, split_keys,
        stride_q_token, stride_q_head,
        stride_k_page, stride_k_slot, stride_k_head,
        stride_v_page, stride_v_slot, stride_v_head,
        stride_block_table, stride_order, stride_out_token, stride_out_head,
        GROUP: tl.constexpr, TOKENS_PER_PROGRAM: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        SPLIT_K: tl.constexpr, COMPUTE_FP32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    sequence = tl.program_id(0) // blocks_per_sequence
    block = tl.program_id(0) % blocks_per_sequence
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    query_begin = tl.load(query_starts_ptr + sequence)
    query_end = tl.load(query_starts_ptr + sequence + 1)
    first_token = query_begin + block * TOKENS_PER_PROGRAM
    if first_token >= query_end:
        return
    prefix = tl.load(prefix_lens_ptr + sequence)
    rows = tl.arange(0, BLOCK_R)
    token_in_program = rows // GROUP
    token = first_token + token_in_program  # [BLOCK_R]
    head = kv_head * GROUP + rows % GROUP
    row_valid = (token_in_program < TOKENS_PER_PROGRAM) & (token < query_end)
    seen = tl.load(counts_ptr + token, mask=row_valid, other=0)  # new tokens each row sees
    row_key_end = prefix + seen  # [BLOCK_R]: row r attends positions 0 .. row_key_end[r] - 1
    furthest = tl.max(tl.where(row_valid, row_key_end, 0), axis=0)
    if SPLIT_K:
        key_begin = split * split_keys
        key_end = tl.minimum(key_begin + split_keys, furthest)
    else:
        key_begin = 0
        key_end = furthest
    if key_begin >= key_end:  # no row has a key in this split; its log-sum-exp rows are already -inf
        return
    # A row sees exactly its first new tokens when the last one it sees is new token count - 1.
    last_seen = tl.load(order_ptr + token.to(tl.int64) * stride_order + seen - 1, mask=row_valid & (seen > 0),
                        other=-1)
    in_order = tl.min(tl.where(row_valid & (last_seen != seen - 1), 0, 1), axis=0)

    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    row_dim_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_dim_mask, other=0.0)
    if COMPUTE_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

    m_i, l_i, acc = _attend_rows(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                                 block_tables_ptr + sequence * stride_block_table, order_ptr, stride_order,
                                 first_token, query_end, key_begin, key_end, prefix, row_key_end, in_order, row_valid,
                                 token_in_program, kv_head, dims, dim_valid, qk_scale, stride_k_page, stride_k_slot,
                                 stride_k_head, stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE, COMPUTE_FP32,
                                 TOKENS_PER_PROGRAM, BLOCK_N)
    _store_rows(out_ptr, partial_out_ptr, partial_lse_ptr, m_i, l_i, acc, token, head, dims, row_valid,
                row_dim_mask, split, num_tokens, num_q_heads, stride_out_token, stride_out_head, HEAD_DIM, SPLIT_K)


@triton.jit
def _store_rows(out_ptr, partial_out_ptr, partial_lse_ptr, m_i, l_i, acc, token, head, dims, row_valid,
                row_dim_mask, split, num_tokens, num_q_heads, stride_out_token, stride_out_head,
                HEAD_DIM: tl.constexpr, SPLIT_K: tl.constexpr):
    """A tile's normalised rows to `out`, or, with split keys, to this split's partial rows and their log-sum-exp
    (base 2) for `_combine_splits_kernel`."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that saw nothing has acc = 0: zeros, not NaN
    if not SPLIT_K:
        tl.store(out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_dim_mask)
    else:
        partial_row = (split * num_tokens + token).to(tl.int64) * num_q_heads + head  # [BLOCK_R]
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dims[None, :], out, mask=row_dim_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + partial_row, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_tokens", "num_q_heads", "num_splits"])
def _combine_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, num_tokens, num_q_heads, num_splits,
                           stride_out_token, stride_out_head,
                           HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # token * Hq + head
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_rows = (splits * num_tokens * num_q_heads + row).to(tl.int64)
    lse = tl.load(partial_lse_ptr + split_rows, mask=splits < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
    partial = tl.load(partial_out_ptr + split_rows[:, None] * HEAD_DIM + dims[None, :],
                      mask=(weight[:, None] > 0) & (dims[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * partial, axis=0) / tl.where(total > 0, total, 1.0)
    token = row // num_q_heads
    head = row % num_q_heads
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@dataclass(frozen=True)
class LaunchConfig:
    """How `paged_attention` tiles a launch: a function of the dtypes, the head shape and the block table's width,
    never of the number of query rows (the module's row-invariance rule)."""
    tokens_per_program: int  # consecutive new tokens of one sequence per program, all G query heads of each
    block_rows: int          # BLOCK_R >= tokens_per_program * G
    block_keys: int          # BLOCK_N: keys per tile, tiles from logical position 0
    block_dim: int           # BLOCK_D: head_dim padded to a power of two
    split_keys: int          # keys per split, a multiple of block_keys, splits from logical position 0
    num_splits: int          # splits that cover the block table (1: no split)
    num_warps: int
    compute_fp32: bool       # exact fp32 dots: fp32 inputs, or bf16 under the interpreter


def launch_config(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                  num_splits: int | None = None) -> LaunchConfig:
    """The launch's tiles from q's heads, dtype and device, the cache's shape and dtype and the table's width.
    Splits: the table's keys in at most MAX_SPLITS chunks of at least MIN_KEYS_PER_SPLIT keys (one chunk on the
    CPU), or in at most `num_splits` chunks when given."""
    num_q_heads, head_dim = q.shape[1:]
    page_size, num_kv_heads = k_cache.shape[1:3]
    group = num_q_heads // num_kv_heads
    fp32_inputs = q.dtype == torch.float32 or q.dtype != k_cache.dtype
    block_rows = max(triton.next_power_of_2(group), FP32_MAX_BLOCK_ROWS if fp32_inputs else MAX_BLOCK_ROWS)
    block_dim = triton.next_power_of_2(head_dim)
    if fp32_inputs:
        block_keys = FP32_BLOCK_KEYS
    else:
        block_keys = 64 if block_rows * block_dim <= MAX_TILE_ELEMENTS else 32
    max_keys = max(1, block_tables.shape[1] * page_size)
    if num_splits is not None:
        chunk = -(-max_keys // num_splits)
    elif q.device.type == "cpu":
        chunk = max_keys  # the interpreter runs one program at a time: splitting only adds work
    else:
        chunk = max(-(-max_keys // MAX_SPLITS), MIN_KEYS_PER_SPLIT)
    split_keys = -(-chunk // block_keys) * block_keys
    # The Triton interpreter multiplies bf16 operands of tl.dot as raw uint16 bits: upcast there.
    return LaunchConfig(tokens_per_program=block_rows // group, block_rows=block_rows, block_keys=block_keys,
                        block_dim=block_dim, split_keys=split_keys, num_splits=-(-max_keys // split_keys),
                        num_warps=_warps(block_rows, fp32_inputs),
                        compute_fp32=fp32_inputs or _interpreted(_paged_attention_kernel))


def _warps(block_rows: int, fp32_inputs: bool) -> int:
    """Eight warps for 64-row bf16 tiles, where four spill registers on sm_80; four elsewhere (with eight, ptxas
    spilled the 16-row exact-fp32 tile at 80 registers). nanojet/tools/kernel_gate.py checks every tile on sm_80
    and sm_90."""
    return 8 if block_rows >= 64 and not fp32_inputs else 4


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    prefix_lens: torch.Tensor, query_starts: torch.Tensor, visibility: torch.Tensor, scale: float,
                    max_new_tokens: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as `kernels.reference.paged_attention`; each row's bits as if it were alone (module docstring).

    `max_new_tokens` must be at least every sequence's new-token count (default: T, always safe); a tighter
    bound shrinks the grid when several sequences share a step. `num_splits` caps the split count (1..MAX_SPLITS)
    instead of the default rule; rows agree bit for bit only between launches with the same split size."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"paged_attention: num_splits must lie in 1..{MAX_SPLITS}, got {num_splits}")
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    num_sequences = block_tables.shape[0]
    if num_tokens == 0 or num_sequences == 0:
        return out
    q, k_cache, v_cache, block_tables, visibility = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache, block_tables, visibility))
    config = launch_config(q, k_cache, block_tables, num_splits)
    max_new = num_tokens if max_new_tokens is None else max(1, min(max_new_tokens, num_tokens))
    order = torch.empty(num_tokens, visibility.shape[1] * 32, dtype=torch.int32, device=q.device)
    counts = torch.empty(num_tokens, dtype=torch.int32, device=q.device)
    order_blocks = triton.cdiv(max_new, ORDER_BLOCK_TOKENS)
    _visible_order_kernel[(num_sequences * order_blocks,)](
        query_starts, visibility, order, counts, order_blocks, visibility.stride(0), order.stride(0),
        BLOCK_T=ORDER_BLOCK_TOKENS)
    blocks_per_sequence = triton.cdiv(max_new, config.tokens_per_program)
    split = config.num_splits > 1
    if split:
        partial_out = torch.empty(config.num_splits, num_tokens, num_q_heads, head_dim, dtype=torch.float32,
                                  device=q.device)
        # Rows of a split no program writes (past their keys, or outside every sequence) must read as empty.
        partial_lse = torch.full((config.num_splits, num_tokens, num_q_heads), float("-inf"), device=q.device)
    else:
        partial_out = partial_lse = out  # unused
    _paged_attention_kernel[(num_sequences * blocks_per_sequence, num_kv_heads, config.num_splits)](
        q, k_cache, v_cache, block_tables, prefix_lens, query_starts, order, counts, out, partial_out, partial_lse,
        scale * LOG2_E, num_tokens, num_q_heads, blocks_per_sequence, config.split_keys,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), order.stride(0), out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, TOKENS_PER_PROGRAM=config.tokens_per_program, PAGE_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim, SPLIT_K=split, COMPUTE_FP32=config.compute_fp32, BLOCK_R=config.block_rows,
        BLOCK_N=config.block_keys, BLOCK_D=config.block_dim, num_warps=config.num_warps)
    if split:
        _combine_splits_kernel[(num_tokens * num_q_heads,)](
            partial_out, partial_lse, out, num_tokens, num_q_heads, config.num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=MAX_SPLITS,
            BLOCK_D=config.block_dim, num_warps=1 if config.block_dim <= 64 else 2)
    return out
