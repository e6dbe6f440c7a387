"""torch.compile's work on a round must not grow with the target's depth: each decoder layer's regions are traced
and compiled once for the whole model (`compile_once` in nanojet/model/qwen3.py). Counted, not timed: the FX nodes
handed to the compiler, a region's body counted once (`fx_node_count`), and the distinct region bodies."""
import pytest
import torch

from nanojet.bench.synthetic import build_engine, random_models
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
MIXED_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                 decoder_sparse_step=2)  # dense and sparse layers alternate
# FX nodes each further layer may add to the round's graph: its region calls and their outputs, its pool slice and
# the two pool kernels. A layer traced whole adds about 60.
GLUE_PER_LAYER = 24


def traced_graph(monkeypatch, layers: int, spec: SpeculativeParams | None, **shape) -> tuple[int, int]:
    """(FX nodes, distinct region bodies) of the compiled round of a random target with `layers` layers; the graph
    runs as traced (inductor is left out: what is counted is what it would be handed)."""
    from torch._inductor import compile_fx
    bodies = []

    def traced_only(graph_module, example_inputs):
        bodies.append(sum(isinstance(m, torch.fx.GraphModule) for m in graph_module.children()))
        return graph_module.forward
    monkeypatch.setattr(compile_fx, "compile_fx", traced_only)
    torch.manual_seed(0)
    target, head = random_models(ModelConfig(**TINY, **shape, num_hidden_layers=layers), torch.float32,
                                 torch.device("cpu"))
    engine = build_engine(target, head, max_model_len=64, max_tree_nodes=8, execution="compiled")
    engine.generate(list(range(1, 9)), SamplingParams(max_new_tokens=2, ignore_eos=True), spec)
    return engine.runner(spec, sampled=False).fx_nodes, bodies[-1]


@pytest.mark.parametrize("shape", [{}, MIXED_MOE], ids=["dense", "mixed-moe"])
@pytest.mark.parametrize("spec", [None, SpeculativeParams(8, 4)], ids=["plain", "budget-8"])
def test_compile_work_does_not_grow_with_depth(monkeypatch, shape, spec):
    (nodes_2, bodies_2), (nodes_6, bodies_6) = (traced_graph(monkeypatch, n, spec, **shape) for n in (2, 6))
    assert bodies_6 == bodies_2, "a deeper target traced new region bodies: layers are compiled one by one"
    assert (nodes_6 - nodes_2) / 4 <= GLUE_PER_LAYER, (nodes_2, nodes_6)


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
