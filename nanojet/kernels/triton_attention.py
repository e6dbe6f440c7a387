"""Paged attention in Triton: a prefix every query sees, then the step's new tokens under a per-query bit mask.

Grid `(S * blocks_per_sequence, Hkv, num_splits)`. A program owns `tokens_per_block` consecutive new tokens of
one sequence and all `G = Hq / Hkv` query heads of one KV head, flattened into `BLOCK_R` rows
(row = token * G + head), so each K/V tile is read once per GQA group. It walks its share of the prefix
(only the length bound is masked), then the new tokens (bit mask; tiles that no row sees are skipped, which
halves causal prefill and prunes trees). Softmax is online, in fp32, base 2.

Decode and small tree verifies have few query blocks, so few programs: with `num_splits > 1`
(flash-decoding) the prefix is cut into equal chunks, one per split, each writing a normalised partial output
and its log-sum-exp; `_combine_splits_kernel` merges them. The last split also takes the new tokens.
"""
import functools

import torch
import triton
import triton.language as tl

# Tiles and warps (`_warps`) are chosen so that no specialisation the engine launches spills registers on sm_80
# or sm_90 at head_dim 128: nanojet/tools/kernel_gate.py compiles every one with ptxas and fails CI on a spill. With four
# warps, 64-row bf16 tiles spilled on sm_80 and every fp32 tile spilled on both (255 registers, up to 452 bytes);
# eight warps remove it. fp32 inputs use exact (FMA, "ieee") dots, whose operands need far more registers, so
# they also get small tiles.
MAX_BLOCK_ROWS = 64       # query rows (token x head) per program
MAX_TILE_ELEMENTS = 4096  # rows x head_dim above which a key tile shrinks from 64 to 32 keys
FP32_MAX_BLOCK_ROWS = 16
FP32_BLOCK_KEYS = 16
MAX_SPLITS = 32
MIN_KEYS_PER_SPLIT = 256
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


# Runtime sizes that only enter address arithmetic are not specialised on (== 1, multiple of 16): one compiled
# variant per tile configuration serves every tree size, split count and table width.
@triton.jit
def _attend_prefix(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, prefix, split, num_splits,
                   kv_head, dims, dim_valid, qk_scale, stride_k_page, stride_k_slot, stride_k_head,
                   stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE: tl.constexpr, COMPUTE_FP32: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The committed prefix, every key visible to every row: all of it, or this split's chunk of it."""
    if not SPLIT_K:
        key_begin = 0
        key_end = prefix
    else:
        chunk = tl.cdiv(tl.cdiv(prefix, num_splits), BLOCK_N) * BLOCK_N
        key_begin = split * chunk
        key_end = tl.minimum(prefix, key_begin + chunk)
    for start in range(key_begin, key_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < key_end
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, keys,
                                     key_valid, key_valid[None, :], kv_head, dims, dim_valid, qk_scale,
                                     stride_k_page, stride_k_slot, stride_k_head,
                                     stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE, COMPUTE_FP32)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_tokens", "num_q_heads", "blocks_per_sequence", "num_splits",
                               "stride_block_table", "stride_visibility"])
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, prefix_lens_ptr, query_starts_ptr, visibility_ptr,
        out_ptr, partial_out_ptr, partial_lse_ptr,
        qk_scale, num_tokens, num_q_heads, blocks_per_sequence,
        stride_q_token, stride_q_head,
        stride_k_page, stride_k_slot, stride_k_head,
        stride_v_page, stride_v_slot, stride_v_head,
        stride_block_table, stride_visibility, stride_out_token, stride_out_head,
        GROUP: tl.constexpr, TOKENS_PER_BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        num_splits, SPLIT_K: tl.constexpr, COMPUTE_FP32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    sequence = tl.program_id(0) // blocks_per_sequence
    block = tl.program_id(0) % blocks_per_sequence
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    query_begin = tl.load(query_starts_ptr + sequence)
    query_end = tl.load(query_starts_ptr + sequence + 1)
    first_token = query_begin + block * TOKENS_PER_BLOCK
    if first_token >= query_end:
        return
    num_new = query_end - query_begin
    prefix = tl.load(prefix_lens_ptr + sequence)
    block_table_row_ptr = block_tables_ptr + sequence * stride_block_table

    rows = tl.arange(0, BLOCK_R)
    token = first_token + rows // GROUP  # [BLOCK_R]
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < TOKENS_PER_BLOCK * GROUP) & (token < query_end)
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

    m_i, l_i, acc = _attend_prefix(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr, prefix, split,
                                   num_splits, kv_head, dims, dim_valid, qk_scale,
                                   stride_k_page, stride_k_slot, stride_k_head, stride_v_page, stride_v_slot,
                                   stride_v_head, PAGE_SIZE, COMPUTE_FP32, SPLIT_K, BLOCK_N)

    if split == num_splits - 1:  # the step's new tokens, each row seeing those its visibility bits allow
        for start in range(0, num_new, BLOCK_N):
            new_index = start + tl.arange(0, BLOCK_N)
            new_valid = new_index < num_new
            words = tl.load(visibility_ptr + token[:, None] * stride_visibility + (new_index[None, :] >> 5),
                            mask=row_valid[:, None] & new_valid[None, :], other=0)
            visible = ((words >> (new_index[None, :] & 31)) & 1) != 0  # [BLOCK_R, BLOCK_N]
            if tl.max(visible.to(tl.int32)) > 0:
                m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
                                             prefix + new_index, new_valid, visible, kv_head, dims, dim_valid,
                                             qk_scale, stride_k_page, stride_k_slot, stride_k_head,
                                             stride_v_page, stride_v_slot, stride_v_head, PAGE_SIZE, COMPUTE_FP32)
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


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    # Asked of Triton's active driver (the CUDA one on a GPU): the ahead-of-time compile check
    # (nanojet/tools/kernel_gate.py) answers for the GPU it compiles for.
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["multiprocessor_count"]


def _default_num_splits(q: torch.Tensor, programs: int, max_keys: int) -> int:
    """Enough splits to fill the GPU twice over when the query blocks alone cannot; never chunks shorter
    than MIN_KEYS_PER_SPLIT at the block table's full length. Depends on shapes only (CUDA-graph safe)."""
    if q.device.type == "cpu":
        return 1  # the interpreter runs one program at a time: splitting only adds work
    multiprocessors = _multiprocessor_count(q.device.index if q.device.index is not None else 0)
    if programs >= multiprocessors:
        return 1
    return max(1, min(-(-2 * multiprocessors // programs), max_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def _warps(block_rows: int, fp32_inputs: bool) -> int:
    """Eight warps where four would spill registers (nanojet/tools/kernel_gate.py checks every tile on sm_80 and sm_90):
    exact fp32 dots, and 64-row bf16 tiles on sm_80."""
    return 8 if fp32_inputs or block_rows >= 64 else 4


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    prefix_lens: torch.Tensor, query_starts: torch.Tensor, visibility: torch.Tensor, scale: float,
                    max_new_tokens: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as `kernels.reference.paged_attention`.

    `max_new_tokens` must be at least every sequence's new-token count (default: T, always safe); a tighter
    bound shrinks the grid when several sequences share a step. `num_splits` overrides the split-K heuristic."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    num_sequences = block_tables.shape[0]
    if num_tokens == 0 or num_sequences == 0:
        return out
    q, k_cache, v_cache, block_tables, visibility = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache, block_tables, visibility))
    group = num_q_heads // num_kv_heads
    max_new = num_tokens if max_new_tokens is None else max(1, min(max_new_tokens, num_tokens))
    fp32_inputs = q.dtype == torch.float32 or q.dtype != k_cache.dtype
    row_cap = FP32_MAX_BLOCK_ROWS if fp32_inputs else MAX_BLOCK_ROWS
    # A block holds whole tokens with all G heads each; tl.dot needs at least 16 rows.
    block_rows = max(16, triton.next_power_of_2(group), min(row_cap, triton.next_power_of_2(max_new * group)))
    block_dim = triton.next_power_of_2(head_dim)
    if fp32_inputs:
        block_keys = FP32_BLOCK_KEYS
    else:
        block_keys = 64 if block_rows * block_dim <= MAX_TILE_ELEMENTS else 32
    tokens_per_block = block_rows // group
    blocks_per_sequence = triton.cdiv(max_new, tokens_per_block)
    programs = num_sequences * blocks_per_sequence * num_kv_heads
    if num_splits is None:
        num_splits = _default_num_splits(q, programs, block_tables.shape[1] * page_size)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"paged_attention: num_splits must lie in 1..{MAX_SPLITS}, got {num_splits}")
    if num_splits > 1:
        partial_out = torch.empty(num_splits, num_tokens, num_q_heads, head_dim, dtype=torch.float32,
                                  device=q.device)
        # Rows no program writes (tokens outside every sequence) must read as empty, not as garbage.
        partial_lse = torch.full((num_splits, num_tokens, num_q_heads), float("-inf"), device=q.device)
    else:
        partial_out = partial_lse = out  # unused
    # The Triton interpreter multiplies bf16 operands of tl.dot as raw uint16 bits: upcast there.
    compute_fp32 = fp32_inputs or _interpreted(_paged_attention_kernel)
    _paged_attention_kernel[(num_sequences * blocks_per_sequence, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, out, partial_out, partial_lse,
        scale * LOG2_E, num_tokens, num_q_heads, blocks_per_sequence,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), visibility.stride(0), out.stride(0), out.stride(1),
        GROUP=group, TOKENS_PER_BLOCK=tokens_per_block, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        num_splits=num_splits, SPLIT_K=num_splits > 1, COMPUTE_FP32=compute_fp32,
        BLOCK_R=block_rows, BLOCK_N=block_keys, BLOCK_D=block_dim, num_warps=_warps(block_rows, fp32_inputs))
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens * num_q_heads,)](
            partial_out, partial_lse, out, num_tokens, num_q_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=MAX_SPLITS,
            BLOCK_D=block_dim, num_warps=1 if block_dim <= 64 else 2)
    return out
