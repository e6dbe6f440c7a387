"""Compiled execution (docs/architecture.md): the round compiled with torch.compile on CPU, CUDA graphs on a GPU.

Every mode must give the token ids of eager execution (greedy and seeded sampling), across tree buckets, and a
steady-state round must not compile again. (The round itself is tested against a dense reference in
test_round.py.)"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_engine, random_head

from nanojet import kernels
from nanojet.bench.device_stats import host_syncs_per_round, syncs_beyond_outcome_read
from nanojet.engine.engine import Engine
from nanojet.engine.kv_cache import KVCache
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.engine.runners import EagerRunner, GraphedRunner
from nanojet.engine.sampling import SamplingParams
from nanojet.llm import DEFAULT_MODEL
from nanojet.model.config import ModelConfig

GREEDY = SamplingParams(max_new_tokens=30, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=30, ignore_eos=True)
PROMPT = [7, 3, 250, 19, 19, 4, 88, 1, 64, 2, 33]  # 11 tokens: crosses KV pages of 4
# (budget, width, depth): None is plain decoding; 3 nodes pad to bucket 4, 50 to 64; a depth limit shortens paths.
SHAPES = [None, (3, 2, None), (8, 4, None), (50, 4, None), (16, 2, 3)]


def spec_of(shape):
    return None if shape is None else SpeculativeParams(*shape)


@pytest.fixture(scope="module")
def head(hf_model_dir):
    directory, _ = hf_model_dir
    return random_head(ModelConfig.from_dir(directory), seed=2)


@pytest.fixture(scope="module")
def eager(hf_model_dir, head):
    return make_engine(hf_model_dir[0], page_size=4, head=head)


def test_compiled_equals_eager_without_steady_state_recompiles(hf_model_dir, head, eager):
    from torch._inductor.utils import run_and_get_code
    compiled = make_engine(hf_model_dir[0], page_size=4, head=head, execution="compiled")
    runs = [(GREEDY, None), (GREEDY, (8, 4, None)), (GREEDY, (32, 4, None)), (GREEDY, (8, 4, None)),
            (SAMPLED, (8, 4, None)), (SamplingParams(**{**SAMPLED.__dict__, "seed": 12}), (8, 4, None))]
    seen = set()
    for index, (params, shape) in enumerate(runs):
        expected = eager.generate(PROMPT, params, spec_of(shape))
        if index == 1:  # look at the code of one compiled round: no kernel may copy the KV pool
            got, code = run_and_get_code(compiled.generate, PROMPT, params, spec_of(shape))
            pool = compiled.kv.pool
            for size in (pool.numel(), pool[0, 0].numel()):
                assert f"{size}L" not in "".join(code), "the compiled round copies the KV pool"
        else:
            got = compiled.generate(PROMPT, params, spec_of(shape))
        assert got.token_ids == expected.token_ids, (params, shape)
        assert got.stats.accept_hist == expected.stats.accept_hist
        key = (shape, params.temperature)  # the seed lives in a tensor: a new seed is no new graph
        assert got.stats.compiles == (0 if key in seen else 1), (params, shape)
        assert got.stats.recompiles == 0 and got.stats.rounds > 5
        assert got.stats.compile_s > 0 if key not in seen else got.stats.compile_s == 0
        seen.add(key)
    assert len(compiled._runners) == 4


def test_a_compiled_round_with_a_bias_and_logprobs_equals_eager(hf_model_dir, head, eager):
    """The biased choice and the log-prob words bit-cast into the outcome, compiled by inductor: the same ids as
    eager execution, and its log-probs to fp32 rounding (inductor fuses the logsumexp its own way), in one graph."""
    compiled = make_engine(hf_model_dir[0], page_size=4, head=head, execution="compiled")
    params = SamplingParams(**{**SAMPLED.__dict__, "logprobs": 2, "logit_bias": {5: 1.5, 193: -100.0}})
    expected = eager.generate(PROMPT, params, spec_of((8, 4, None)))
    got = compiled.generate(PROMPT, params, spec_of((8, 4, None)))
    assert got.token_ids == expected.token_ids
    for a, b in zip(got.logprobs, expected.logprobs, strict=True):
        assert (a.token_id, [i for i, _ in a.top]) == (b.token_id, [i for i, _ in b.top])
        assert [a.logprob, *(v for _, v in a.top)] == pytest.approx([b.logprob, *(v for _, v in b.top)], abs=1e-5)
    assert got.stats.compiles == 1 and got.stats.recompiles == 0


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="the embedded model is not built")
def test_run_py_compile_on_the_embedded_model():
    """A trained head accepts long paths, so the fixed-size commit moves real rows: compiled == eager through the
    CLI, acceptance included, and compile time is reported apart."""
    snippet = 'def read_config(path):\n    """Return the parsed configuration file."""\n    with open(path) as f:\n'
    command = [sys.executable, str(ROOT / "run.py"), "--prompt", snippet, "--max-new-tokens", "40",
               "--budget", "8", "--json", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [json.loads(subprocess.run(command + flags, capture_output=True, text=True, check=True, cwd=ROOT,
                                      env=environment).stdout) for flags in ([], ["--compile"])]
    eager_run, compiled_run = runs
    assert compiled_run["token_ids"] == eager_run["token_ids"]
    assert compiled_run["accept_hist"] == eager_run["accept_hist"]
    assert max(int(k) for k in compiled_run["accept_hist"]) >= 4
    assert compiled_run["compiled"] and compiled_run["compiles"] == 1 and compiled_run["recompiles"] == 0
    assert compiled_run["compile_s"] > 0 and not eager_run["compiled"] and eager_run["compile_s"] == 0


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "whole"])
def test_compiled_round_on_triton_kernels(hf_model_dir, head, layerwise):
    """The CUDA configuration of torch.compile (the Triton kernels as opaque custom ops inside the compiled
    graphs, the target's layers compiled apart: layerwise), run by the interpreter on CPU tensors; and the whole
    round in one graph on the same kernels."""
    kernels.set_backend("triton")
    try:
        compiled = make_engine(hf_model_dir[0], page_size=4, head=head, execution="compiled")
        compiled.compile_layerwise = layerwise
        params = SamplingParams(**{**SAMPLED.__dict__, "max_new_tokens": 8})
        got = compiled.generate(PROMPT, params, SpeculativeParams(8, 2))
    finally:
        kernels.set_backend(None)
    expected = make_engine(hf_model_dir[0], page_size=4, head=head).generate(PROMPT, params, SpeculativeParams(8, 2))
    assert got.token_ids == expected.token_ids and got.stats.compiles == 1


def test_static_round_runs_out_of_pool_with_a_clear_error(eager):
    """A generation whose rounds' scratch (the padded tree) cannot fit the pool is refused at admission with the
    usual one-line error, before any page is taken."""
    config = eager.target.config
    layers = config.num_hidden_layers + eager.head.config.layers.num_hidden_layers
    small = KVCache(layers, config.num_key_value_heads, config.head_dim, num_pages=8, kv_page_size=4,
                    max_pages_per_sequence=64, dtype=torch.float32, device=torch.device("cpu"))
    engine = Engine(eager.target, small, 200, [], eager.head, execution="eager")
    with pytest.raises(ValueError, match="need 30 KV pages of 4 tokens, but the KV pool has 8"):
        engine.generate(PROMPT, SamplingParams(max_new_tokens=100, ignore_eos=True), SpeculativeParams(8, 4))
    assert sorted(small.free_pages) == list(range(8))


def test_bad_execution_modes(eager):
    with pytest.raises(ValueError, match="execution must be one of"):
        Engine(eager.target, eager.kv, 64, [], eager.head, execution="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            Engine(eager.target, eager.kv, 64, [], eager.head, execution="graphed")


def test_compiling_on_cpu_without_a_cpp_compiler_is_a_clear_error(eager, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        Engine(eager.target, eager.kv, 64, [], eager.head, execution="compiled")


def test_cuda_without_a_c_compiler_is_a_clear_error(monkeypatch, tmp_path):
    """Triton builds a C launcher per kernel signature on every CUDA host, whatever the execution mode."""
    from nanojet.engine.toolchain import check_toolchain
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    for execution in ("eager", "graphed"):
        with pytest.raises(RuntimeError, match="need a C compiler .*install one"):
            check_toolchain(torch.device("cuda"), execution)
    check_toolchain(torch.device("cpu"), "eager")  # the CPU reference path builds nothing


class RecordedGraph:
    """A CUDA graph's contract, on CPU: recording does not run the step; each replay runs it and rewrites the
    captured output tensor in place."""

    def __init__(self, step, output: torch.Tensor):
        self.step, self.output = step, output

    def replay(self) -> None:
        self.output.copy_(self.step())


class CPUGraphedRunner(GraphedRunner):
    """GraphedRunner's bookkeeping (warmup and restore, capture, replay, re-capture) with CPU stand-ins for the
    CUDA stream and graph."""

    def _warmup_stream(self):
        return contextlib.nullcontext()

    def _record(self, step):
        output = torch.full((self.round.num_sequences, self.round.outcome_width), -7, dtype=torch.int64)
        return RecordedGraph(step, output), output


def install_cpu_graphs(engine: Engine, spec, params) -> None:
    static_round = StaticRound(engine.target, engine.head, engine.kv, spec, not params.greedy)
    engine._runners[Engine.runner_key(spec, not params.greedy)] = CPUGraphedRunner(EagerRunner(static_round), None)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "top-p"])
def test_graph_bookkeeping_on_cpu_stand_ins(hf_model_dir, head, eager, params):
    """The warmup launches really run the round, so anchor and length must be restored after them; the output
    is read from the captured tensor; a moved pool makes the runner capture again (counted as a recompile)."""
    engine = make_engine(hf_model_dir[0], page_size=4, head=head, execution="eager")
    for shape in SHAPES:
        install_cpu_graphs(engine, spec_of(shape), params)
        expected = eager.generate(PROMPT, params, spec_of(shape))
        got = engine.generate(PROMPT, params, spec_of(shape))
        assert got.token_ids == expected.token_ids and got.stats.accept_hist == expected.stats.accept_hist, shape
        assert got.stats.compiles == 1 and got.stats.recompiles == 0
    spec = spec_of((8, 4, None))
    assert engine.generate(PROMPT, params, spec).stats.compiles == 0  # replayed, not captured again
    engine.kv.pool = engine.kv.pool.clone()  # reallocated (as a grown pool would be)
    moved = engine.generate(PROMPT, params, spec)
    assert moved.token_ids == eager.generate(PROMPT, params, spec).token_ids
    assert moved.stats.compiles == 1 and moved.stats.recompiles == 1


@pytest.mark.gpu
@pytest.mark.parametrize("execution", ["graphed", "compiled"])
def test_cuda_graphs_equal_eager(hf_model_dir, head, execution):
    """fp32 on the GPU: CUDA-graphed rounds (with and without torch.compile inside) give the eager ids."""
    cuda_head = random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2).cuda()
    reference = make_engine(hf_model_dir[0], page_size=4, head=cuda_head, device="cuda")
    graphed = make_engine(hf_model_dir[0], page_size=4, head=cuda_head, device="cuda", execution=execution)
    for params in (GREEDY, SAMPLED):
        for shape in SHAPES:
            expected = reference.generate(PROMPT, params, spec_of(shape)).token_ids
            got = graphed.generate(PROMPT, params, spec_of(shape))
            assert got.token_ids == expected, (execution, params, shape)
            assert got.stats.recompiles == 0
    again = graphed.generate(PROMPT, GREEDY, spec_of((8, 4, None)))
    assert again.stats.compiles == 0 and again.token_ids == reference.generate(PROMPT, GREEDY,
                                                                               spec_of((8, 4, None))).token_ids


@pytest.mark.gpu
def test_cuda_graph_is_recaptured_after_the_pool_moves(hf_model_dir):
    """A graph holds the pool's address: after the pool is reallocated (grown), replaying it would read and write
    freed memory. The runner must notice and capture again, and the ids must stay right."""
    cuda_head = random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2).cuda()
    reference = make_engine(hf_model_dir[0], page_size=4, head=cuda_head, device="cuda")
    graphed = make_engine(hf_model_dir[0], page_size=4, head=cuda_head, device="cuda", execution="graphed")
    spec = SpeculativeParams(8, 4)
    expected = reference.generate(PROMPT, SAMPLED, spec).token_ids
    assert graphed.generate(PROMPT, SAMPLED, spec).token_ids == expected
    old = graphed.kv.pool
    grown = torch.zeros((old.shape[0], old.shape[1], old.shape[2] * 2, *old.shape[3:]), dtype=old.dtype,
                        device=old.device)
    grown[:, :, :old.shape[2]] = old
    graphed.kv.pool = grown
    graphed.kv.free_pages += list(range(grown.shape[2] - 1, old.shape[2] - 1, -1))
    del old
    torch.cuda.empty_cache()
    after = graphed.generate(PROMPT, SAMPLED, spec)
    assert after.token_ids == expected
    assert after.stats.compiles == 1 and after.stats.recompiles == 1  # captured again, and counted as such


@pytest.mark.gpu
@pytest.mark.parametrize("execution", ["eager", "graphed", "compiled"])
def test_one_host_sync_per_graphed_round(hf_model_dir, execution):
    """The host waits on the device once per round: the read of the accepted count and tokens."""
    cuda_head = random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2).cuda()
    engine = make_engine(hf_model_dir[0], page_size=4, head=cuda_head, device="cuda", execution=execution)
    for spec in (None, SpeculativeParams(8, 4)):
        extra = syncs_beyond_outcome_read(engine, PROMPT, GREEDY, spec)
        assert not extra, f"{spec}: the round waits on the device beyond its outcome read:\n" + "\n".join(extra)
        assert host_syncs_per_round(engine, PROMPT, GREEDY, spec) == pytest.approx(1.0)


def test_cuda_graphs_are_the_default_on_cuda_only():
    from nanojet.engine.engine import default_execution
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_execution(cuda) == "graphed" and default_execution(cuda, enforce_eager=True) == "eager"
    assert default_execution(cuda, compile=True) == "compiled"  # torch.compile inside the graphs
    assert default_execution(cpu) == "eager" and default_execution(cpu, compile=True) == "compiled"


@pytest.mark.gpu
def test_llm_captures_graphs_by_default_on_cuda(hf_model_dir, tmp_path):
    from nanojet.llm import LLM
    random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2).save(tmp_path / "head")
    graphed = LLM(hf_model_dir[0], head=tmp_path / "head", device="cuda", dtype="float32")
    eager = LLM(hf_model_dir[0], head=tmp_path / "head", device="cuda", dtype="float32", enforce_eager=True)
    assert graphed.engine.execution == "graphed" and eager.engine.execution == "eager"
    for spec in (None, SpeculativeParams(8, 4)):
        got = graphed.generate(PROMPT, SAMPLED, spec)
        assert got.token_ids == eager.generate(PROMPT, SAMPLED, spec).token_ids and got.stats.compiles == 1


def test_compiled_batched_rounds_equal_eager(hf_model_dir, head, eager):
    """Batched rounds compile once per batch-size bucket (inert rows included) and give the eager ids."""
    from nanojet.engine.request import Request
    from nanojet.engine.scheduler import Scheduler
    compiled = make_engine(hf_model_dir[0], page_size=4, head=head, execution="compiled", num_pages=200)
    # The greedy request never runs alone, so only sampled rounds are built (a greedy row inside them).
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True), SAMPLED,
              SamplingParams(temperature=1.1, top_k=30, seed=4, max_new_tokens=20, ignore_eos=True)]
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
    expected = [eager.generate(p, q, spec_of((8, 4, None))).token_ids for p, q in zip(prompts, params)]
    compiled.scheduler = Scheduler(compiled.kv, max_num_seqs=2)
    requests = compiled.run([Request(p, q, spec_of((8, 4, None))) for p, q in zip(prompts, params)])
    assert [r.output_ids for r in requests] == expected
    assert sorted(compiled._runners) == [((8, 4, None), True, 1, False, None),
                                         ((8, 4, None), True, 2, False, None)]  # both buckets ran
    assert all(r.compiles == 1 for r in compiled._runners.values())  # one graph each, no recompile


def test_graphed_batched_rounds_on_cpu_stand_ins(hf_model_dir, head, eager, monkeypatch):
    """Batched rounds as (stand-in) CUDA graphs: captured once per batch bucket with live and inert rows, warmed
    up and restored, replayed while sequences join and leave; every sequence gets its eager ids alone."""
    from nanojet.engine.request import Request
    from nanojet.engine.scheduler import Scheduler
    engine = make_engine(hf_model_dir[0], page_size=4, head=head, num_pages=200)
    build = Engine.runner

    def graphed_runner(self, spec, sampled, num_sequences=1, *options):
        key = Engine.runner_key(spec, sampled, num_sequences, *options)
        if key not in self._runners:
            static_round = StaticRound(self.target, self.head, self.kv, spec, sampled, num_sequences, *options)
            self._runners[key] = CPUGraphedRunner(EagerRunner(static_round), None)
        return build(self, spec, sampled, num_sequences, *options)

    monkeypatch.setattr(Engine, "runner", graphed_runner)
    params = [SAMPLED, SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.1, top_k=30, seed=4, max_new_tokens=20, ignore_eos=True), GREEDY]
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:], PROMPT[1:9]]
    spec = spec_of((8, 4, None))
    expected = [eager.generate(p, q, spec).token_ids for p, q in zip(prompts, params)]
    engine.scheduler = Scheduler(engine.kv, max_num_seqs=4)
    requests = engine.run([Request(p, q, spec) for p, q in zip(prompts, params)])
    assert [r.output_ids for r in requests] == expected
    assert {key[2] for key in engine._runners} >= {1, 4} and all(r.compiles == 1 for r in engine._runners.values())


def test_compiled_rounds_follow_sampling_changes(hf_model_dir, head, monkeypatch):
    """One compiled engine, consecutive generations that change top_p, then top_k and temperature: each equals
    the dense reference, with drafts accepted to full depth (every compiled graph shares one code object, so a
    graph reused for the wrong parameters would show here)."""
    from test_round import GRAPH_KEY_RUNS, check_graph_keys
    compiled = make_engine(hf_model_dir[0], page_size=4, head=head, execution="compiled")
    check_graph_keys(compiled, monkeypatch, [GRAPH_KEY_RUNS[i] for i in (0, 1, 3)])
