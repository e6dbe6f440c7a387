"""The draft head: its paged, cached forward equals a naive dense implementation; checkpoints round-trip in the
JetSpec / DFlash format; heads that cannot run on the target are refused, the rest load as JetSpec's loader would."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import draft_after, make_engine, random_head

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig
from nanojet.model.head import load_head, published_layer_ids


def rms(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, positions, theta, head_dim):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None].double() * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def naive_draft_logprobs(target, head, committed: list[int]) -> torch.Tensor:
    """Dense [context ; block] attention written from the definition, independent of nanojet/kernels/ and the pool."""
    c = head.config.layers
    n = len(committed)
    _, taps = target.forward_dense(torch.tensor([committed[:-1]]), tap_layers=tuple(head.config.target_layer_ids))
    context = rms(head.fc(taps[0]), head.hidden_norm)  # [n-1, H]
    block = torch.full((head.config.block_size,), head.config.mask_token_id)
    block[0] = committed[-1]
    x = target.embed_tokens(block)
    ctx_pos, blk_pos = torch.arange(n - 1), torch.arange(n - 1, n - 1 + head.config.block_size)
    b = head.config.block_size
    mask = torch.ones(b, n - 1 + b, dtype=torch.bool)
    if head.config.causal:
        mask[:, n - 1:] = torch.ones(b, b, dtype=torch.bool).tril()
    for layer in head.layers:
        attn = layer.self_attn
        h = rms(x, layer.input_layernorm)
        wq, wk, wv = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
        heads = lambda t, n_heads: t.view(t.shape[0], n_heads, c.head_dim)
        q = rope(rms(heads(h @ wq.T, c.num_attention_heads), attn.q_norm), blk_pos, c.rope_theta, c.head_dim)
        k = torch.cat([rope(rms(heads(src @ wk.T, c.num_key_value_heads), attn.k_norm), pos, c.rope_theta,
                            c.head_dim) for src, pos in ((context, ctx_pos), (h, blk_pos))])
        v = torch.cat([heads(src @ wv.T, c.num_key_value_heads) for src in (context, h)])
        group = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * c.head_dim ** -0.5
        out = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
        x = x + attn.o_proj(out.flatten(1))
        h = rms(x, layer.post_attention_layernorm)
        gate, up = layer.mlp.gate_up_proj(h).chunk(2, -1)
        x = x + layer.mlp.down_proj(F.silu(gate) * up)
    return torch.log_softmax(target.logits(rms(x, head.norm)[1:]), -1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_paged_draft_equals_naive_dense(hf_model_dir, causal):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), causal=causal, seed=5)
    engine = make_engine(directory, page_size=4, head=head)
    prompt = [4, 8, 15, 16, 23, 42, 100, 7, 9, 200, 3, 5, 1]
    sequence = Sequence()
    with torch.no_grad():
        anchor = engine.prefill(sequence, prompt, extend_head=True).argmax(-1)[0]
        ours = draft_after(engine, sequence, int(anchor))
        reference = naive_draft_logprobs(engine.target, head, prompt + [int(anchor)])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_causal_rows_ignore_later_block_rows(hf_model_dir, causal):
    """In a causal head row j sees rows <= j only, so a shorter block drafts the same first rows; in a
    bidirectional head every row sees the whole block, so they change."""
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), causal=causal)
    engine = make_engine(directory, head=head)
    drafts = []
    for block_size in (8, 4):
        head.config.block_size = block_size
        sequence = Sequence()
        with torch.no_grad():
            anchor = engine.prefill(sequence, [11, 12, 13, 14, 15], extend_head=True).argmax(-1)[0]
            drafts.append(draft_after(engine, sequence, int(anchor)))
        engine.kv.free(sequence)
    assert torch.allclose(drafts[0][:3], drafts[1], atol=1e-5) == causal


def test_save_load_round_trip_is_bit_exact(tmp_path, hf_model_dir):
    directory, _ = hf_model_dir
    target = ModelConfig.from_dir(directory)
    head = random_head(target, causal=True, seed=9)
    head.save(tmp_path / "head")
    raw = json.loads((tmp_path / "head" / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["block_size"] == 8
    assert raw["dflash_config"]["target_layer_ids"] == [0, 1] and raw["dflash_config"]["causal"] is True
    from safetensors import safe_open
    with safe_open(str(tmp_path / "head" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.1.mlp.down_proj.weight", "layers.0.self_attn.k_norm.weight"} <= names
    loaded = load_head(tmp_path / "head", target, torch.float32, torch.device("cpu"))
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.causal and loaded.config.target_layer_ids == [0, 1]


def write_patched_head(tmp_path, target, patch: dict, drop_dflash: tuple = ()):
    random_head(target).save(tmp_path / "head")
    raw = json.loads((tmp_path / "head" / "config.json").read_text())
    raw = {**raw, **patch}
    raw["dflash_config"] = {k: v for k, v in raw["dflash_config"].items() if k not in drop_dflash}
    (tmp_path / "head" / "config.json").write_text(json.dumps(raw))
    return tmp_path / "head"


@pytest.mark.parametrize("patch, message", [
    ({"hidden_size": 32}, "hidden size"),
    ({"dflash_config": {"target_layer_ids": [0, 3], "mask_token_id": 300}}, r"must lie in 0\.\.2"),
    ({"num_key_value_heads": 4}, r"KV heads x head_dim \(4 x 24\) differ .* one paged KV pool"),
    ({"dflash_config": {"target_layer_ids": [0, 1], "mask_token_id": 999}}, "mask_token_id 999 is outside"),
])
def test_heads_that_cannot_run_are_refused_with_the_reason(tmp_path, hf_model_dir, patch, message):
    target = ModelConfig.from_dir(hf_model_dir[0])
    with pytest.raises(ValueError, match=message):
        load_head(write_patched_head(tmp_path, target, patch), target, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("patch", [
    {"num_target_layers": 5},  # trained on a deeper target: runs (losslessly), so it is not refused
    {"vocab_size": 999},       # the head uses the target's embeddings and lm_head
    {"dflash_config": {"target_layer_ids": [0, 2], "mask_token_id": 300}},  # taps the last layer
])
def test_heads_that_can_run_are_loaded(tmp_path, hf_model_dir, patch):
    target = ModelConfig.from_dir(hf_model_dir[0])
    head = load_head(write_patched_head(tmp_path, target, patch), target, torch.float32, torch.device("cpu"))
    engine = make_engine(hf_model_dir[0], head=head)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert engine.generate([5, 6, 7], params, SpeculativeParams(8, 2)).token_ids == \
        engine.generate([5, 6, 7], params).token_ids


def test_published_layer_rule():
    # z-lab/Qwen3-8B-DFlash-b16: a 5-layer head on the 36-layer Qwen3-8B taps layers 1, 9, 17, 25, 33.
    assert published_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert published_layer_ids(28, 1) == [14]
    assert published_layer_ids(28, 3) == [1, 13, 25]


def test_absent_target_layer_ids_and_num_target_layers_are_derived(tmp_path, hf_model_dir):
    target = ModelConfig.from_dir(hf_model_dir[0])
    path = write_patched_head(tmp_path, target, {}, drop_dflash=("target_layer_ids",))
    raw = json.loads((path / "config.json").read_text())
    del raw["num_target_layers"]
    (path / "config.json").write_text(json.dumps(raw))
    head = load_head(path, target, torch.float32, torch.device("cpu"))
    assert head.config.num_target_layers == 3
    assert head.config.target_layer_ids == published_layer_ids(3, 2)


@pytest.mark.parametrize("flags, causal", [({"causal": True}, True), ({"causal_head": True}, True),
                                           ({"causal": False, "causal_head": True}, False), ({}, False)])
def test_causal_or_causal_head_is_read(tmp_path, hf_model_dir, flags, causal):
    target = ModelConfig.from_dir(hf_model_dir[0])
    path = write_patched_head(tmp_path, target, {}, drop_dflash=("causal", "causal_head"))
    raw = json.loads((path / "config.json").read_text())
    raw["dflash_config"].update(flags)
    (path / "config.json").write_text(json.dumps(raw))
    assert load_head(path, target, torch.float32, torch.device("cpu")).config.causal is causal


def test_missing_head_directory(tmp_path, hf_model_dir):
    with pytest.raises(FileNotFoundError, match="no draft head"):
        load_head(tmp_path / "nothing", ModelConfig.from_dir(hf_model_dir[0]), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
def test_context_kv_at_once_equals_layer_by_layer(hf_model_dir, pack):
    """The eager CPU path writes every head layer's context K/V in one pass (`DraftHead._extend_context_at_once`);
    it must write what the per-layer projection writes, with packed weights too, skip padding slots (-1), and
    follow weights written after its stacked copy was made (training)."""
    from nanojet import kernels
    from nanojet.model.packed_gemm import pack_rows
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), seed=3)
    rows, layers, attn = 6, len(head.layers), head.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    taps = torch.randn(rows, head.fc.in_features, generator=generator)
    positions = torch.arange(40, 40 + rows)
    slots = torch.tensor([9, 3, -1, 17, 4, 30])  # scattered, one padding row
    pool_shape = (layers, 2, 8, 4, attn.num_kv_heads, attn.head_dim)  # 8 pages of 4 slots

    def expected_pool():
        pool = torch.zeros(pool_shape)
        context = head.project_context(taps)
        keep = slots >= 0
        for index, layer in enumerate(head.layers):
            k, v = layer.self_attn.project_kv(context, positions, head.inv_freq)
            pool[index, 0].view(-1, *k.shape[1:])[slots[keep]] = k[keep]
            pool[index, 1].view(-1, *v.shape[1:])[slots[keep]] = v[keep]
        return pool

    with torch.no_grad():
        for step in range(2):
            if pack:
                weight, _, _, packed = head.context_kv_weights()
                pack_rows(packed, weight, rows)
                assert rows in packed
            pool = torch.zeros(pool_shape)
            assert kernels.plan_context(positions, head.inv_freq, slots) is not None  # the at-once path runs
            head.extend_context(taps, positions, slots, pool)
            assert torch.equal(pool, expected_pool()), step
            for layer in head.layers:  # a training step: the stacked copy must not go stale
                layer.self_attn.qkv_proj.weight.mul_(1.5)
                layer.self_attn.k_norm.add_(0.25)
