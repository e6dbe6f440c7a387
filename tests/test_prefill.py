"""Chunked prefill (docs/architecture.md): each chunk sees the whole prefix and itself causally, so chunk size
changes nothing but memory; it matches HF transformers on a prompt of thousands of tokens."""
import pytest
import torch
from conftest import make_engine, random_head, write_hf_model

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig


def prefill_state(engine, prompt: list[int], extend_head: bool):
    """Logits after the prompt and the K/V the prefill wrote (target and head layers) for its slots."""
    sequence = Sequence()
    with torch.inference_mode():
        logits = engine.prefill(sequence, prompt, extend_head)
    slots = engine.kv.slots(sequence, 0, len(prompt))
    pool = engine.kv.pool
    written = pool.view(*pool.shape[:2], -1, *pool.shape[4:])[:, :, slots].clone()
    engine.kv.free(sequence)
    return logits, written


def test_chunk_size_changes_nothing(hf_model_dir):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), seed=4)
    prompt = torch.randint(0, 300, (157,), generator=torch.Generator().manual_seed(1)).tolist()
    engines = {chunk: make_engine(directory, page_size=4, head=head, prefill_chunk=chunk) for chunk in (157, 64, 33, 5)}
    whole_logits, whole_kv = prefill_state(engines[157], prompt, True)
    for chunk in (64, 33, 5):  # 33 cuts inside a 32-bit visibility word and across pages
        logits, kv = prefill_state(engines[chunk], prompt, True)
        torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv, whole_kv, atol=1e-5, rtol=1e-5)  # head context included
    params = SamplingParams(temperature=0.7, seed=9, max_new_tokens=12, ignore_eos=True)
    spec = SpeculativeParams(budget=8, width=2)
    assert engines[5].generate(prompt, params, spec).token_ids == engines[157].generate(prompt, params).token_ids


def test_prefill_of_6k_tokens_matches_hf(tmp_path):
    hf = write_hf_model(tmp_path, seed=5, max_position_embeddings=8192, num_hidden_layers=2)
    n = 6000
    prompt = torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(2))
    engine = make_engine(tmp_path, page_size=16, max_model_len=n + 8)  # default chunk: 512 -> 12 chunks
    assert engine.prefill_chunk == 512
    logits, _ = prefill_state(engine, prompt.tolist(), False)
    with torch.no_grad():
        expected = hf(prompt[None], logits_to_keep=1).logits[0]
    torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=1e-4)


def test_prefill_chunk_must_be_positive(hf_model_dir):
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1"):
        make_engine(hf_model_dir[0], prefill_chunk=0)


def test_prompt_lengths_do_not_specialise_the_attention_kernel():
    """Prefill chunks and trees of every length must reuse a few compiled attention variants: the lengths and the
    split size and count are runtime arguments of the Triton kernels, never specialisation keys (only "split or
    not" is)."""
    from nanojet.kernels import triton_attention
    for kernel, runtime in ((triton_attention._paged_attention_kernel, {"num_tokens", "split_keys"}),
                            (triton_attention._combine_splits_kernel, {"num_tokens", "num_splits"}),
                            (triton_attention._visible_order_kernel, {"blocks_per_sequence", "stride_order"})):
        # (a JITFunction keeps the list; under TRITON_INTERPRET the interpreted function keeps its jit kwargs)
        names = kernel.do_not_specialize if hasattr(kernel, "do_not_specialize") else kernel.kwargs["do_not_specialize"]
        assert runtime <= set(names)
