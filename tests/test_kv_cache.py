"""Paged KV cache: varlen steps, page accounting, commit of a kept path, exhaustion."""
import pytest
import torch
from conftest import make_engine, step_metadata

from nanojet.engine.kv_cache import KVCache, KVCacheExhausted, Sequence
from nanojet.engine.sampling import SamplingParams


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def prefill_logits(engine, sequences, prompts):
    cache = engine.kv
    meta = step_metadata(cache, sequences, [torch.arange(len(p)) for p in prompts], [causal(len(p)) for p in prompts])
    hidden, _ = engine.target(torch.tensor(sum(prompts, [])), meta, cache.pool)
    for sequence, prompt in zip(sequences, prompts):
        sequence.length = len(prompt)
    return engine.target.logits(hidden)


def test_varlen_step_equals_separate_steps(hf_model_dir):
    directory, _ = hf_model_dir
    engine = make_engine(directory, page_size=4)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], [6]]
    together = prefill_logits(engine, [Sequence() for _ in prompts], prompts)
    separate = torch.cat([prefill_logits(engine, [Sequence()], [p]) for p in prompts])
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)


def test_varlen_decode_over_different_prefixes(hf_model_dir):
    """Two sequences with different cached lengths decode one token each in one step, as if alone."""
    directory, _ = hf_model_dir
    engine = make_engine(directory, page_size=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21]]
    pair = [Sequence(), Sequence()]
    prefill_logits(engine, pair, prompts)
    meta = step_metadata(engine.kv, pair, [torch.tensor([9]), torch.tensor([2])], [causal(1), causal(1)])
    hidden, _ = engine.target(torch.tensor([14, 22]), meta, engine.kv.pool)
    both = engine.target.logits(hidden)
    for row, prompt in enumerate(prompts):
        alone = prefill_logits(engine, [Sequence()], [prompt + [[14, 22][row]]])[-1]
        torch.testing.assert_close(both[row], alone, atol=1e-5, rtol=1e-5)


def test_pages_are_reserved_trimmed_and_freed():
    cache = KVCache(1, 1, 2, num_pages=6, kv_page_size=4, max_pages_per_sequence=6, dtype=torch.float32,
                    device=torch.device("cpu"))
    sequence = Sequence()
    cache.reserve(sequence, 9)  # 9 slots -> 3 pages
    assert len(sequence.pages) == 3 and len(cache.free_pages) == 3
    assert cache.slots(sequence, 3, 6).tolist() == [sequence.pages[0] * 4 + 3, sequence.pages[1] * 4,
                                                     sequence.pages[1] * 4 + 1]
    cache.trim(sequence, 5)
    assert len(sequence.pages) == 2 and len(cache.free_pages) == 4
    cache.free(sequence)
    assert sequence.pages == [] and len(cache.free_pages) == 6


def test_exhausted_pool_raises_a_clear_error():
    cache = KVCache(1, 1, 2, num_pages=2, kv_page_size=4, max_pages_per_sequence=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    with pytest.raises(KVCacheExhausted, match="KV cache exhausted"):
        cache.reserve(Sequence(), 9)
    with pytest.raises(KVCacheExhausted, match="page table"):
        cache.reserve(Sequence(), 17)


def test_generation_that_outgrows_the_pool_raises_and_releases(hf_model_dir):
    directory, _ = hf_model_dir
    engine = make_engine(directory, page_size=4)
    engine.kv.free_pages = engine.kv.free_pages[-4:]  # 16 slots in all
    with pytest.raises(RuntimeError, match="the KV pool cannot hold this request even alone"):
        engine.generate(list(range(1, 11)), SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert len(engine.kv.free_pages) == 4  # the failed sequence gave its pages back
