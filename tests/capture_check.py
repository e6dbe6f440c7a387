"""A CPU check that refuses what CUDA-graph capture refuses, for code run on the `meta` device.

On the CPU every tensor is a host tensor, so a host-to-device copy cannot be seen: `t[0] = True` is a copy from
the host on a GPU and a plain write on the CPU. On `meta` the device is another device again, and `capture_check()`
watches every op that reaches the dispatcher (TorchDispatchMode) and every Python-level tensor call
(TorchFunctionMode), raising `CaptureViolation` at the first of:

- **host data in device code**: an op with a CPU tensor among its operands or results (a copy to or from the host
  on a GPU; a factory op that builds a host tensor), custom ops included, so a kernel launch handed a host tensor
  is caught; `torch.tensor` / `as_tensor` / `from_numpy` of host data;
- **a Python scalar written into a device tensor**: on a GPU `t[i] = value` builds `value` on the host and copies
  it (`copy_` from a CPU tensor); on meta the value is built on meta by `aten.scalar_tensor`, so a mutating op
  that consumes a tensor born of `scalar_tensor` is refused (reading one, as `torch.where(c, t, 1.0)` does, is a
  kernel argument on a GPU and allowed);
- **a read of device values on the host**: `aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`), ops whose
  output depends on the data (`nonzero`, `masked_select`, `unique`, `bincount`, `equal`, ...), and the Python
  calls that read (`item`, `tolist`, `numpy`, `__bool__`, `__int__`, `__float__`, `__index__`).

Inside the check the pool kernels run as their custom ops (`torch.ops.nanojet.*`, whose fake implementations run
on meta): their torch references read lengths on the host by design and the Triton kernels do not, so what is
checked is what the round hands to a launch, not the reference's insides. A compiled round's nested compile regions
(each decoder layer's work, `invoke_subgraph`) are entered and checked op by op. What it cannot see: work done before
the check starts (building the round), CUDA-only code paths (a `tensor.is_cuda` branch, the Triton kernels'
launch code), host syncs hidden inside an op's CUDA implementation, and reads of a value a Python branch takes
without a tensor call.
"""
import contextlib
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanojet import kernels

HERE, TORCH = Path(__file__).resolve(), Path(torch.__file__).resolve().parent
READ_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"}
BUILD_FUNCTIONS = {"tensor", "as_tensor", "asarray", "from_numpy"}
READ_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}
DATA_DEPENDENT_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
SCALAR_FACTORIES = {torch.ops.aten.scalar_tensor.default, torch.ops.aten.lift_fresh.default}
HOST_SCALAR = "_capture_check_host_scalar"  # attribute marking a tensor a GPU would build on the host


class CaptureViolation(AssertionError):
    """What a CUDA graph capture would refuse, with the line of nanojet that did it."""


def _where() -> str:
    """The innermost frame outside torch and this checker: the line to fix."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != HERE and not path.is_relative_to(TORCH) and path.name != "contextlib.py":
            return f"{path.parent.name}/{path.name}:{frame.lineno} ({frame.name}): {(frame.line or '').strip()}"
    return "(unknown)"


def _refuse(what: str) -> None:
    raise CaptureViolation(f"{what}, at {_where()}")


def _tensors(*trees) -> list[torch.Tensor]:
    return [leaf for tree in trees for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _gathers(func, args) -> bool:
    """Indexing by integer tensors: tagged as data-dependent because a bool mask index is (it runs `nonzero`)."""
    if func not in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
        return False
    return all(index is None or index.dtype not in (torch.bool, torch.uint8) for index in args[1])


class _DispatchCheck(TorchDispatchMode):
    supports_higher_order_operators = True  # a nested compile region (invoke_subgraph): checked op by op, below

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.higher_order.invoke_subgraph:
            body, _, *operands = args  # (a decoder layer's region, its identifier, its inputs)
            with self:
                return body(*operands)
        if func in READ_OPS or (any(tag in func.tags for tag in DATA_DEPENDENT_TAGS) and not _gathers(func, args)):
            _refuse(f"{func} reads device values on the host (a sync; not capturable)")
        operands = _tensors(args, kwargs)
        for tensor in operands:
            if tensor.device.type == "cpu":
                _refuse(f"{func} is given a CPU tensor {tuple(tensor.shape)} {tensor.dtype} "
                        f"(a host-to-device copy on a GPU)")
        if func._schema.is_mutable and any(getattr(t, HOST_SCALAR, False) for t in operands[1:]):
            _refuse(f"{func} writes a Python scalar into a device tensor (a host-to-device copy on a GPU)")
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":  # checked before: meta cannot copy out
            _refuse(f"{func} makes a CPU tensor (a device-to-host copy, or host data inside the round)")
        out = func(*args, **kwargs)
        results = _tensors(out)
        for tensor in results:
            if tensor.device.type == "cpu":
                _refuse(f"{func} makes a CPU tensor {tuple(tensor.shape)} {tensor.dtype} "
                        f"(host data inside the round)")
        # A view of a host-born scalar (an expand under vmap) is still one.
        if func in SCALAR_FACTORIES or (func.is_view and operands and getattr(operands[0], HOST_SCALAR, False)):
            for tensor in results:
                setattr(tensor, HOST_SCALAR, True)
        return out


class _FunctionCheck(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READ_METHODS:
            _refuse(f"Tensor.{name}() reads a device value on the host (a sync; not capturable)")
        if name in BUILD_FUNCTIONS and args and not isinstance(args[0], torch.Tensor):
            _refuse(f"torch.{name}() builds a tensor from host data (a host-to-device copy on a GPU)")
        return func(*args, **(kwargs or {}))


def _as_custom_ops() -> dict:
    """The kernel entry points that touch the pool, as their custom ops; the plans (host-side on the reference
    path) as None."""
    ops = torch.ops.nanojet

    def store_kv(k_cache, v_cache, k, v, slot_mapping, plan=None):
        return ops.store_kv(k_cache, v_cache, k, v, slot_mapping)

    def paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, scale, plan=None):
        return ops.paged_attention(q, k_cache, v_cache, block_tables, prefix_lens, query_starts, visibility, scale)

    return {"store_kv": store_kv, "paged_attention": paged_attention, "move_kv": ops.move_kv,
            "fused_moe": ops.fused_moe, "plan_forward": lambda *args, **kwargs: None,
            "plan_context": lambda *args, **kwargs: None}


@contextlib.contextmanager
def kernels_as_custom_ops():
    """Route `nanojet.kernels`' pool kernels to their custom ops while inside (restored after)."""
    saved = {name: getattr(kernels, name) for name in _as_custom_ops()}
    for name, function in _as_custom_ops().items():
        setattr(kernels, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(kernels, name, function)


@contextlib.contextmanager
def capture_check():
    """Run the body (on meta tensors) refusing what CUDA graph capture refuses; raises CaptureViolation."""
    with kernels_as_custom_ops(), _FunctionCheck(), _DispatchCheck():
        yield
