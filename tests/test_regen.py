"""Regenerated head-training data: the target's own responses, greedy and sampled, cached and reused."""
import json

import pytest

from nanojet.llm import DEFAULT_MODEL, LLM
from nanojet.tokenizer import Tokenizer
from nanojet.train.data import load_corpus
from nanojet.train.regen import (
    cached_regeneration,
    regenerate,
    sampling_for,
    stream_of,
    weights_fingerprint,
)


def test_responses_are_the_targets_own_greedy_and_seeded_sampled_output(hf_model_dir):
    """Batched regeneration equals generating each prompt alone with its settings: even greedy, odd sampled."""
    llm = LLM(hf_model_dir[0], head=None, device="cpu", max_num_seqs=2, max_model_len=64)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [40, 41], [7, 7, 7]]
    rows = regenerate(llm, prompts, max_new_tokens=8, log=lambda line: None)
    assert [r["prompt_ids"] for r in rows] == prompts
    assert [r["temperature"] for r in rows] == [0.0, 0.8, 0.0, 0.8]
    for index, (prompt, row) in enumerate(zip(prompts, rows)):
        alone = llm.generate(prompt, sampling_for(index, 8)).token_ids
        assert row["response_ids"] == alone and len(alone) == 8
    assert stream_of(rows[:2], 999) == prompts[0] + rows[0]["response_ids"] + [999] + \
        prompts[1] + rows[1]["response_ids"] + [999]


def test_the_cache_is_reused_and_refused_for_other_settings(tmp_path):
    cache, calls = tmp_path / "sub" / "regen.jsonl", []

    def produce():
        calls.append(1)
        return [{"prompt_ids": [1, 2], "response_ids": [3], "temperature": 0.0}]

    first = cached_regeneration(cache, {"prompts": 1}, produce)
    again = cached_regeneration(cache, {"prompts": 1}, produce)
    assert first == again and len(calls) == 1 and not list(cache.parent.glob("*.partial"))
    with pytest.raises(ValueError, match="holds responses for other settings"):
        cached_regeneration(cache, {"prompts": 2}, produce)
    cache.write_text("not json\n")
    with pytest.raises(ValueError, match="is not a regeneration cache"):
        cached_regeneration(cache, {"prompts": 1}, produce)


def test_the_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    before = weights_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert weights_fingerprint(tmp_path) != before


def test_builtin_regeneration_answers_training_split_prompts(tmp_path):
    """--regen --data builtin: function headers of the training split (never a held-out module), each followed by
    the embedded target's response, written to the cache with the weights' fingerprint."""
    from nanojet.weights.build_tiny import function_prompts, held_out_prompts
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    cache = tmp_path / "regen.jsonl"
    stream = load_corpus("builtin", tokenizer, DEFAULT_MODEL, True, "cpu", regen_prompts=2, regen_tokens=5,
                         regen_cache=cache)
    header, *rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert header["settings"]["target_sha256"] == weights_fingerprint(DEFAULT_MODEL) and len(rows) == 2
    training = {tuple(tokenizer.encode(p)) for p in function_prompts(held_out=False, count=8)}
    held_out = {tuple(tokenizer.encode(p)) for p in held_out_prompts(400)}
    llm = LLM(DEFAULT_MODEL, head=None, device="cpu")
    for index, row in enumerate(rows):
        assert tuple(row["prompt_ids"]) in training and tuple(row["prompt_ids"]) not in held_out
        assert row["response_ids"] == llm.generate(row["prompt_ids"], sampling_for(index, 5)).token_ids
    assert stream == stream_of(rows, tokenizer.eos_token_ids[0])
