"""One function per kernel: Triton on CUDA tensors, the pure-torch reference elsewhere.

`set_backend("triton")` forces the Triton kernels (on CPU they need TRITON_INTERPRET=1, set before triton is
imported); `set_backend("torch")` forces the reference; `set_backend(None)` restores the automatic choice."""
import torch

from . import reference

_forced_backend: str | None = None


def set_backend(name: str | None) -> None:
    if name not in (None, "torch", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}: use 'torch', 'triton' or None")
    global _forced_backend
    _forced_backend = name


def _impl(tensor: torch.Tensor):
    use_triton = _forced_backend == "triton" or (_forced_backend is None and tensor.is_cuda)
    if use_triton:
        from . import triton_ops  # lazy: importing triton is slow and needs TRITON_INTERPRET set first on CPU
        return triton_ops
    return reference


def rms_norm(x, weight, eps, residual=None):
    return _impl(x).rms_norm(x, weight, eps, residual)


def qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps):
    return _impl(q).qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, eps)


def silu_and_mul(gate_up):
    return _impl(gate_up).silu_and_mul(gate_up)


def store_kv(k_cache, v_cache, k, v, slot_mapping):
    return _impl(k).store_kv(k_cache, v_cache, k, v, slot_mapping)


def move_kv(pool, src_slots, dst_slots):
    return _impl(pool).move_kv(pool, src_slots, dst_slots)


def paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, scale):
    return _impl(q).paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts,
                                    visibility, scale)
