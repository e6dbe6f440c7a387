"""Fused mixture-of-experts MLP in Triton: the contract of `kernels.reference.fused_moe`, and the router's top-k.

Each token picks k experts, so there are P = T * k (token, slot) pairs. The pairs are sorted by expert and each
expert's run is padded to a multiple of BLOCK_M, so every BLOCK_M-row tile of the sorted list belongs to one expert
(`sort_pairs_by_expert`). Then three launches:

1. `_moe_gate_up_kernel`: a grouped GEMM over the sorted tiles, [BLOCK_M pairs] x expert e's gate and up rows,
   then SiLU(gate) * up, written to an activation buffer `[P, I]` at each pair's row;
2. `_moe_down_kernel`: the down projection of those rows by the same expert, times the pair's routing weight,
   written to `[P, H]`;
3. `_moe_sum_kernel`: the sum over the k slots of each token, in slot order, in fp32, rounded once.

Everything is sized from shapes only (the padded list has room for the worst case, and tiles past the last
expert's run exit at once), so there is no host sync and the launches can be captured in a CUDA graph.

Row invariance (a token's output bits do not depend on which other tokens share the step, how many, or how the
pairs sort): the tiles (`moe_block_sizes`) depend on the dtype only, not on the number of pairs, so every pair row
goes through the same tile shapes and the same reduction order over H and I wherever it lands in its tile; the
pair count is a runtime argument Triton does not specialise on; and a token's k rows are summed in slot order
0..k-1, whatever order the sort put them in. So a tree node verified among many and a token decoded alone agree.

`topk_routing` is the router after its projection: softmax in fp32, top k, renormalised, one program per token.
"""
import torch
import triton
import triton.language as tl

from .triton_attention import _interpreted


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids `[T, k]` -> (sorted_pairs `[capacity]` int32, block_experts `[capacity / block_m]` int32).

    sorted_pairs lists pair indices p = t * k + j grouped by expert, each expert's run padded to a multiple of
    `block_m` with P (no pair); block_experts[b] is the expert of tile b, or `num_experts` for tiles past the end.
    The capacity P + min(E, P) * (block_m - 1) holds any routing, so the shape depends only on T, k, E."""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    capacity = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[(padded_ends - padded)[sorted_experts] + rank] = order.int()
    tile_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_experts = torch.searchsorted(padded_ends, tile_starts, right=True).int()
    return sorted_pairs, block_experts


@triton.jit
def _tile_rows(sorted_pairs_ptr, block_experts_ptr, num_pairs, num_experts, BLOCK_M: tl.constexpr):
    """The expert of this program's tile and its pair indices (P marks padding)."""
    tile = tl.program_id(0)
    expert = tl.load(block_experts_ptr + tile).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return expert, pairs, pairs < num_pairs


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gate_up_kernel(hidden_ptr, gate_up_ptr, sorted_pairs_ptr, block_experts_ptr, act_ptr,
                        num_pairs, num_experts, hidden_size, inter, top_k,
                        stride_hidden, stride_gu_expert, stride_gu_row, stride_act,
                        COMPUTE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    expert, pairs, valid = _tile_rows(sorted_pairs_ptr, block_experts_ptr, num_pairs, num_experts, BLOCK_M)
    if expert >= num_experts:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate columns
    col_valid = cols < inter
    x_rows = hidden_ptr + (pairs // top_k)[:, None] * stride_hidden
    # One int32 offset tile serves the gate and the up rows (an expert's weights are far below 2^31 elements):
    # two tiles of 64-bit pointers would cost more registers than the accumulators.
    gate_base = gate_up_ptr + expert * stride_gu_expert
    up_base = gate_base + inter * stride_gu_row
    w_offsets = cols[None, :] * stride_gu_row + tl.arange(0, BLOCK_K)[:, None]  # [K, N]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < hidden_size
        x = tl.load(x_rows + ks[None, :], mask=valid[:, None] & k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None] & col_valid[None, :]
        gate = tl.load(gate_base + k0 + w_offsets, mask=w_mask, other=0.0)
        up = tl.load(up_base + k0 + w_offsets, mask=w_mask, other=0.0)
        if COMPUTE_FP32:
            x = x.to(tl.float32)
            acc_gate = tl.dot(x, gate.to(tl.float32), acc_gate, input_precision="ieee")
            acc_up = tl.dot(x, up.to(tl.float32), acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(x, gate, acc_gate)
            acc_up = tl.dot(x, up, acc_up)
    out_dtype = act_ptr.dtype.element_ty
    # Round where the reference does: the projection, SiLU, and the product are each rounded to the dtype.
    gate = acc_gate.to(out_dtype).to(tl.float32)
    up = acc_up.to(out_dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
    tl.store(act_ptr + pairs[:, None] * stride_act + cols[None, :], (silu * up).to(out_dtype),
             mask=valid[:, None] & col_valid[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(act_ptr, down_ptr, sorted_pairs_ptr, block_experts_ptr, weights_ptr, rows_ptr,
                     num_pairs, num_experts, hidden_size, inter,
                     stride_act, stride_down_expert, stride_down_row, stride_rows,
                     COMPUTE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    expert, pairs, valid = _tile_rows(sorted_pairs_ptr, block_experts_ptr, num_pairs, num_experts, BLOCK_M)
    if expert >= num_experts:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden columns
    col_valid = cols < hidden_size
    a_rows = act_ptr + pairs[:, None] * stride_act
    w_base = down_ptr + expert * stride_down_expert
    w_offsets = cols[None, :] * stride_down_row + tl.arange(0, BLOCK_K)[:, None]  # [K, N], int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < inter
        a = tl.load(a_rows + ks[None, :], mask=valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_base + k0 + w_offsets, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        if COMPUTE_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out_dtype = rows_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(out_dtype).to(tl.float32)
    weighted = acc.to(out_dtype).to(tl.float32) * weight[:, None]
    tl.store(rows_ptr + pairs[:, None] * stride_rows + cols[None, :], weighted.to(out_dtype),
             mask=valid[:, None] & col_valid[None, :])


@triton.jit
def _moe_sum_kernel(rows_ptr, out_ptr, hidden_size, stride_rows, stride_out, TOP_K: tl.constexpr,
                    BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden_size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        acc += tl.load(rows_ptr + (token * TOP_K + slot) * stride_rows + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# 8 warps: with 4, 32- and 64-row bf16 tiles spilled registers on sm_80 and sm_90 (two accumulators and the
# transposed weight tiles); 8 spill nowhere (Triton's compiler + ptxas -v, checked without a GPU).
GEMM_WARPS = 8


def moe_block_sizes(fp32: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) from the dtype only, never from the number of pairs (row invariance). BLOCK_M is
    tl.dot's minimum, 16: in decode and tree verify each expert gets a row or a few, so larger tiles would be padding;
    prefill's fuller experts take several tiles, each reading the expert's weights (mostly from L2)."""
    return (16, 32, 32) if fp32 else (16, 64, 64)


def fused_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Same contract as `kernels.reference.fused_moe`: hidden `[T, H]`, gate_up `[E, 2I, H]`, down `[E, H, I]`,
    topk_weights / topk_ids `[T, k]` -> `[T, H]` in hidden's dtype."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = gate_up.shape
    inter, top_k = two_inter // 2, topk_ids.shape[1]
    out = torch.empty_like(hidden)
    if num_tokens == 0:
        return out
    hidden, gate_up, down = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, gate_up, down))
    weights = topk_weights.flatten().contiguous()
    num_pairs = num_tokens * top_k
    fp32 = hidden.dtype == torch.float32
    block_m, block_n, block_k = moe_block_sizes(fp32)
    sorted_pairs, block_experts = sort_pairs_by_expert(topk_ids, num_experts, block_m)
    # The interpreter multiplies bf16 tl.dot operands as raw bits: compute in fp32 there.
    compute_fp32 = fp32 or _interpreted(_moe_gate_up_kernel)
    tiles = block_experts.numel()
    act = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=hidden.device)
    _moe_gate_up_kernel[(tiles, triton.cdiv(inter, block_n))](
        hidden, gate_up, sorted_pairs, block_experts, act, num_pairs, num_experts, hidden_size, inter, top_k,
        hidden.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        COMPUTE_FP32=compute_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=GEMM_WARPS)
    rows = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _moe_down_kernel[(tiles, triton.cdiv(hidden_size, block_n))](
        act, down, sorted_pairs, block_experts, weights, rows, num_pairs, num_experts, hidden_size, inter,
        act.stride(0), down.stride(0), down.stride(1), rows.stride(0),
        COMPUTE_FP32=compute_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=GEMM_WARPS)
    block = min(1024, triton.next_power_of_2(hidden_size))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden_size, block))](
        rows, out, hidden_size, rows.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block,
        num_warps=max(1, min(8, block // 256)))
    return out


@triton.jit
def _topk_routing_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_logits, stride_weights, stride_ids,
                         TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """One token: softmax over its experts' logits in fp32, the k largest (ties to the lower expert id), optionally
    renormalised to sum 1, stored in the logits' dtype with int64 ids. Every reduction spans one token's row."""
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + token * stride_logits + experts, mask=valid, other=float("-inf")).to(tl.float32)
    shifted = tl.exp(logits - tl.max(logits, axis=0))
    probs = tl.where(valid, shifted / tl.sum(shifted, axis=0), -1.0)  # -1: never picked (probabilities are >= 0)
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for slot in tl.static_range(TOP_K):
        best, expert = tl.max(probs, axis=0, return_indices=True, return_indices_tie_break_left=True)
        weights = tl.where(slots == slot, best, weights)
        ids = tl.where(slots == slot, expert.to(tl.int64), ids)
        probs = tl.where(experts == expert, -1.0, probs)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)  # slots past k hold 0
    picked = slots < TOP_K
    tl.store(weights_ptr + token * stride_weights + slots, weights.to(weights_ptr.dtype.element_ty), mask=picked)
    tl.store(ids_ptr + token * stride_ids + slots, ids, mask=picked)


def topk_routing_config(num_experts: int, top_k: int) -> dict:
    """One token per program, whatever the token count: the block covers all experts."""
    block = triton.next_power_of_2(num_experts)
    return dict(BLOCK_E=block, BLOCK_K=triton.next_power_of_2(top_k), num_warps=max(1, min(8, block // 256)))


def topk_routing(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.reference.topk_routing`: router logits `[T, E]` -> (weights `[T, k]` in the logits'
    dtype, expert ids `[T, k]` int64). Ties go to the lower expert id."""
    num_tokens, num_experts = logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
    weights = torch.empty(num_tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    _topk_routing_kernel[(num_tokens,)](
        logits, weights, ids, num_experts, logits.stride(0), weights.stride(0), ids.stride(0), TOP_K=top_k,
        RENORMALIZE=renormalize, **topk_routing_config(num_experts, top_k))
    return weights, ids


def example_args(num_tokens: int, hidden_size: int, moe_intermediate_size: int, num_experts: int, top_k: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple:
    """Arguments of `fused_moe` in a model's shape, for compiling its specialisations ahead of time (the kernel
    gate): uninitialised weights (never touched, so a 30B shape costs no memory) and a valid routing, token t on
    experts (t + j * E // k) % E, so every expert id is in range and a token's k experts are distinct."""
    weights = torch.full((num_tokens, top_k), 1.0 / top_k, dtype=dtype, device=device)
    slots = torch.arange(top_k, device=device) * (num_experts // top_k)
    ids = (torch.arange(num_tokens, device=device)[:, None] + slots) % num_experts  # int64, as torch.topk returns
    return (torch.empty(num_tokens, hidden_size, dtype=dtype, device=device),
            torch.empty(num_experts, 2 * moe_intermediate_size, hidden_size, dtype=dtype, device=device),
            torch.empty(num_experts, hidden_size, moe_intermediate_size, dtype=dtype, device=device), weights, ids)
