"""The Python API refuses bad input with messages worded for it (SamplingParams, LLM), checks at admission that
the KV pool holds a whole generation, and takes the model's generation_config.json defaults."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import random_head

from nanojet import LLM, SamplingParams, SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.model.config import ModelConfig
from nanojet.model.generation_config import GenerationDefaults


@pytest.mark.parametrize("fields, message", [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"temperature": "0.5"}, "temperature must be a finite number"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"max_new_tokens": 8.0}, "max_new_tokens must be an integer"),
    ({"seed": None}, "seed must be an integer"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"logprobs": 21}, "logprobs must be None or an integer in 0..20"),
    ({"logprobs": True}, "logprobs must be None or an integer in 0..20"),
    ({"logprobs": 2.0}, "logprobs must be None or an integer in 0..20"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {5: 100.5}}, r"logit_bias values must be numbers in \[-100, 100\], got 100.5 for token 5"),
    ({"logit_bias": {5: math.nan}}, "logit_bias values must be numbers"),
    ({"logit_bias": {5: True}}, "logit_bias values must be numbers"),
    ({"logit_bias": [(5, 1.0)]}, "logit_bias must be a dict of at most 300"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias must be a dict of at most 300"),
])
def test_sampling_params_refuse_what_would_fail_later(fields, message):
    with pytest.raises(ValueError, match=f"SamplingParams: {message}"):
        SamplingParams(**fields)


def test_sampling_params_take_numpy_numbers_as_plain_ones():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_new_tokens=np.int32(4),
                            logprobs=np.int8(2), logit_bias={np.int64(7): np.float32(-2.5), 9: 100})
    assert (params.temperature, params.top_k, params.max_new_tokens, params.logprobs) == (0.5, 3, 4, 2)
    assert type(params.top_k) is int and type(params.temperature) is float and type(params.logprobs) is int
    assert params.logit_bias == {7: -2.5, 9: 100.0} and all(type(k) is int for k in params.logit_bias)
    assert SamplingParams(logit_bias={}).logit_bias is None  # an empty bias biases nothing


@pytest.fixture(scope="module")
def llm(hf_model_dir):
    return LLM(hf_model_dir[0], device="cpu")


def test_prompt_ids_outside_the_vocabulary_are_named(llm):
    with pytest.raises(ValueError, match=r"prompt token 1 is id 99999, outside the vocabulary \(0\.\.319\)"):
        llm.generate([5, 99999], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt token 0 is id -1"):
        llm.generate([-1], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate([5, 1.0], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt must be text"):
        llm.generate(("a",), SamplingParams(max_new_tokens=2))
    assert len(llm.generate([np.int64(5)], SamplingParams(max_new_tokens=2)).token_ids) == 2


def test_head_arguments_are_worded_for_the_api(hf_model_dir, tmp_path):
    with pytest.raises(ValueError, match="pass head=None for plain decoding"):
        LLM(hf_model_dir[0], head="none", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"head=None"):
        LLM(hf_model_dir[0], head=tmp_path / "missing", device="cpu")
    assert LLM(hf_model_dir[0], head="auto", device="cpu").head is None  # this model ships no head


def test_kv_admission_refuses_before_anything_streams(hf_model_dir):
    config = ModelConfig.from_dir(hf_model_dir[0])
    page_bytes = (config.num_hidden_layers * 2 * 16 * config.num_key_value_heads * config.head_dim * 4)
    small = LLM(hf_model_dir[0], device="cpu", kv_memory_gb=4 * page_bytes / 2**30)  # 4 pages = 64 slots
    streamed = []
    with pytest.raises(ValueError, match=r"need 5 KV pages .* the KV pool has 4; raise --kv-memory-gb"):
        small.generate([1] * 10, SamplingParams(max_new_tokens=60), on_text=streamed.append)
    assert streamed == []
    # What fits runs to its end: 10 + 53 tokens + 1 scratch slot = 64 slots.
    out = small.generate([1] * 10, SamplingParams(max_new_tokens=53, ignore_eos=True))
    assert len(out.token_ids) == 53


@pytest.mark.parametrize("budget, width, depth", [(1, 4, None), (8, 4, None), (16, 2, 3), (64, 4, None),
                                                  (3, 1, None), (100, 8, 2)])
def test_round_scratch_is_what_the_static_round_reserves(tmp_path, hf_model_dir, budget, width, depth):
    target = ModelConfig.from_dir(hf_model_dir[0])
    random_head(target, block_size=6).save(tmp_path / "head")
    llm = LLM(hf_model_dir[0], head=tmp_path / "head", device="cpu")
    spec = SpeculativeParams(budget, width, depth)
    static = StaticRound(llm.model, llm.head, llm.kv_cache, spec if budget > 1 else None, SamplingParams())
    assert llm.engine.scratch_slots(spec) == static.scratch_slots
    assert llm.engine.scratch_slots(None) == 1


def test_speculative_generation_that_fits_the_pool_exactly_completes(tmp_path, hf_model_dir):
    """The admission bound is not below what a speculative generation reserves."""
    target = ModelConfig.from_dir(hf_model_dir[0])
    random_head(target, block_size=6).save(tmp_path / "head")
    layers = target.num_hidden_layers + 2
    page_bytes = layers * 2 * 16 * target.num_key_value_heads * target.head_dim * 4
    spec, params = SpeculativeParams(16, 4), SamplingParams(max_new_tokens=40, ignore_eos=True)
    probe = LLM(hf_model_dir[0], head=tmp_path / "head", device="cpu")
    pages = -(-(10 + 40 - 1 + probe.engine.scratch_slots(spec)) // 16)  # the last round starts at 49 slots
    llm = LLM(hf_model_dir[0], head=tmp_path / "head", device="cpu", kv_memory_gb=pages * page_bytes / 2**30)
    assert llm.kv_cache.num_pages == pages
    assert len(llm.generate(list(range(1, 11)), params, spec).token_ids) == 40


def copy_with_generation_config(hf_model_dir, tmp_path, generation: dict):
    directory = shutil.copytree(hf_model_dir[0], tmp_path / "model")
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def test_generation_config_defaults_apply_when_params_are_not_given(hf_model_dir, tmp_path):
    directory = copy_with_generation_config(hf_model_dir, tmp_path, {"do_sample": True, "temperature": 0.9,
                                                                     "top_k": 7, "max_new_tokens": 6})
    llm = LLM(directory, device="cpu")
    assert llm.generation_defaults == GenerationDefaults({"temperature": 0.9, "top_k": 7, "max_new_tokens": 6})
    implicit = llm.generate([5, 6, 7])
    explicit = llm.generate([5, 6, 7], SamplingParams(temperature=0.9, top_k=7, max_new_tokens=6))
    assert implicit.token_ids == explicit.token_ids and len(implicit.token_ids) <= 6


@pytest.mark.parametrize("generation, sampling, healing", [
    ({"do_sample": False, "temperature": 0.6, "max_new_tokens": 9}, {"max_new_tokens": 9}, False),  # greedy
    ({"temperature": 0.6, "top_p": 0.95, "token_healing": True}, {"temperature": 0.6, "top_p": 0.95}, True),
    ({}, {}, False),
])
def test_generation_config_fields(hf_model_dir, tmp_path, generation, sampling, healing):
    defaults = GenerationDefaults.from_dir(copy_with_generation_config(hf_model_dir, tmp_path, generation))
    assert defaults.sampling == sampling and defaults.token_healing is healing


@pytest.mark.parametrize("generation, message", [({"temperature": "hot"}, "temperature must be a finite number"),
                                                 ({"token_healing": "yes"}, "token_healing must be true or false")])
def test_bad_generation_config_is_named(hf_model_dir, tmp_path, generation, message):
    directory = copy_with_generation_config(hf_model_dir, tmp_path, generation)
    with pytest.raises(ValueError, match=f"generation_config.json: .*{message}"):
        GenerationDefaults.from_dir(directory)


def test_token_healing_is_off_by_default_and_matches_transformers(hf_model_dir):
    """Without healing, raw prompts give the ids transformers' greedy generate gives."""
    llm = LLM(hf_model_dir[0], device="cpu")
    out = llm.generate("x = f(a))", SamplingParams(max_new_tokens=10, ignore_eos=True))
    ids = llm.tokenizer.encode("x = f(a))")
    assert out.prompt_token_ids == ids and not out.token_healed
    with torch.no_grad():
        reference = hf_model_dir[1].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                             do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    assert out.token_ids == reference[0, len(ids):].tolist()
    healed = llm.generate("x = f(a))", SamplingParams(max_new_tokens=10, ignore_eos=True), token_healing=True)
    assert healed.token_healed and healed.prompt_token_ids == ids[:-1]
