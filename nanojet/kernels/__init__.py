"""One function per kernel: Triton on CUDA tensors, the pure-torch reference elsewhere.

`set_backend("triton")` forces the Triton kernels (on CPU they need TRITON_INTERPRET=1, set before triton is
imported); `set_backend("torch")` forces the reference; `set_backend(None)` restores the automatic choice.
A call whose inputs need gradients (training the draft head) always runs the reference: the Triton kernels have
no backward.

Under torch.compile the elementwise kernels are traced from their torch reference (the compiler writes its own
fused kernels, Triton ones on CUDA), and the three kernels that touch the KV pool are opaque custom ops
(`torch.ops.nanojet.*`, dispatching to Triton or the reference when they run): the compiler fuses the glue
around them but never traces into them. Traced, a write into a view of the pool becomes a functional copy of the
whole pool (O(context) per step, for a few rows), and the reference attention's per-sequence host loop would
break the graph. Their data dependencies (each write consumes what the previous read produced) keep them in
program order. `fused_moe` is an opaque custom op too: grouping tokens by expert is data-dependent (the
reference reads expert counts on the host), which a full-graph compile cannot trace."""
import torch

from . import reference

_forced_backend: str | None = None


def set_backend(name: str | None) -> None:
    if name not in (None, "torch", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}: use 'torch', 'triton' or None")
    global _forced_backend
    _forced_backend = name


def _impl(tensor: torch.Tensor, *operands: torch.Tensor | None):
    """The module that runs a kernel on `tensor` (and the other differentiable `operands`)."""
    if not (_forced_backend == "triton" or (_forced_backend is None and tensor.is_cuda)):
        return reference  # decided first: on the CPU this runs for every kernel call of a decode step
    if torch.compiler.is_compiling():
        return reference  # traced: the compiler generates its own fused kernels from the torch code
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (tensor, *operands)):
        return reference  # training: the Triton kernels define no backward, the torch ops do
    from . import (
        triton_ops,  # lazy: importing triton is slow and needs TRITON_INTERPRET set first on CPU
    )
    return triton_ops


def rms_norm(x, weight, eps, residual=None):
    return _impl(x, weight, residual).rms_norm(x, weight, eps, residual)


def _plans(positions) -> bool:
    """Whether a forward over `positions` runs the reference eagerly, the one path that takes a plan (Triton
    kernels, compiled graphs and meta tensors work without)."""
    return not torch.compiler.is_compiling() and positions.device.type != "meta" and _impl(positions) is reference


def plan_forward(positions, inv_freq, slot_mapping, block_tables, prefix_lens, query_starts, visibility, page_size,
                 num_q_heads):
    """What every layer of a paged forward shares, computed once (`reference.ForwardPlan`), or None where no kernel
    would read it."""
    if not _plans(positions):
        return None
    return reference.plan_forward(positions, inv_freq, slot_mapping, block_tables, prefix_lens, query_starts,
                                  visibility, page_size, num_q_heads)


def plan_context(positions, inv_freq, slot_mapping):
    """`plan_forward` for rows that are only projected and stored, never attended (the draft head's context): the
    rope tables and store rows its layers share."""
    return reference.plan_context(positions, inv_freq, slot_mapping) if _plans(positions) else None


def qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps, plan=None):
    module = _impl(q, k, q_weight, k_weight)
    if module is reference and plan is not None:
        return reference.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps, rope=plan.rope)
    return module.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps)


def silu_and_mul(gate_up):
    return _impl(gate_up).silu_and_mul(gate_up)


def store_kv(k_cache, v_cache, k, v, slot_mapping, plan=None):
    if torch.compiler.is_compiling():
        return torch.ops.nanojet.store_kv(k_cache, v_cache, k, v, slot_mapping)
    module = _impl(k)
    if module is reference:
        return reference.store_kv(k_cache, v_cache, k, v, slot_mapping, plan=plan)
    return module.store_kv(k_cache, v_cache, k, v, slot_mapping)


def move_kv(pool, src_slots, dst_slots):
    if torch.compiler.is_compiling():
        return torch.ops.nanojet.move_kv(pool, src_slots, dst_slots)
    return _impl(pool).move_kv(pool, src_slots, dst_slots)


def paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, scale, plan=None):
    if torch.compiler.is_compiling():
        return torch.ops.nanojet.paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts,
                                                 visibility, scale)
    module = _impl(q)
    if module is reference:
        return reference.paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility,
                                         scale, plan=plan)
    return module.paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, scale)


def fused_moe(hidden, gate_up, down, topk_weights, topk_ids):
    if torch.compiler.is_compiling():
        return torch.ops.nanojet.fused_moe(hidden, gate_up, down, topk_weights, topk_ids)
    return _impl(hidden).fused_moe(hidden, gate_up, down, topk_weights, topk_ids)


@torch.library.custom_op("nanojet::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv_op(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    _impl(k).store_kv(k_cache, v_cache, k, v, slot_mapping)


@torch.library.custom_op("nanojet::move_kv", mutates_args=("pool",))
def _move_kv_op(pool: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    _impl(pool).move_kv(pool, src_slots, dst_slots)


@torch.library.custom_op("nanojet::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        prefix_lens: torch.Tensor, query_starts: torch.Tensor, visibility: torch.Tensor,
                        scale: float) -> torch.Tensor:
    out = _impl(q).paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility,
                                   scale)
    return out.contiguous()  # the layout the fake below promises the compiler, whatever q's strides were


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("nanojet::fused_moe", mutates_args=())
def _fused_moe_op(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    return _impl(hidden).fused_moe(hidden, gate_up, down, topk_weights, topk_ids).contiguous()


@_fused_moe_op.register_fake
def _(hidden, gate_up, down, topk_weights, topk_ids):
    return hidden.new_empty(hidden.shape)
