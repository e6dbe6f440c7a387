"""Speculative decoding is lossless (same ids as plain decoding, greedy and seeded sampling) and accepts what it
should: an oracle drafter that knows the plain output must have every draft accepted."""
import pytest
import torch
from conftest import make_engine, oracle_drafter, random_head

from nanojet.engine.request import SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=40, ignore_eos=True)
PROMPT = [7, 3, 250, 19, 19, 4, 88, 1, 64, 2, 33]  # 11 tokens: crosses KV pages of 4


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "bidirectional"])
def engine(request, hf_model_dir):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), causal=request.param, seed=2)
    return make_engine(directory, page_size=4, head=head)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "top-p"])
@pytest.mark.parametrize("budget", [2, 8, 64, 300])
@pytest.mark.parametrize("width", [1, 4])
def test_random_head_is_lossless(engine, params, budget, width):
    """A fuzz: a random head's drafts are mostly rejected, so this exercises rejection paths and tree shapes;
    the drafter tests below are what exercise acceptance. Budgets up to 64 build their trees from the candidate
    table, 300 at width 4 by the beam search (nanojet/engine/candidates.py)."""
    plain = engine.generate(PROMPT, params).token_ids
    spec = engine.generate(PROMPT, params, SpeculativeParams(budget=budget, width=width))
    assert spec.token_ids == plain


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "top-p"])
@pytest.mark.parametrize("budget", [2, 8, 64, 256])
@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("right_depths", [7, 4, 1])
def test_drafts_right_to_a_depth_are_accepted_to_that_depth(hf_model_dir, monkeypatch, params, budget, width,
                                                            right_depths):
    """A drafter right at depths 1..right_depths (wrong below) is lossless and accepts exactly that far, as far
    as the tree reaches: the best-scored chain of `budget` nodes (the right tokens score 0, the rest -30)."""
    directory, _ = hf_model_dir
    engine = make_engine(directory, page_size=4, head=random_head(ModelConfig.from_dir(directory), seed=2))
    plain = engine.generate(PROMPT, params).token_ids
    install_oracle(monkeypatch, engine, PROMPT + plain, wrong_from_depth=right_depths + 1)
    spec = engine.generate(PROMPT, params, SpeculativeParams(budget=budget, width=width))
    assert spec.token_ids == plain
    reach = min(right_depths, budget - 1)  # the zero-score chain comes first; budget - 1 nodes past the anchor
    assert max(spec.stats.accept_hist) == reach + 1, spec.stats.accept_hist
    assert spec.stats.accept_hist[reach + 1] >= spec.stats.rounds - 1  # the last round may be cut short


def install_oracle(monkeypatch, engine, reference: list[int], **kwargs):
    """Draft from the plain-decoding continuation instead of the head (see conftest.oracle_drafter)."""
    monkeypatch.setattr(StaticRound, "draft_candidates",
                        oracle_drafter(reference, engine.target.config.vocab_size, **kwargs))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "top-p"])
def test_oracle_drafts_are_all_accepted(hf_model_dir, params, monkeypatch):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory))
    engine = make_engine(directory, page_size=4, head=head)
    plain = engine.generate(PROMPT, params).token_ids
    install_oracle(monkeypatch, engine, PROMPT + plain)
    spec = engine.generate(PROMPT, params, SpeculativeParams(budget=16, width=2))
    assert spec.token_ids == plain
    # Block 8: every round emits 7 drafted tokens + the bonus, until max_new_tokens cuts the last one.
    assert spec.stats.accept_hist[8] == spec.stats.rounds == -(-(40 - 1) // 8)
    # A drafter one position off is still lossless but accepts little: the test above tells them apart.
    install_oracle(monkeypatch, engine, PROMPT + plain, shift=1)
    shifted = engine.generate(PROMPT, params, SpeculativeParams(budget=16, width=2))
    assert shifted.token_ids == plain and shifted.stats.accept_len < 3  # (repeats in the text match by luck)


def test_eos_and_max_tokens_inside_an_accepted_path(hf_model_dir, monkeypatch):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory))
    engine = make_engine(directory, page_size=4, head=head)
    plain = engine.generate(PROMPT, GREEDY).token_ids
    install_oracle(monkeypatch, engine, PROMPT + plain)
    eos = plain[12]  # the 13th generated token: in the middle of the second round's path
    engine.eos_token_ids = {eos}
    stop_at = plain.index(eos) + 1
    spec = engine.generate(PROMPT, SamplingParams(max_new_tokens=40), SpeculativeParams(budget=16, width=2))
    assert spec.token_ids == plain[:stop_at] and spec.stats.finish_reason == "eos"
    engine.eos_token_ids = set()
    spec = engine.generate(PROMPT, SamplingParams(max_new_tokens=11, ignore_eos=True),
                           SpeculativeParams(budget=16, width=2))
    assert spec.token_ids == plain[:11] and spec.stats.finish_reason == "length"


def test_head_context_cache_equals_recomputation(hf_model_dir, monkeypatch):
    """After many multi-token rounds, the head's cached context K/V equal a from-scratch projection of the
    target's taps over the whole committed sequence."""
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory))
    engine = make_engine(directory, page_size=4, head=head)
    plain = engine.generate(PROMPT, GREEDY).token_ids
    install_oracle(monkeypatch, engine, PROMPT + plain)
    captured = {}
    original_free = engine.kv.free

    def capture_then_free(sequence):
        captured["pool"] = engine.kv.pool.clone()
        captured["slots"] = engine.kv.slots(sequence, 0, sequence.length)
        original_free(sequence)

    engine.kv.free = capture_then_free
    out = engine.generate(PROMPT, GREEDY, SpeculativeParams(budget=16, width=2))
    committed = PROMPT + out.token_ids[:-1]  # the last emitted token is the anchor: no KV yet
    # The final round may hold K/V for accepted tokens that max_new_tokens cut off; compare what was emitted.
    assert len(captured["slots"]) >= len(committed)
    captured["slots"] = captured["slots"][:len(committed)]
    with torch.no_grad():
        _, taps = engine.target.forward_dense(torch.tensor([committed]), tap_layers=tuple(head.config.target_layer_ids))
        context = head.project_context(taps[0])
        positions = torch.arange(len(committed))
        for index, layer in enumerate(head.layers):
            k, v = layer.self_attn.project_kv(context, positions, head.inv_freq)
            cached = captured["pool"][engine.num_target_layers + index].view(2, -1, *k.shape[1:])
            torch.testing.assert_close(cached[0, captured["slots"]], k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached[1, captured["slots"]], v, atol=1e-5, rtol=1e-5)
