"""One function per kernel: Triton on CUDA tensors, the pure-torch reference elsewhere.

`set_backend("triton")` forces the Triton kernels (on CPU they need TRITON_INTERPRET=1, set before triton is
imported); `set_backend("torch")` forces the reference; `set_backend(None)` restores the automatic choice.
A call whose inputs need gradients (training the draft head) always runs the reference: the Triton kernels have
no backward.

Row invariance: on the Triton path every op of the target forward (`linear`, `rms_norm`, `qk_norm_rope`,
`silu_and_mul`, `topk_routing`, `fused_moe`, the attention and KV kernels) computes a row's bits from that row alone,
whatever the number and order of the rows sharing the launch, so a tree node verified among many rows and the same
token decoded alone agree in bf16 (kernels/README.md, *Row invariance*). The reference makes no such promise
(cuBLAS and MKL choose by row count); on the CPU it is the runtime path, where fp32 keeps decoding lossless.

Under torch.compile the kernels are opaque custom ops (`torch.ops.nanojet.*`, dispatching to Triton or the
reference when they run) wherever the Triton kernels would run eagerly: the compiler fuses the glue around them but
never traces into them. Traced, inductor would write its own matmuls, norms and reductions, with tiles and
reduction splits chosen from sizes that include the row count, and compiled rounds would no longer round like
eager prefill. (On the CPU the elementwise kernels and `linear` are traced from the reference as before: there the
compiler's choices cost no losslessness in fp32.) The three kernels that touch the KV pool and `fused_moe` are
opaque on every device: traced, a write into a view of the pool becomes a functional copy of the whole pool
(O(context) per step, for a few rows), the reference attention's per-sequence host loop would break the graph, and
grouping tokens by expert is data-dependent (the reference reads expert counts on the host). The pool kernels'
data dependencies (each write consumes what the previous read produced) keep them in program order."""
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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (tensor, *operands)):
        return reference  # training: the Triton kernels define no backward, the torch ops do
    if torch.compiler.is_compiling():
        return _Opaque  # traced: the row-invariant kernels stay kernels (the module's docstring)
    from . import (
        triton_ops,  # lazy: importing triton is slow and needs TRITON_INTERPRET set first on CPU
    )
    return triton_ops


class _Opaque:
    """The row-invariant kernels as torch.compile sees them on the Triton path: custom ops, with the signatures of
    `reference` and `triton_ops` (a custom op cannot return one of its inputs, so `rms_norm` without a residual
    returns x itself from here)."""

    @staticmethod
    def linear(x, weight, bias=None, out_dtype=None):
        return torch.ops.nanojet.linear(x, weight, bias, out_dtype)

    @staticmethod
    def rms_norm(x, weight, eps, residual=None):
        if residual is None:
            return torch.ops.nanojet.rms_norm(x, weight, eps), x
        normed, total = torch.ops.nanojet.add_rms_norm(x, residual, weight, eps)
        return normed, total

    @staticmethod
    def qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps):
        q_out, k_out = torch.ops.nanojet.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps)
        return q_out, k_out

    @staticmethod
    def silu_and_mul(gate_up):
        return torch.ops.nanojet.silu_and_mul(gate_up)

    @staticmethod
    def topk_routing(logits, top_k, renormalize):
        weights, ids = torch.ops.nanojet.topk_routing(logits, top_k, renormalize)
        return weights, ids


def linear(x, weight, bias=None, out_dtype=None):
    """`x @ weight^T + bias` `[..., N]` in `out_dtype` (default x's dtype); row-invariant on the Triton path."""
    return _impl(x, weight, bias).linear(x, weight, bias, out_dtype)


def topk_routing(logits, top_k: int, renormalize: bool):
    """A MoE router's (weights `[T, k]`, expert ids `[T, k]`) from its logits `[T, E]` (`reference.topk_routing`)."""
    return _impl(logits).topk_routing(logits, top_k, renormalize)


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


def materialized(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, each computed once under torch.compile. Inductor hands a pool kernel (an extern call) each input
    it computes as a buffer of its own, so metadata that every layer's pool kernels read (the slot mapping, the
    prefix lengths cast to int32) was computed again for every layer, and its scheduler then compared every pair of
    those copies: compile time grew with depth squared. Made the outputs of one opaque op, they are computed once.
    Outside torch.compile the tensors themselves."""
    if not torch.compiler.is_compiling():
        return tensors
    return tuple(torch.ops.nanojet.materialize(list(tensors)))


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


@torch.library.custom_op("nanojet::materialize", mutates_args=())
def _materialize_op(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]  # a custom op may not return its inputs


@_materialize_op.register_fake
def _(tensors):
    return [t.new_empty(t.shape) for t in tensors]


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


# The row-invariant kernels while compiling for the Triton path (`_Opaque`). Each runs eagerly when the graph runs.


def _promoted(tensor: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return tensor.new_empty(tensor.shape, dtype=torch.promote_types(weight.dtype, dtype or tensor.dtype))


@torch.library.custom_op("nanojet::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype | None) -> torch.Tensor:
    return _impl(x).linear(x, weight, bias, out_dtype)


@_linear_op.register_fake
def _(x, weight, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.custom_op("nanojet::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _impl(x).rms_norm(x, weight, eps)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return _promoted(x, weight)


@torch.library.custom_op("nanojet::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(x).rms_norm(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    total_dtype = torch.promote_types(x.dtype, residual.dtype)
    return _promoted(x, weight, total_dtype), x.new_empty(x.shape, dtype=total_dtype)


@torch.library.custom_op("nanojet::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     positions: torch.Tensor, inv_freq: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(q).qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, positions, inv_freq, eps):
    return _promoted(q, q_weight), _promoted(k, k_weight)


@torch.library.custom_op("nanojet::silu_and_mul", mutates_args=())
def _silu_and_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
    return _impl(gate_up).silu_and_mul(gate_up)


@_silu_and_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("nanojet::topk_routing", mutates_args=())
def _topk_routing_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(logits).topk_routing(logits, top_k, renormalize)


@_topk_routing_op.register_fake
def _(logits, top_k, renormalize):
    return logits.new_empty((logits.shape[0], top_k)), logits.new_empty((logits.shape[0], top_k), dtype=torch.int64)
