"""Counting what a MoE target reads: experts touched per forward (the MoE cost of speculation), weight bytes per
decode step, the published Qwen3-30B-A3B shape, and bench.py --experts-touched."""
import json

import pytest
import torch
from conftest import make_engine, random_head, write_hf_moe_model

from nanojet.bench.device_stats import weight_bytes_per_step
from nanojet.bench.moe_stats import (
    ExpertRecorder,
    expert_touch_curve,
    uniform_routing_experts,
)
from nanojet.bench.synthetic import SHAPES, synthetic_models
from nanojet.model.config import ModelConfig
from nanojet.tools import bench


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe_stats")
    hf = write_hf_moe_model(directory, seed=9, num_experts=16, num_experts_per_tok=4, mlp_only_layers=[1])
    head = random_head(ModelConfig.from_dir(directory), seed=3)
    return make_engine(directory, page_size=4, head=head), hf


def test_recorder_counts_the_experts_transformers_routes_to(moe):
    engine, hf = moe
    tokens = [3, 77, 3, 150, 9, 211, 40]
    with torch.no_grad(), ExpertRecorder(engine.target) as recorder:
        engine.target.forward_dense(torch.tensor([tokens]))
        out = hf(torch.tensor([tokens]), output_router_logits=True)
    assert len(recorder.forwards) == 1 and recorder.forwards[0][0] == len(tokens)
    # HF returns router logits of its two MoE layers (0 and 2); top-4 of them are the experts used.
    expected = [int(torch.unique(logits.topk(4, dim=-1).indices).numel()) for logits in out.router_logits]
    assert recorder.forwards[0][1] == expected
    with ExpertRecorder(engine.target):
        pass
    assert all(not layer._forward_pre_hooks for layer in (m.mlp for m in engine.target.layers))


def test_expert_curve_budgets(moe):
    engine, _ = moe
    rows = expert_touch_curve(engine, list(range(5, 25)), [1, 4, 32], width=4, max_new_tokens=12)
    ar, small, large = rows
    assert ar["tree_nodes"] == 1 and ar["experts_per_layer"] == 4 and ar["over_decode_step"] == 1
    assert ar["rounds"] == 11  # 12 tokens: the first comes from the prefill, which is not counted
    for row in (small, large):
        assert 1 < row["tree_nodes"] <= row["budget"]
        assert 4 < row["experts_per_layer"] <= min(row["bound"], 16) and row["max_experts_per_layer"] <= 16
    assert large["experts_per_layer"] > small["experts_per_layer"]
    per_expert = 3 * 64 * 32 * 4  # gate, up, down of one expert (hidden 64, moe_intermediate 32), fp32
    assert large["expert_bytes_per_round"] == pytest.approx(large["experts_per_layer"] * 2 * per_expert)


def test_uniform_routing_expectation():
    assert uniform_routing_experts(1, 128, 8) == pytest.approx(8)
    assert uniform_routing_experts(256, 128, 8) == pytest.approx(128, abs=1e-4)
    # Monte Carlo check of the formula at 8 tokens (each picks 8 distinct of 128).
    generator = torch.Generator().manual_seed(0)
    draws = [torch.unique(torch.stack([torch.randperm(128, generator=generator)[:8] for _ in range(8)])).numel()
             for _ in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(uniform_routing_experts(8, 128, 8), rel=0.02)


def test_weight_bytes_per_step_count_the_experts_one_token_touches(moe):
    engine, _ = moe
    dense_total = sum(p.numel() for name, p in engine.target.named_parameters() if ".experts." not in name)
    embedding_rows_not_read = (320 - 1) * 64  # untied: one embedding row per step
    experts_read = 2 * 4 * 3 * 64 * 32  # two MoE layers, top-4 experts of gate/up/down 64 x 32
    assert weight_bytes_per_step(engine.target) == 4 * (dense_total - embedding_rows_not_read + experts_read)


def test_qwen3_30b_a3b_shape():
    """The synthetic shape is the published model: 30.5B parameters, 3.3B active per token (embedding included)."""
    target, head = synthetic_models("qwen3-30b-a3b", torch.bfloat16, torch.device("meta"))
    config = target.config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 8, 768)
    assert all(config.is_sparse_layer(i) for i in range(48))
    assert sum(p.numel() for p in target.parameters()) == pytest.approx(30.53e9, rel=1e-3)
    unread_embedding_rows = (151936 - 1) * 2048  # a step reads one row of the untied embedding
    assert weight_bytes_per_step(target) / 2 + unread_embedding_rows == pytest.approx(3.35e9, rel=1e-2)
    assert not any(".experts." in name for name, _ in head.named_parameters())  # the head is dense


def test_bench_experts_touched(tmp_path, monkeypatch, capsys):
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=512, tie_word_embeddings=False, num_experts=32,
                num_experts_per_tok=4, moe_intermediate_size=16, norm_topk_prob=True)
    monkeypatch.setitem(SHAPES, "tiny-moe", tiny)
    out = tmp_path / "experts.json"
    argv = ["--synthetic", "tiny-moe", "--experts-touched", "--budgets", "1,16", "--max-new-tokens", "6",
            "--samples", "1", "--device", "cpu", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["experts_touched"]
    assert [r["budget"] for r in rows] == [1, 16] and rows[0]["experts_per_layer"] == 4
    assert rows[1]["experts_per_layer"] > 4
    assert "a decode step touches 4" in capsys.readouterr().out
    assert bench.main(argv + ["--compile"]) == 2
    assert "drop --compile" in capsys.readouterr().err
