"""torch.compile's work on a round must not grow with the target's depth: the target's layers run outside the
round's graph, through one compiled `DecoderLayer.forward_paged` for every layer (`Qwen3.compiled_layer`). Counted,
not timed: the graphs and FX nodes handed to the compiler, and the kernels inductor generates."""
import pytest
import torch

from nanojet.bench.synthetic import build_engine, random_models
from nanojet.engine.request import Request, SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
MIXED_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                 decoder_sparse_step=2)  # dense and sparse layers alternate


def built_graphs(monkeypatch, layers: int, spec: SpeculativeParams | None, **shape) -> list[int]:
    """FX nodes of each graph the first compiled round of a random target with `layers` layers builds (the graphs
    run as traced: inductor is left out, what is counted is what it would be handed)."""
    from torch._inductor import compile_fx
    monkeypatch.setattr(compile_fx, "compile_fx", lambda graph_module, example_inputs: graph_module.forward)
    torch._dynamo.reset()  # graphs of the same code built for another depth would be reused, not counted
    torch.manual_seed(0)
    target, head = random_models(ModelConfig(**TINY, **shape, num_hidden_layers=layers), torch.float32,
                                 torch.device("cpu"))
    engine = build_engine(target, head, max_model_len=64, max_tree_nodes=8, execution="compiled")
    engine.compile_layerwise = True  # the CUDA default; the CPU's is the whole round in one graph
    engine.generate(list(range(1, 9)), SamplingParams(max_new_tokens=2, ignore_eos=True), spec)
    return sorted(engine.runner(spec, sampled=False).graph_sizes)


@pytest.mark.parametrize("shape", [{}, MIXED_MOE], ids=["dense", "mixed-moe"])
@pytest.mark.parametrize("spec", [None, SpeculativeParams(8, 4)], ids=["plain", "budget-8"])
def test_compile_work_does_not_grow_with_depth(monkeypatch, shape, spec):
    """The same graphs, node for node, at 3 and 6 layers: the round's own and one per kind of layer (the first,
    whose residual is None, then dense and MoE). 3, not 2: a 2-layer mixed target has no dense layer after the
    first."""
    assert built_graphs(monkeypatch, 6, spec, **shape) == built_graphs(monkeypatch, 3, spec, **shape)


def test_the_round_graph_breaks_only_around_the_layers(monkeypatch):
    """fullgraph is off (the layers run outside the round's graph), so a graph break elsewhere (a `.item()`, an
    unsupported call) would silently split the round and cost speed: none but the intended one may appear."""
    from torch._dynamo.utils import counters
    counters.clear()
    for spec in (None, SpeculativeParams(8, 4)):
        built_graphs(monkeypatch, 3, spec, **MIXED_MOE)
    reasons = list(counters["graph_break"])
    assert reasons and all("_run_compiled_layers" in reason for reason in reasons), reasons


@pytest.mark.parametrize("shape", [{}, MIXED_MOE], ids=["dense", "mixed-moe"])
def test_layerwise_compiled_rounds_equal_eager(shape):
    """The layerwise compiled round (the CUDA default, run here on the CPU): the same ids as eager rounds, plain and
    speculative, greedy and seeded sampling, alone and two at once, with no recompile after the first round."""
    torch.manual_seed(0)
    target, head = random_models(ModelConfig(**TINY, **shape, num_hidden_layers=4), torch.float32,
                                 torch.device("cpu"))
    engines = {}
    for execution in ("eager", "compiled"):
        engines[execution] = build_engine(target, head, max_model_len=64, max_tree_nodes=8, execution=execution)
        engines[execution].compile_layerwise = True
    prompts = [list(range(1, 9)), list(range(20, 31))]
    for spec in (None, SpeculativeParams(8, 4)):
        for params in (SamplingParams(max_new_tokens=12, ignore_eos=True),
                       SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, seed=3)):
            ids = {}
            for execution, engine in engines.items():
                requests = engine.run([Request(prompt, params, spec) for prompt in prompts])
                ids[execution] = [r.output_ids for r in requests]
                assert all(r.stats.recompiles == 0 for r in requests)
            assert ids["compiled"] == ids["eager"], (spec, params)


def generated_kernels(layers: int) -> int:
    """Kernels inductor generates for the plain compiled round of a random target with `layers` layers: the round's
    graph and each region body (compiled once, however many layers call it)."""
    from torch._inductor import metrics
    torch._dynamo.reset()
    metrics.reset()
    torch.manual_seed(0)
    target, head = random_models(ModelConfig(**TINY, num_hidden_layers=layers), torch.float32, torch.device("cpu"))
    engine = build_engine(target, head, max_model_len=64, max_tree_nodes=8, execution="compiled")
    engine.generate(list(range(1, 9)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    return metrics.generated_kernel_count


def test_inductor_computes_what_the_layers_share_once(monkeypatch):
    """Metadata the graph computes and every layer's pool kernels read (slot mapping, int32 prefix lengths) must be
    computed once, not into a buffer per layer (`kernels.materialized`): per-layer copies were kernels of their own,
    and inductor's scheduler compared every pair of them, so compile time grew with depth squared. (3 layers, not
    2: a region called once is inlined into the round's graph, which changes the count.)"""
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # a cached graph generates no kernels
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    assert generated_kernels(6) == generated_kernels(3)
