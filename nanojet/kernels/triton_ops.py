"""Triton kernels with the signatures and numerics of `kernels.reference`; `kernels/__init__.py` dispatches here.

Paged attention lives in `triton_attention.py`, the fused MoE MLP and the router's top-k in `triton_moe.py`, the
row-invariant projections in `triton_linear.py`. Elementwise kernels compute in fp32 and round to the output dtype
at the same points as the torch reference (e.g. HF's cast of the normed value before the weight).

Row invariance: each kernel here gives one row (token) to a program, and its block sizes and warps come from the
hidden / head shapes only (the `*_config` functions), so a row's bits never depend on how many rows share a launch.
"""
import functools

import torch
import triton
import triton.language as tl

from . import triton_attention, triton_linear, triton_moe

__all__ = ["rms_norm", "qk_norm_rope", "silu_and_mul", "store_kv", "move_kv", "paged_attention", "fused_moe",
           "linear", "topk_routing"]


def _named_errors(launch):
    """A kernel Triton cannot compile or load for the GPU at hand (too much shared memory, a ptxas failure) is an
    error naming the kernel and its input shapes; nothing falls back to another implementation."""
    @functools.wraps(launch)
    def checked(*args, **kwargs):
        try:
            return launch(*args, **kwargs)
        except Exception as error:
            if not type(error).__module__.startswith("triton"):
                raise
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RuntimeError(f"Triton kernel {launch.__name__} cannot run on {tensors[0].device} for inputs "
                               f"[{shapes}]: {reason}") from error
    return checked


paged_attention = _named_errors(triton_attention.paged_attention)
fused_moe = _named_errors(triton_moe.fused_moe)
linear = _named_errors(triton_linear.linear)
topk_routing = _named_errors(triton_moe.topk_routing)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm_config(hidden: int) -> dict:
    block = triton.next_power_of_2(hidden)
    return dict(BLOCK=block, num_warps=_warps(block))


def qk_norm_rope_config(num_q_heads: int, num_k_heads: int, head_dim: int) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_HQ=triton.next_power_of_2(max(num_q_heads, 1)),
                BLOCK_HK=triton.next_power_of_2(max(num_k_heads, 1)), BLOCK_D=triton.next_power_of_2(head_dim),
                num_warps=4)


def silu_and_mul_config(intermediate: int) -> dict:
    block = min(1024, triton.next_power_of_2(intermediate))
    return dict(BLOCK=block, num_warps=_warps(block))


def store_kv_config(num_heads: int, head_dim: int) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads),
                BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, hidden, eps,
                     stride_x, stride_residual, stride_out, stride_sum,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + residual).to(sum_ptr.dtype.element_ty)  # the sum is rounded to its dtype, as in torch
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = (x * rstd).to(sum_ptr.dtype.element_ty).to(tl.float32)  # HF casts back before the weight
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`[..., H]` -> a `[N, H]` view (a copy only when the last dim is strided)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@_named_errors
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    total = x if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if x.numel() == 0:
        return out, total
    x_rows, out_rows, total_rows = _rows(x), out.view(-1, hidden), _rows(total)
    residual_rows = x_rows if residual is None else _rows(residual)
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight, out_rows, total_rows, hidden, eps,
        x_rows.stride(0), residual_rows.stride(0), out_rows.stride(0), total_rows.stride(0),
        HAS_RESIDUAL=residual is not None, **rms_norm_config(hidden))
    return out, total


@triton.jit
def _norm_rope_heads(x_ptr, out_ptr, weight_ptr, inv_freq_ptr, token, position, num_heads, eps,
                     stride_x_token, stride_x_head, stride_out_token, stride_out_head,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """RMSNorm then rotate-half RoPE of the `num_heads` heads `[H, D]` of one token."""
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    partner = (dims + half) % HEAD_DIM  # rotate_half reads the other half of the head
    dim_valid = dims < HEAD_DIM
    mask = (heads[:, None] < num_heads) & dim_valid[None, :]
    in_dtype = x_ptr.dtype.element_ty
    out_dtype = out_ptr.dtype.element_ty
    x_rows = x_ptr + token * stride_x_token + heads[:, None] * stride_x_head
    x = tl.load(x_rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(x_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
    weight = tl.load(weight_ptr + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    weight_partner = tl.load(weight_ptr + partner, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    # Round where the reference rounds: normed value to the input dtype, each product and the sum to the output's.
    normed = (weight * (x * rstd).to(in_dtype).to(tl.float32)).to(out_dtype).to(tl.float32)
    normed_partner = (weight_partner * (x_partner * rstd).to(in_dtype).to(tl.float32)).to(out_dtype).to(tl.float32)
    rotated = tl.where(dims[None, :] < half, -normed_partner, normed_partner)
    angle = position * tl.load(inv_freq_ptr + dims % half, mask=dim_valid, other=0.0).to(tl.float32)
    cos = tl.cos(angle).to(out_dtype).to(tl.float32)[None, :]
    sin = tl.sin(angle).to(out_dtype).to(tl.float32)[None, :]
    out = (normed * cos).to(out_dtype).to(tl.float32) + (rotated * sin).to(out_dtype).to(tl.float32)
    tl.store(out_ptr + token * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
             out.to(out_dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_weight_ptr, k_weight_ptr, positions_ptr,
                         inv_freq_ptr, num_q_heads, num_k_heads, eps,
                         stride_q_token, stride_q_head, stride_k_token, stride_k_head,
                         stride_q_out_token, stride_q_out_head, stride_k_out_token, stride_k_out_head,
                         HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.float32)
    if tl.program_id(1) == 0:
        _norm_rope_heads(q_ptr, q_out_ptr, q_weight_ptr, inv_freq_ptr, token, position, num_q_heads, eps,
                         stride_q_token, stride_q_head, stride_q_out_token, stride_q_out_head,
                         HEAD_DIM, BLOCK_HQ, BLOCK_D)
    else:
        _norm_rope_heads(k_ptr, k_out_ptr, k_weight_ptr, inv_freq_ptr, token, position, num_k_heads, eps,
                         stride_k_token, stride_k_head, stride_k_out_token, stride_k_out_head,
                         HEAD_DIM, BLOCK_HK, BLOCK_D)


@_named_errors
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 positions: torch.Tensor, inv_freq: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[T, Hq, D]` and k `[T, Hkv, D]` may be strided views of a fused qkv projection (last dim dense)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q_weight.dtype, q.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k_weight.dtype, k.dtype), device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    _qk_norm_rope_kernel[(num_tokens, 2)](
        q, k, q_out, k_out, q_weight, k_weight, positions, inv_freq, num_q_heads, num_k_heads, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        **qk_norm_rope_config(num_q_heads, num_k_heads, head_dim))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, intermediate, stride_gate_up, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + row * stride_gate_up + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gate_up + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(out_dtype), mask=mask)


@_named_errors
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    intermediate = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows, out_rows = _rows(gate_up), out.view(-1, intermediate)
    config = silu_and_mul_config(intermediate)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(intermediate, config["BLOCK"]))](
        rows, out_rows, intermediate, rows.stride(0), out_rows.stride(0), **config)
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_heads,
                     stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                     stride_kc_page, stride_kc_slot, stride_kc_head, stride_vc_page, stride_vc_slot, stride_vc_head,
                     PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding
        return
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_k_token + heads * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + dims, mask=mask)
    tl.store(k_cache_ptr + page * stride_kc_page + offset * stride_kc_slot + heads * stride_kc_head + dims,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + page * stride_vc_page + offset * stride_vc_slot + heads * stride_vc_head + dims,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@_named_errors
def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kv needs caches whose head_dim is contiguous")
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, num_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), PAGE_SIZE=k_cache.shape[1], **store_kv_config(num_heads, head_dim))


@triton.jit
def _move_kv_kernel(pool_ptr, src_slots_ptr, dst_slots_ptr, num_moves, slots_per_plane, row_size,
                    BLOCK: tl.constexpr):
    # Each program owns one column chunk of one (layer, k/v) plane and walks the moves in order, so no two
    # programs touch the same element, and within a program row j is read before row j+1 is written.
    plane = pool_ptr + tl.program_id(0).to(tl.int64) * slots_per_plane * row_size
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_size
    for j in range(num_moves):
        src = tl.load(src_slots_ptr + j).to(tl.int64)
        dst = tl.load(dst_slots_ptr + j).to(tl.int64)
        row = tl.load(plane + src * row_size + cols, mask=mask)
        tl.store(plane + dst * row_size + cols, row, mask=mask)


@_named_errors
def move_kv(pool: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Same as the reference's gather-before-scatter whenever no move reads a row that an earlier move wrote
    (`dst[j] != src[i]` for all `i > j`), which holds for commit: it moves logical slot `n + p_i` to `n + i`
    with `p_0 < p_1 < ...`, so `dst[j] == src[i]` means `j = p_i >= i` (physical slots, through the page
    table, preserve equality but not order). Moves run in order of j. One launch for all layers."""
    num_moves = src_slots.shape[0]
    if num_moves == 0:
        return
    if not pool.is_contiguous():
        raise ValueError("move_kv needs a contiguous pool [layers, 2, pages, page_size, kv_heads, head_dim]")
    num_layers, _, num_pages, page_size = pool.shape[:4]
    row_size = pool.shape[4] * pool.shape[5]
    block = min(256, triton.next_power_of_2(row_size))
    _move_kv_kernel[(num_layers * 2, triton.cdiv(row_size, block))](
        pool, src_slots, dst_slots, num_moves, num_pages * page_size, row_size, BLOCK=block, num_warps=1)
