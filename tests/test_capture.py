"""The round refuses nothing a CUDA graph capture refuses: `StaticRound.step` runs on meta tensors under
`capture_check` (tests/capture_check.py) for plain decoding, small and beam-search trees, greedy and sampled,
with a logit bias and log-probs, batched, dense and MoE targets, eagerly and as the graph torch.compile traces; and
the check catches the faults it exists for (a Python scalar written into a device tensor, a host tensor handed to a kernel, a hidden read)."""
import pytest
import torch
from capture_check import CaptureViolation, capture_check
from conftest import random_head, write_hf_model, write_hf_moe_model

import nanojet.engine.round as round_module
from nanojet import kernels
from nanojet.engine.kv_cache import KVCache
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.round import StaticRound, pages_per_sequence
from nanojet.kernels.reference import unpack_visibility
from nanojet.llm import load_target
from nanojet.model.config import ModelConfig

META = torch.device("meta")
# (budget, width): 8 and 64 nodes come from the candidate table, 128 at width 8 from the beam search.
SHAPES = [None, (8, 4), (64, 4), (128, 8)]


@pytest.fixture(scope="module", params=["dense", "moe"])
def meta_models(request, tmp_path_factory):
    """A target and a head with every weight on meta (no data: only what ops are run matters)."""
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "dense":
        write_hf_model(directory, seed=1, head_dim=24)
    else:
        write_hf_moe_model(directory, seed=5)
    config = ModelConfig.from_dir(directory)
    return load_target(directory, torch.float32, META), random_head(config, seed=2).to(META)


def meta_round(target, head, shape, sampled: bool, num_sequences: int, biased: bool = False,
               logprobs: int | None = None) -> StaticRound:
    """A round over a meta KV pool, its persistent buffers on meta too."""
    config, page_size = target.config, 4
    pages = pages_per_sequence(256, 512, head.config.block_size, page_size)
    kv = KVCache(config.num_hidden_layers + head.config.layers.num_hidden_layers, config.num_key_value_heads,
                 config.head_dim, pages * num_sequences, page_size, pages, torch.float32, META)
    spec = None if shape is None else SpeculativeParams(*shape)
    return StaticRound(target, head, kv, spec, sampled, num_sequences, biased, logprobs)


def run_step(step, r: StaticRound) -> torch.Tensor:
    return step(*r.inputs(r.block_table))


@pytest.mark.parametrize("num_sequences", [1, 4])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_round_passes_the_capture_check(meta_models, shape, sampled, num_sequences):
    r = meta_round(*meta_models, shape, sampled, num_sequences)
    with capture_check():
        outcome = run_step(r.step, r)
    path_len = 1 if shape is None else r.path_len
    assert outcome.device == META and outcome.shape == (num_sequences, 1 + 2 * path_len)


@pytest.mark.parametrize("num_sequences", [1, 4])
@pytest.mark.parametrize("logprobs", [0, 5])
@pytest.mark.parametrize("shape", [None, (8, 4), (128, 8)], ids=str)
def test_a_biased_round_with_logprobs_passes_the_capture_check(meta_models, shape, logprobs, num_sequences):
    """The bias added to the target's logits and the log-prob words gathered along the path and packed into the
    outcome: no host data, no read."""
    r = meta_round(*meta_models, shape, True, num_sequences, biased=True, logprobs=logprobs)
    with capture_check():
        outcome = run_step(r.step, r)
    path_len = 1 if shape is None else r.path_len
    assert outcome.device == META and outcome.dtype == torch.int64
    assert outcome.shape == (num_sequences, 1 + 2 * path_len + path_len * (1 + 2 * logprobs)) == (
        num_sequences, r.outcome_width)


def checked_backend(graphs: list):
    """A torch.compile backend that runs the traced graph once under the capture check, then runs it as is."""
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        with capture_check():
            graph_module(*example_inputs)
        return graph_module.forward
    return backend


def compiled_step(r: StaticRound, backend):
    """`r.step` compiled as a layerwise CompiledRunner compiles it (the CUDA default): the target's layers apart,
    through one compiled `DecoderLayer.forward_paged` (`Qwen3.compiled_layer`)."""
    r.layer_step = r.target.compiled_layer(backend)
    return torch.compile(r.step, dynamic=False, backend=backend)


@pytest.mark.parametrize("options", [(False, None), (True, 3)], ids=["plain", "biased-logprobs"])
@pytest.mark.parametrize("shape", [None, (8, 4)], ids=str)
def test_the_compiled_round_passes_the_capture_check(meta_models, shape, options):
    """The graphs dynamo traces (the round's, broken only around the target's layers, and the layer's) hold no host
    tensor and no host read either; the pool kernels are in them as their custom ops."""
    torch._dynamo.reset()  # graphs built for another test's round would be reused, not checked
    r = meta_round(*meta_models, shape, True, 4, *options)
    graphs = []
    assert run_step(compiled_step(r, checked_backend(graphs)), r).device == META
    called = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert {"nanojet.store_kv", "nanojet.paged_attention"} <= called
    layer_graphs = [graph for graph in graphs if "nanojet.paged_attention" in str(graph.code)]
    assert len(layer_graphs) >= 2  # the layers' (the first, then the rest) and the draft head's block
    torch._dynamo.reset()


# --- planted faults: each must be refused, with what was seen and where -----------------------------------------

@pytest.fixture(scope="module")
def dense_meta_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense")
    write_hf_model(directory, seed=1, head_dim=24)
    return load_target(directory, torch.float32, META), random_head(ModelConfig.from_dir(directory), seed=2).to(META)


def accept_before_issue_26(tree, target_tokens):
    """`tree.accept` as it was when capture failed on an H200: `matches[0] = True`."""
    num_nodes = tree.tokens.numel()
    node_index = torch.arange(num_nodes, device=tree.tokens.device)
    matches = tree.tokens == target_tokens[tree.parents.clamp(min=0)]
    matches[0] = True
    ancestors = unpack_visibility(tree.visibility, num_nodes)
    accepted = (matches[None, :] | ~ancestors).all(dim=-1)
    last = torch.where(accepted, node_index, 0).max()
    path_nodes = torch.minimum(torch.where(accepted, node_index, num_nodes).sort().values, last)
    return path_nodes, accepted.sum()


@pytest.mark.parametrize("num_sequences", [1, 4])  # called directly, and vmapped
def test_a_python_scalar_written_into_a_device_tensor_is_refused(dense_meta_models, num_sequences, monkeypatch):
    monkeypatch.setattr(round_module, "accept", accept_before_issue_26)
    r = meta_round(*dense_meta_models, (8, 4), False, num_sequences)
    with pytest.raises(CaptureViolation, match=r"copy_.*writes a Python scalar.*matches\[0\] = True"), capture_check():
        run_step(r.step, r)


def test_a_python_scalar_written_in_the_compiled_round_is_refused(dense_meta_models, monkeypatch):
    torch._dynamo.reset()  # the graphs other tests compiled of `step` count against dynamo's limit per code object
    monkeypatch.setattr(round_module, "accept", accept_before_issue_26)
    r = meta_round(*dense_meta_models, (8, 4), False, 4)
    step = compiled_step(r, checked_backend([]))
    with pytest.raises(Exception, match=r"writes a Python scalar"):
        run_step(step, r)
    torch._dynamo.reset()


def test_a_host_tensor_inside_a_layer_compile_region_is_refused(dense_meta_models, monkeypatch):
    """The compiled layer calls its parts as nested compile regions (invoke_subgraph): the check looks inside them
    too."""
    torch._dynamo.reset()
    silu_and_mul = kernels.silu_and_mul  # traced inside the MLP's region
    monkeypatch.setattr(kernels, "silu_and_mul", lambda gate_up: silu_and_mul(gate_up) + torch.zeros(()))
    r = meta_round(*dense_meta_models, None, False, 1)
    step = compiled_step(r, checked_backend([]))
    with pytest.raises(Exception, match=r"makes a CPU tensor"):
        run_step(step, r)
    torch._dynamo.reset()


def test_a_host_tensor_handed_to_a_kernel_is_refused(dense_meta_models):
    """A slot mapping left on the host (as a stale host buffer would be), reaching the launch untouched by any
    other op: the launch itself is refused."""
    r = meta_round(*dense_meta_models, (8, 4), False, 1)
    host_slots = torch.zeros(r.path_len, dtype=torch.int64)
    with pytest.raises(CaptureViolation, match=r"nanojet\.move_kv.* is given a CPU tensor"), capture_check():
        launch = kernels.move_kv  # the custom op the check routes the kernel to
        kernels.move_kv = lambda pool, src, dst: launch(pool, src, host_slots)
        try:
            run_step(r.step, r)
        finally:
            kernels.move_kv = launch
    assert kernels.move_kv.__module__ == "nanojet.kernels"  # the check put the kernel back


def test_a_copy_to_the_host_is_refused(dense_meta_models, monkeypatch):
    r = meta_round(*dense_meta_models, None, False, 1)
    original = StaticRound._slots
    monkeypatch.setattr(StaticRound, "_slots", lambda self, table, logical: original(self, table, logical).cpu())
    with pytest.raises(CaptureViolation, match=r"_to_copy.*makes a CPU tensor"), capture_check():
        run_step(r.step, r)


@pytest.mark.parametrize("read", ["item", "bool", "tolist"])
def test_a_hidden_read_of_a_device_value_is_refused(dense_meta_models, read, monkeypatch):
    r = meta_round(*dense_meta_models, (8, 4), True, 4)
    original = StaticRound._choose

    def choose_and_peek(self, logits, *args):
        choices = original(self, logits, *args)
        if read == "item":
            choices.max().item()
        elif read == "bool":
            bool((choices < 0).any())
        else:
            choices.tolist()
        return choices
    monkeypatch.setattr(StaticRound, "_choose", choose_and_peek)
    with pytest.raises(CaptureViolation, match=r"reads a device value on the host.*choose_and_peek"), capture_check():
        run_step(r.step, r)


def test_a_tensor_built_from_host_data_and_a_data_dependent_shape_are_refused():
    device_tensor = torch.zeros(4, device=META)
    with pytest.raises(CaptureViolation, match=r"torch\.tensor\(\) builds a tensor from host data"), capture_check():
        torch.tensor([1, 2, 3], device=META)
    with pytest.raises(CaptureViolation, match=r"nonzero.*reads device values"), capture_check():
        device_tensor.nonzero()
    with pytest.raises(CaptureViolation, match=r"index.*reads device values"), capture_check():
        device_tensor[device_tensor > 0]  # a bool mask index runs nonzero
    with capture_check():  # what the round does instead: static shapes, scalars as kernel arguments
        torch.where(device_tensor > 0, device_tensor, 1.0)[torch.arange(2, device=META)].add_(1)


def test_the_triton_moe_routing_glue_passes_the_capture_check():
    """The torch ops around the Triton MoE kernels (grouping pairs by expert) are capturable too: static shapes,
    no count read on the host (the launches themselves cannot run on meta)."""
    pytest.importorskip("triton")
    from nanojet.kernels.triton_moe import sort_pairs_by_expert
    with capture_check():
        sorted_pairs, _ = sort_pairs_by_expert(torch.zeros(12, 2, dtype=torch.int64, device=META), 8, 16)
    assert sorted_pairs.device == META and sorted_pairs.numel() % 16 == 0
