"""Ahead-of-time compile check of every Triton kernel specialisation the engine, the head and training launch,
for a GPU that is not there: `python -m nanojet.tools.kernel_gate --capability 90` (CI runs it through
tests/test_kernel_gate.py, once per architecture, in a process without TRITON_INTERPRET).

How: a compile-only Triton driver stands in for the CUDA one and answers for the GPU named on the command line
(its architecture and multiprocessor count). The model code then runs on `meta` tensors with the Triton backend
forced, so the project's own launch wrappers pick tiles, warps and split counts and Triton binds each launch's
signature and specialisations exactly as it would on that GPU. A hook Triton calls before compiling compiles the
kernel with Triton's compiler and its bundled ptxas for that architecture, records registers, spills (ptxas -v)
and shared memory, and skips the launch. A kernel that fails to compile is reported with the workload and shape
that launched it; nothing falls back.

What is launched is the table `WORKLOADS` below (a new kernel is one more entry, as the fused MoE is, or one more
model shape in `SHAPES` if the target forward launches it); `--json` prints the report, and any @triton.jit kernel
of `kernels/` that no workload launched is listed under "not_covered".
"""
import argparse
import contextlib
import io
import json
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from nanojet import kernels
from nanojet.bench.synthetic import synthetic_models
from nanojet.engine.scheduler import DEFAULT_PREFILL_CHUNK
from nanojet.engine.tree import TREE_BUCKETS
from nanojet.llm import DTYPES as NAMED_DTYPES
from nanojet.model.attention import AttentionMetadata
from nanojet.train.distill import head_loss

# Triton itself is imported inside functions, after run() has pointed its cache at a fresh folder.


@dataclass(frozen=True)
class GPU:
    name: str
    capability: int
    multiprocessors: int
    max_shared_bytes: int  # opt-in shared memory per block


GPUS = {80: GPU("A100 (sm_80)", 80, 108, 166912), 90: GPU("H100/H200 (sm_90)", 90, 132, 232448)}
SHAPES = ("qwen3-0.6b", "qwen3-8b")  # nanojet.bench.synthetic shapes, cut to one target and one head layer
DTYPES = ("bfloat16", "float32")
PREFILL_CHUNK = DEFAULT_PREFILL_CHUNK
PROMPT_TAIL = 300                    # a prefill (or a last chunk) whose length is not a multiple of 16
PATH_LENGTHS = (1, 7, 16)            # accepted rows a commit moves: plain decoding, a short path, block 16
TRAINING_BATCH = (4, 256)            # train_head.py's default batch x sequence length
# Keys a block table can address: Qwen3's context plus the widest tree (split into chunks of fixed logical
# positions), and a table too short to split.
BLOCK_TABLE_KEYS = {"40960-token context": 40960 + 512, "256-key table": 256}


@dataclass
class Models:
    """A one-layer target and head in one shape and dtype, on the meta device, with a KV pool."""
    shape: str
    dtype: str
    target: torch.nn.Module | None = None
    head: torch.nn.Module | None = None
    pool: torch.Tensor | None = None
    page_size: int = 16

    def __post_init__(self) -> None:
        meta = torch.device("meta")
        self.target, self.head = synthetic_models(self.shape, NAMED_DTYPES[self.dtype], meta, layers=2)
        del self.target.layers[1:]  # a 2-layer cut keeps the head's taps legal; one layer launches what all do
        del self.head.layers[1:]
        config = self.target.config
        pages = -(-max(BLOCK_TABLE_KEYS.values()) // self.page_size)
        self.pool = torch.empty(2, 2, pages, self.page_size, config.num_key_value_heads, config.head_dim,
                                dtype=NAMED_DTYPES[self.dtype], device=meta)

    def metadata(self, count: int, table_keys: int = max(BLOCK_TABLE_KEYS.values())):
        """Attention metadata of one sequence appending `count` tokens after a prefix, as the engine builds it."""
        meta = torch.device("meta")
        words = -(-count // 32)
        max_pages = -(-table_keys // self.page_size)
        return AttentionMetadata(positions=torch.empty(count, dtype=torch.int64, device=meta),
                                 slot_mapping=torch.empty(count, dtype=torch.int64, device=meta),
                                 block_tables=torch.empty(1, max_pages, dtype=torch.int32, device=meta),
                                 prefix_lens=torch.empty(1, dtype=torch.int32, device=meta),
                                 query_starts=torch.empty(2, dtype=torch.int32, device=meta),
                                 visibility=torch.empty(count, words, dtype=torch.int32, device=meta))

    def tokens(self, *shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.int64, device="meta")

    def taps(self, count: int) -> torch.Tensor:
        width = len(self.head.config.target_layer_ids) * self.target.config.hidden_size
        return torch.empty(count, width, dtype=self.pool.dtype, device="meta")


def verify(models: Models, count: int) -> None:
    """The target over `count` new tokens (a tree, a prefill chunk, one decode token) with the head's taps, and the
    logits of every row."""
    for keys in BLOCK_TABLE_KEYS.values():
        taps = (0,) if count > 1 else ()
        hidden, _ = models.target(models.tokens(count), models.metadata(count, keys), models.pool[:1], taps)
        models.target.logits(hidden)


def draft(models: Models, count: int) -> None:
    """The head over its block `[anchor, MASK x (B-1)]` (`count` = block size)."""
    for keys in BLOCK_TABLE_KEYS.values():
        models.head(models.target.embed_tokens(models.tokens(count)), models.metadata(count, keys), models.pool[1:])


def head_context(models: Models, count: int) -> None:
    """The head's context K/V of `count` new committed positions (prefill, or an accepted path)."""
    meta = models.metadata(count)
    models.head.extend_context(models.taps(count), meta.positions, meta.slot_mapping, models.pool[1:])


def commit(models: Models, count: int) -> None:
    """Moving an accepted path's `count` K/V rows in every target layer."""
    slots = models.tokens(count)
    kernels.move_kv(models.pool[:1], slots, slots)


def training_step(models: Models, count: int) -> None:
    """One distillation loss and its backward (nanojet/train/distill.py, `count` = batch x sequence tokens): the frozen
    target's teacher forward runs the Triton kernels, the head's forward the autograd-capable torch ops."""
    batch, seq = TRAINING_BATCH
    models.target.requires_grad_(False)
    with torch.enable_grad():
        loss, _ = head_loss(models.target, models.head, models.tokens(batch, seq), 16, "kl", 1.0, None,
                            random.Random(0))
        loss.backward()


def fused_moe(models: Models, count: int) -> None:
    """The fused-MoE MLP of one Qwen3-30B-A3B layer over `count` tokens (its own shape; the dtype is the models'):
    hidden 2048, 128 experts of 768, top-8, at token counts from decode to a batched step (the tiles do not depend
    on the count: one specialisation per dtype)."""
    from nanojet.kernels.triton_moe import example_args
    if models.shape == SHAPES[0]:  # the MoE shape does not depend on the dense shapes: compile it once per dtype
        kernels.fused_moe(*example_args(count, 2048, 768, 128, 8, NAMED_DTYPES[models.dtype], "meta"))


MOE_PROJECTIONS = {  # Qwen3-30B-A3B's projections other than the experts: (out_features, in_features)
    "qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)}


def moe_projections(models: Models, count: int) -> None:
    """Qwen3-30B-A3B's projections over `count` rows (its own shape, the models' dtype): qkv, o, lm_head (fp32
    logits) and the router with its top-8 of 128; the experts are `fused_moe`'s. The dense shapes' projections are
    the target's and the head's own (`verify`, `draft`)."""
    if models.shape != SHAPES[0]:  # independent of the dense shapes: compile once per dtype
        return
    dtype = NAMED_DTYPES[models.dtype]
    for name, (out_features, in_features) in MOE_PROJECTIONS.items():
        x = torch.empty(count, in_features, dtype=dtype, device="meta")
        out = kernels.linear(x, torch.empty(out_features, in_features, dtype=dtype, device="meta"), None,
                             torch.float32 if name == "lm_head" else None)
        if name == "router":
            kernels.topk_routing(out, 8, True)


# What the engine, the head and training launch: name -> (launch, the token counts it runs with). A new kernel is
# covered by one entry here (or by a new model shape in SHAPES when the target forward launches it).
WORKLOADS = {
    "tree verify": (verify, TREE_BUCKETS),
    "prefill": (verify, (PREFILL_CHUNK, PROMPT_TAIL)),
    "draft block": (draft, (16,)),
    "head context": (head_context, (PREFILL_CHUNK, PROMPT_TAIL) + PATH_LENGTHS),
    "commit": (commit, PATH_LENGTHS),
    "training step": (training_step, (TRAINING_BATCH[0] * TRAINING_BATCH[1],)),
    "fused MoE qwen3-30b-a3b": (fused_moe, (1, 256, PREFILL_CHUNK, 1024)),
    "projections qwen3-30b-a3b": (moe_projections, (1, 64, PREFILL_CHUNK)),
}


class CompileOnlyDriver:
    """What Triton's launch path asks of a driver, answered for a GPU that is not present. Triton calls the
    jit_cache_hook before compiling, and the hook below never lets a launch through."""

    def __init__(self, gpu: GPU):
        from triton.backends.compiler import GPUTarget
        self.gpu = gpu
        self.target = GPUTarget("cuda", gpu.capability, 32)
        self.utils = self

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_device_properties(self, device) -> dict:
        return {"multiprocessor_count": self.gpu.multiprocessors, "max_shared_mem": self.gpu.max_shared_bytes}


_PTXAS_NUMBERS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
                  "spill_loads": r"(\d+) bytes spill loads", "static_shared": r"(\d+) bytes smem"}


@dataclass
class Gate:
    gpu: GPU
    where: str = ""  # the workload and shape being run, for the report
    records: dict = field(default_factory=dict)  # specialisation key -> what was compiled, and its resources
    errors: list = field(default_factory=list)

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        """Triton's jit_cache_hook: compile this specialisation once for the target GPU; True skips the launch."""
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        name = fn.name
        record_key = f"{name}:{key}"
        if record_key in self.records:
            self.records[record_key]["launched_by"].add(self.where)
            return True
        source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion",
                                           "launch_cooperative_grid")}
        log = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True  # Triton already runs ptxas -v; this prints its log
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(source, target=GPUTarget("cuda", self.gpu.capability, 32), options=options)
        except Exception as error:  # noqa: BLE001 - every failure is reported, with where it came from
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.errors.append({"kernel": name, "launched_by": self.where, "error": first_line[:300]})
            self.records[record_key] = {"kernel": name, "launched_by": {self.where}, "failed": True}
            return True
        numbers = {k: max((int(m) for m in re.findall(pattern, log.getvalue())), default=0)
                   for k, pattern in _PTXAS_NUMBERS.items()}
        arg_names = fn.jit_function.arg_names
        constants = {arg_names[path[0]]: value for path, value in compile["constants"].items()
                     if len(path) == 1 and isinstance(value, (int, bool, str))}
        self.records[record_key] = {"kernel": name, "launched_by": {self.where}, "num_warps": options["num_warps"],
                                    "constants": constants, **numbers, "shared": compiled.metadata.shared}
        return True

    def report(self) -> dict:
        records = [{**r, "launched_by": sorted(r["launched_by"])} for r in self.records.values()]
        spills = [r for r in records if r.get("spill_stores") or r.get("spill_loads")]
        over = [r for r in records if r.get("shared", 0) + r.get("static_shared", 0) > self.gpu.max_shared_bytes]
        compiled_names = {r["kernel"] for r in records}
        return {"gpu": self.gpu.name, "capability": self.gpu.capability, "specialisations": len(records),
                "errors": self.errors, "spills": spills, "over_shared_memory": over,
                "not_covered": sorted(set(_all_triton_kernels()) - compiled_names), "kernels": records}


PROBE_SIZE = 16384


def _define_spill_probe():
    """A kernel that must spill (a computed 16K-element row, 512 values per thread of one warp, stays live across a
    reduction; a loaded row could be loaded again instead): the control proving the gate reads ptxas's spills."""
    import triton
    import triton.language as tl

    @triton.jit
    def _spill_probe(x_ptr, SIZE: tl.constexpr):
        offsets = tl.arange(0, SIZE)
        x = tl.load(x_ptr + offsets)
        y = tl.exp(x) * 3.0 + x
        tl.store(x_ptr + offsets, y / tl.sum(y * y, axis=0))
    return _spill_probe


def _all_triton_kernels() -> list[str]:
    """Names of every @triton.jit kernel (`_..._kernel`) defined in nanojet/kernels/."""
    import triton

    from nanojet.kernels import triton_attention, triton_linear, triton_moe, triton_ops
    names = []
    for module in (triton_ops, triton_attention, triton_moe, triton_linear):
        names += [name for name, value in vars(module).items()
                  if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")]
    return names


def run(capability: int) -> dict:
    """Compile everything `WORKLOADS` launches for the GPU of `capability`; returns the report."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernel gate compiles for a GPU: run it without TRITON_INTERPRET=1")
    if capability not in GPUS:
        raise ValueError(f"no GPU of capability {capability} is described; use one of {sorted(GPUS)}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    with tempfile.TemporaryDirectory(prefix="nanojet-kernel-gate-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # every run compiles from scratch and leaves nothing behind
        return _compile_workloads(GPUS[capability])


def _compile_workloads(gpu: GPU) -> dict:
    from triton import knobs
    from triton.runtime.driver import driver
    gate = Gate(gpu)
    _spill_probe = _define_spill_probe()
    driver.set_active(CompileOnlyDriver(gpu))
    knobs.runtime.jit_cache_hook = gate.hook
    kernels.set_backend("triton")
    try:
        with torch.no_grad():
            for shape in SHAPES:
                for dtype in DTYPES:
                    models = Models(shape, dtype)
                    for name, (launch, counts) in WORKLOADS.items():
                        for count in counts:
                            gate.where = f"{name} {shape} {dtype} n={count}"
                            launch(models, count)
            gate.where = "spill probe"
            _spill_probe[(1,)](torch.empty(PROBE_SIZE, device="meta"), SIZE=PROBE_SIZE, num_warps=1)
    finally:
        kernels.set_backend(None)
        knobs.runtime.jit_cache_hook = None  # the compile-only driver stays: this process owns no GPU
    report = gate.report()
    probe = [r for r in report["kernels"] if r["kernel"].endswith("_spill_probe")]
    if not probe or not probe[0].get("spill_stores"):
        raise RuntimeError("the spill probe compiled without spills: ptxas's -v log was not read, so no spill "
                           "would be seen; check knobs.nvidia.dump_ptxas_log in this Triton version")
    report["kernels"].remove(probe[0])
    report["spills"].remove(probe[0])
    report["specialisations"] -= 1
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90, help="80 (A100) or 90 (H100/H200)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    try:
        report = run(args.capability)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['gpu']}: {report['specialisations']} specialisations, {len(report['errors'])} errors, "
              f"{len(report['spills'])} spilling, {len(report['over_shared_memory'])} over shared memory, "
              f"not covered: {report['not_covered'] or 'none'}")
        for problem in report["errors"] + report["spills"] + report["over_shared_memory"]:
            print(json.dumps(problem))
    failed = report["errors"] or report["spills"] or report["over_shared_memory"] or report["not_covered"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
