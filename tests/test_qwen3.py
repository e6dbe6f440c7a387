"""The target matches HF transformers' Qwen3ForCausalLM: logits at prefill and every decode step, and greedy text."""
import pytest
import torch
from conftest import make_engine, step_metadata, write_hf_model

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.sampling import SamplingParams

CONFIGS = {
    "gqa1-untied": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
    "gqa2-headdim24-tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "gqa4-headdim64": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                           attention_bias=True),
}


def nanojet_logits_stepwise(engine, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt (prefill), then after each continuation token (one-token decode steps)."""
    model, cache = engine.target, engine.kv
    sequence = Sequence()
    n = len(prompt)
    meta = step_metadata(cache, [sequence], [torch.arange(n)], [torch.ones(n, n, dtype=torch.bool).tril()])
    hidden, _ = model(torch.tensor(prompt), meta, cache.pool)
    sequence.length = n
    out = [model.logits(hidden[-1:])[0]]
    for token in continuation:
        meta = step_metadata(cache, [sequence], [torch.tensor([sequence.length])], [torch.ones(1, 1, dtype=torch.bool)])
        hidden, _ = model(torch.tensor([token]), meta, cache.pool)
        sequence.length += 1
        out.append(model.logits(hidden)[0])
    cache.free(sequence)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_prefill_and_decode(tmp_path, name):
    hf = write_hf_model(tmp_path, seed=3, **CONFIGS[name])
    engine = make_engine(tmp_path, page_size=4)  # 19 + 12 tokens: sequences cross several KV pages
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (31,), generator=generator).tolist()
    prompt, continuation = ids[:19], ids[19:]
    ours = nanojet_logits_stepwise(engine, prompt, continuation)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    for step, logits in enumerate(ours):
        torch.testing.assert_close(logits, reference[18 + step], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_hf_generate(hf_model_dir):
    directory, hf = hf_model_dir
    engine = make_engine(directory, page_size=8)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    ours = engine.generate(prompt, SamplingParams(max_new_tokens=64)).token_ids
    with torch.no_grad():
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    assert ours == reference[0, len(prompt):].tolist()


def test_sharded_checkpoint_loads_with_same_logits(tmp_path):
    hf = write_hf_model(tmp_path, seed=4, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    engine = make_engine(tmp_path)
    ids = [1, 2, 3, 4, 5, 6]
    ours = nanojet_logits_stepwise(engine, ids, [])[0]
    with torch.no_grad():
        torch.testing.assert_close(ours, hf(torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_dense_forward_matches_paged_forward(hf_model_dir):
    directory, hf = hf_model_dir
    engine = make_engine(directory)
    ids = list(range(10, 40))
    paged = nanojet_logits_stepwise(engine, ids, [])[0]
    with torch.no_grad():
        hidden, taps = engine.target.forward_dense(torch.tensor([ids]), tap_layers=(0, 1))
        hf_out = hf(torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(engine.target.logits(hidden)[0, -1], paged, atol=1e-4, rtol=1e-4)
    # Tap i is the residual stream after decoder layer i: HF's hidden_states[i + 1].
    expected = torch.cat([hf_out.hidden_states[1][0], hf_out.hidden_states[2][0]], dim=-1)
    torch.testing.assert_close(taps[0], expected, atol=1e-4, rtol=1e-4)
