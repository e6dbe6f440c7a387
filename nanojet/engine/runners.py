"""Three ways to run a `StaticRound`: eagerly (the CPU default and --enforce-eager on CUDA), torch.compile'd
(--compile; the CPU fast path) and as a CUDA graph (the CUDA default, around either of the other two). Each counts
the graphs it builds, so a recompile in steady state is visible (GenerationStats.recompiles) instead of silently
costing a fallback to slower code."""
import contextlib

import torch

from nanojet.engine.round import StaticRound


class RoundRunner:
    def __init__(self, static_round: StaticRound):
        self.round = static_round
        self.compiles = 0  # graphs built: torch.compile compilations or CUDA graph captures
        self.calls = 0

    def __call__(self, table: torch.Tensor) -> torch.Tensor:
        """Run one round with block table `table`; returns the step's summary tensor (read it before the next call)."""
        self.calls += 1
        return self._run(table)

    def _run(self, table: torch.Tensor) -> torch.Tensor:
        return self.round.step(*self.round.inputs(table))


class EagerRunner(RoundRunner):
    """The round without compilation: the same ops the compiled and graphed runners build graphs of."""


class CompiledRunner(RoundRunner):
    """torch.compile (inductor) over the round. Whole, one graph (fullgraph: a graph break is an error, not a
    silent split), or `layerwise` (the CUDA default, inside a CUDA graph): the round's own work (draft head, tree,
    choice, acceptance, commit) as the graphs of `step`, and the target's layers through one compiled
    `DecoderLayer.forward_paged` called layer by layer from outside them (`Qwen3.compiled_layer`), so a round
    compiles in the same time at any depth; that call is the one place the round's graph breaks
    (tests/test_compile_depth.py fails on any other). Every input keeps its shape from round to round, so what the
    first call builds serves the whole generation; `compiles` counts the calls that built anything."""

    def __init__(self, static_round: StaticRound, layerwise: bool = False):
        super().__init__(static_round)
        # Every runner compiles the same code objects (StaticRound.step, the decoder layer), and dynamo's limit on
        # graphs per code object (8) would silently fall back to eager once a process has seen enough round
        # shapes: raise it, and make hitting it an error.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 256)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
        config.fail_on_recompile_limit_hit = True
        if layerwise:
            static_round.layer_step = static_round.target.compiled_layer(self._backend)
        self._step = torch.compile(static_round.step, fullgraph=not layerwise, dynamic=False, backend=self._backend)
        self.built: list[int] = []  # FX nodes of each graph the running call builds (`fx_node_count`)
        self.graph_sizes: list[int] = []  # the same, of the last call that built any

    @property
    def fx_nodes(self) -> int:
        """FX nodes the compiler was handed for this round shape (scripts/compile_time.py)."""
        return sum(self.graph_sizes)

    def _backend(self, graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        self.built.append(fx_node_count(graph_module))
        return compile_fx(graph_module, example_inputs)

    def _run(self, table: torch.Tensor) -> torch.Tensor:
        self.built = []
        output = self._step(*self.round.inputs(table))
        if self.built:
            self.compiles += 1
            self.graph_sizes = self.built
        return output


class GraphedRunner(RoundRunner):
    """The whole round as one CUDA graph around another runner's step (compiled or eager). Captured on first use
    with the live sequence's buffers, so the two warmup launches (which compile and autotune) write only that
    sequence's scratch slots, never another page; anchor and length are restored after them. The graph remembers
    the pool's and the table's addresses: if either was reallocated since, the graph is captured again rather
    than replayed onto freed memory."""

    def __init__(self, inner: RoundRunner, memory_pool):
        super().__init__(inner.round)
        self.inner = inner
        self.memory_pool = memory_pool  # shared by every graph of an engine: rounds never run concurrently
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_for: tuple | None = None
        self.summary: torch.Tensor | None = None

    def _signature(self, table: torch.Tensor) -> tuple:
        pool = self.round.kv.pool
        return pool.data_ptr(), tuple(pool.shape), pool.dtype, table.data_ptr(), tuple(table.shape)

    def _capture(self, table: torch.Tensor) -> None:
        r = self.round
        saved = r.anchor.clone(), r.length.clone()
        compiles = self.inner.compiles
        with self._warmup_stream():
            for _ in range(2):
                self.inner._run(table)
                r.anchor.copy_(saved[0])
                r.length.copy_(saved[1])
        self.graph = None  # free the old graph before capturing its replacement
        self.graph, self.summary = self._record(lambda: self.inner._run(table))
        self.captured_for = self._signature(table)
        self.compiles += 1 + self.inner.compiles - compiles

    @contextlib.contextmanager
    def _warmup_stream(self):
        """Warm up on a side stream, as CUDA graph capture requires."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, step) -> tuple:
        """Capture `step()` (recorded, not run) -> (graph, its output tensor, rewritten by each replay)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            output = step()
        return graph, output

    def _run(self, table: torch.Tensor) -> torch.Tensor:
        if self.graph is None or self.captured_for != self._signature(table):
            self._capture(table)
        self.graph.replay()
        return self.summary


def fx_node_count(graph_module: torch.fx.GraphModule) -> int:
    """The FX nodes of a graph and of every distinct subgraph it calls (a nested compile region's body once,
    however many layers call it): the size of what the compiler works on (tests/test_compile_depth.py)."""
    seen, pending, total = set(), [graph_module], 0
    while pending:
        module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        total += len(module.graph.nodes)
        pending += [child for child in module.children() if isinstance(child, torch.fx.GraphModule)]
    return total
