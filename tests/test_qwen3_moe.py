"""Qwen3-MoE targets: transformers parity (logits at prefill and every decode step, greedy generate), checkpoint
formats, config validation, and lossless speculation (eager and compiled) on a MoE target."""

import pytest
import torch
from conftest import make_engine, random_head, write_hf_moe_model
from test_qwen3 import nanojet_logits_stepwise

from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig
from nanojet.model.qwen3 import SparseMoE

CONFIGS = {
    "top2-of-8": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "top4-of-16-one-dense-layer": dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                                       mlp_only_layers=[1]),
    "unnormalised-sparse-step-2": dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
                                       decoder_sparse_step=2, num_hidden_layers=4, tie_word_embeddings=True),
}
PROMPT = [7, 3, 250, 19, 19, 4, 88, 1, 64, 2, 33]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe")
    return directory, write_hf_moe_model(directory, seed=5, **CONFIGS["top4-of-16-one-dense-layer"])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_prefill_and_decode(tmp_path, name):
    hf = write_hf_moe_model(tmp_path, seed=3, **CONFIGS[name])
    engine = make_engine(tmp_path, page_size=4)
    hf_sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert [isinstance(layer.mlp, SparseMoE) for layer in engine.target.layers] == hf_sparse
    assert any(hf_sparse) and (not all(hf_sparse)) == (name != "top2-of-8")
    ids = torch.randint(0, 320, (31,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = nanojet_logits_stepwise(engine, ids[:19], ids[19:])
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    for step, logits in enumerate(ours):
        torch.testing.assert_close(logits, reference[18 + step], atol=1e-4, rtol=1e-4)


def test_router_weights_equal_transformers(moe_dir):
    """Top-k weights and ids, renormalised and not, bit for bit and in the dtype transformers returns, fp32 and bf16."""
    import copy
    _, hf = moe_dir
    engine = make_engine(moe_dir[0])
    h = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        for norm in (True, False):
            ours = copy.deepcopy(engine.target.layers[0].mlp).to(dtype)
            theirs = copy.deepcopy(hf.model.layers[0].mlp.gate).to(dtype)
            ours.norm_topk_prob = theirs.norm_topk_prob = norm
            weights, ids = ours.route(h.to(dtype))
            _, hf_weights, hf_ids = theirs(h.to(dtype))
            assert torch.equal(ids, hf_ids) and weights.dtype == hf_weights.dtype == dtype
            assert torch.equal(weights, hf_weights)
            assert torch.allclose(weights.float().sum(-1), torch.ones(9), atol=1e-2) == norm


def test_greedy_generation_matches_hf_generate(moe_dir):
    directory, hf = moe_dir
    engine = make_engine(directory)
    ours = engine.generate(PROMPT, SamplingParams(max_new_tokens=48)).token_ids
    with torch.no_grad():
        reference = hf.generate(torch.tensor([PROMPT]), max_new_tokens=48, do_sample=False, min_new_tokens=48)
    assert ours == reference[0, len(PROMPT):].tolist()


def checkpoint_logits(directory) -> torch.Tensor:
    return nanojet_logits_stepwise(make_engine(directory), PROMPT, [])[0]


def test_sharded_and_stacked_checkpoints_load_the_same(tmp_path, moe_dir):
    """Per-expert tensors split over shards, and experts stored stacked as transformers 5 holds them
    (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), give the same model."""
    from safetensors.torch import load_file, save_file
    expected = checkpoint_logits(moe_dir[0])
    sharded = tmp_path / "sharded"
    write_hf_moe_model(sharded, seed=5, max_shard_size="60KB", **CONFIGS["top4-of-16-one-dense-layer"])
    assert len(list(sharded.glob("*.safetensors"))) > 2
    torch.testing.assert_close(checkpoint_logits(sharded), expected, atol=0, rtol=0)

    tensors = load_file(moe_dir[0] / "model.safetensors")
    stacked = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in (0, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        stacked[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"],
                                                                    tensors[f"{prefix}.{e}.up_proj.weight"]])
                                                         for e in range(16)])
        stacked[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(16)])
    directory = tmp_path / "stacked"
    directory.mkdir()
    (directory / "config.json").write_text((moe_dir[0] / "config.json").read_text())
    save_file(stacked, directory / "model.safetensors")
    torch.testing.assert_close(checkpoint_logits(directory), expected, atol=0, rtol=0)


def test_saving_writes_the_published_per_expert_names(moe_dir):
    """The loader's inverse map (used for saving) gives back exactly the tensors transformers saved."""
    from safetensors.torch import load_file

    from nanojet.model.loader import hf_state_dict
    saved = load_file(moe_dir[0] / "model.safetensors")
    ours = hf_state_dict(make_engine(moe_dir[0]).target, prefix="model.")
    assert sorted(ours) == sorted(saved)
    assert all(torch.equal(ours[name], saved[name]) for name in saved)


def test_missing_or_extra_expert_tensors_are_named(tmp_path, moe_dir):
    from safetensors.torch import load_file, save_file
    tensors = load_file(moe_dir[0] / "model.safetensors")
    for name, edit, message in [
            ("missing", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"), r"experts.gate_up_proj\[expert 5\]\[shard 1\]"),
            ("extra", lambda t: t.update({"model.layers.0.mlp.experts.16.down_proj.weight": torch.zeros(64, 32)}),
             "expert 16, but the config has 16 experts")]:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text((moe_dir[0] / "config.json").read_text())
        changed = dict(tensors)
        edit(changed)
        save_file(changed, directory / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            make_engine(directory)


BASE = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 4}


@pytest.mark.parametrize("patch, message", [
    ({"num_experts": 4, "num_experts_per_tok": 5}, r"num_experts_per_tok must lie in 1..num_experts \(4\), got 5"),
    ({"num_experts": 0}, "needs num_experts .* >= 1, got 0"),
    ({}, "needs num_experts .* >= 1, got None"),
    ({"num_experts": 4, "moe_intermediate_size": -8}, "moe_intermediate_size must be a positive integer, got -8"),
    ({"num_experts": 4, "decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
    ({"num_experts": 4, "num_local_experts": 8}, "disagree"),
    ({"num_experts": 4, "mlp_only_layers": [-1]}, "mlp_only_layers"),
])
def test_impossible_moe_configs_are_one_line_errors(patch, message):
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_dict({**BASE, **patch})
    assert "\n" not in str(error.value)


def test_both_expert_count_keys_are_read():
    for key in ("num_experts", "num_local_experts"):
        config = ModelConfig.from_dict({**BASE, key: 6, "mlp_only_layers": [0]})
        assert config.num_experts == 6 and [config.is_sparse_layer(i) for i in range(2)] == [False, True]
    assert ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "num_experts": 6}).num_experts == 0


@pytest.fixture(scope="module")
def moe_engine(moe_dir):
    head = random_head(ModelConfig.from_dir(moe_dir[0]), seed=2)
    return make_engine(moe_dir[0], page_size=4, head=head)


GREEDY = SamplingParams(max_new_tokens=30, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=30, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "top-p"])
@pytest.mark.parametrize("budget, width", [(2, 1), (8, 4), (64, 4)])
def test_speculation_on_a_moe_target_is_lossless(moe_engine, params, budget, width, monkeypatch):
    plain = moe_engine.generate(PROMPT, params).token_ids
    assert moe_engine.generate(PROMPT, params, SpeculativeParams(budget, width)).token_ids == plain
    # Drafts that are right: every round verifies (and commits) a full path through the MoE layers.
    from conftest import oracle_drafter

    from nanojet.engine.round import StaticRound
    monkeypatch.setattr(StaticRound, "draft_candidates",
                        oracle_drafter(PROMPT + plain, moe_engine.target.config.vocab_size))
    accepted = moe_engine.generate(PROMPT, params, SpeculativeParams(budget, width))
    assert accepted.token_ids == plain and max(accepted.stats.accept_hist) == min(budget, 8)


def test_compiled_rounds_on_a_moe_target(moe_dir, moe_engine):
    """fused_moe is an opaque custom op inside the full-graph compiled round: same ids as eager, no recompiles."""
    compiled = make_engine(moe_dir[0], page_size=4, head=moe_engine.head, execution="compiled")
    for spec in (SpeculativeParams(8, 4), SpeculativeParams(8, 4)):
        got = compiled.generate(PROMPT, GREEDY, spec)
        assert got.token_ids == moe_engine.generate(PROMPT, GREEDY, spec).token_ids
        assert got.stats.recompiles == 0
