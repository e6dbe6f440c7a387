"""Sampling: greedy, seeded Gumbel-max keyed by (seed, position), top-k / top-p filtering."""
import pytest
import torch
from conftest import filter_logits, make_engine

from nanojet.engine.sampling import SamplingParams, gumbel_noise, sample


def test_noise_depends_only_on_seed_and_position():
    a = gumbel_noise(7, torch.tensor([3, 10, 3]), 50)
    assert torch.equal(a[0], a[2])  # same position, same noise, wherever the row sits
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(gumbel_noise(8, torch.tensor([3]), 50)[0], a[0])
    assert torch.isfinite(a).all()


def unchunked_gumbel_noise(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The noise as it was first written, over the whole `[N, V]` at once: the values must never change (seeded
    outputs would)."""
    mask = 0xFFFFFFFF

    def mix32(x):
        x = ((x >> 16) ^ x) * 0x45D9F3B & mask
        x = ((x >> 16) ^ x) * 0x45D9F3B & mask
        return (x >> 16) ^ x
    seed = torch.as_tensor(seed, dtype=torch.int64)
    row = mix32((mix32(positions.long() & mask) ^ mix32(seed)))
    column = torch.arange(vocab_size, dtype=torch.int64)
    bits = mix32((row[:, None] * 0x01000193 + column[None, :] * 0x9E3779B1) & mask)
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform))


@pytest.mark.parametrize("chunk_elements", [1, 3000, 1 << 21])
def test_chunked_noise_is_bit_identical_to_the_one_shot_formula(chunk_elements):
    """Chunk edges inside and at the end of the vocabulary (1027 columns, chunks of 1024 or more), one row and
    many, positions and seeds past 2^31."""
    for seed, positions in ((0, torch.tensor([5])), (2**31 - 1, torch.arange(40) * 977 + 2**33)):
        chunked = gumbel_noise(seed, positions, 1027, chunk_elements=chunk_elements)
        assert torch.equal(chunked, unchunked_gumbel_noise(seed, positions, 1027))


def test_noise_is_gumbel_distributed():
    noise = gumbel_noise(0, torch.arange(200), 1000).flatten()
    assert abs(noise.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni constant
    assert abs(noise.var().item() - torch.pi ** 2 / 6) < 0.05


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    draws = sample(logits, torch.arange(4000), SamplingParams(temperature=1.0, seed=3))
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_top_k_and_top_p_never_emit_filtered_tokens():
    torch.manual_seed(0)
    logits = torch.randn(300, 40)
    top_k = sample(logits, torch.arange(300), SamplingParams(temperature=1.5, top_k=3, seed=1))
    allowed = torch.topk(logits, 3).indices
    assert (allowed == top_k[:, None]).any(-1).all()
    top_p = sample(logits, torch.arange(300), SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    kept = torch.isfinite(filter_logits(logits, 0, 0.5))
    assert kept.gather(1, top_p[:, None]).all()
    probs = torch.softmax(logits, -1)
    # The nucleus is the smallest prefix of the sorted distribution whose mass reaches top_p.
    mass = (probs * kept).sum(-1)
    smallest = (probs * kept).masked_fill(~kept, 2).min(-1).values
    assert (mass >= 0.5 - 1e-6).all() and (mass - smallest < 0.5).all()


def test_greedy_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample(logits, torch.arange(5), SamplingParams()), logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(seed=-1)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_same_seed_same_tokens_different_seed_differs(hf_model_dir):
    directory, _ = hf_model_dir
    engine = make_engine(directory)
    prompt = [9, 8, 7, 6]
    run = lambda seed: engine.generate(prompt, SamplingParams(temperature=1.0, seed=seed, max_new_tokens=24,
                                                              ignore_eos=True)).token_ids
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_per_row_parameters_choose_what_sample_chooses():
    """Batched rounds sample every sequence with its own parameters (`sample_rows`); each row must pick exactly
    the token the one-setting definition picks (conftest.filter_logits, then Gumbel-max at its position), greedy
    rows included, and top_p 1 / top_k 0 must filter nothing; `sample` (one setting for all rows) agrees."""
    from nanojet.engine.sampling import sample_rows
    torch.manual_seed(0)
    settings = [SamplingParams(), SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.3, top_k=5),
                SamplingParams(temperature=0.9, top_p=0.8, seed=9), SamplingParams(temperature=1.0, top_k=40, top_p=0.5),
                SamplingParams(temperature=2.0, top_k=400, seed=1)]
    logits = torch.randn(len(settings) * 50, 300) * 3
    logits[:, 7] = logits[:, 8]  # a tie at the top-k / top-p boundary of some rows
    rows = torch.arange(logits.shape[0]) % len(settings)
    positions = torch.arange(logits.shape[0]) * 7 + 11

    def column(name, dtype):
        return torch.tensor([getattr(settings[r], name) for r in rows], dtype=dtype)

    batched = sample_rows(logits, positions, column("temperature", torch.float32), column("top_k", torch.int64),
                          column("top_p", torch.float32), column("seed", torch.int64))
    def defined(i: int, p: SamplingParams) -> int:
        if p.greedy:
            return int(logits[i].argmax())
        filtered = filter_logits(logits[i:i + 1] / p.temperature, p.top_k, p.top_p)
        return int((filtered + gumbel_noise(p.seed, positions[i:i + 1], logits.shape[-1])).argmax())
    assert batched.tolist() == [defined(i, settings[r]) for i, r in enumerate(rows.tolist())]
    alone = torch.cat([sample(logits[i:i + 1], positions[i:i + 1], settings[r]) for i, r in enumerate(rows.tolist())])
    assert torch.equal(batched, alone)
    assert len(set(batched.tolist())) > 20  # the sampled rows really sample
