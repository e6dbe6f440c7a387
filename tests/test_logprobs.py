"""A logit bias changes what is generated and log-probs report the target's distribution, and neither breaks the
lossless property: speculative decoding emits exactly what plain decoding emits under the same bias (greedy and
seeded sampling, drafts rejected by a random head and accepted along whole paths by an oracle, alone and batched),
and the log-probs it returns are plain decoding's, which are log_softmax of a dense forward's raw logits."""
import contextlib

import pytest
import torch
from conftest import make_engine, oracle_drafter, random_head

from nanojet.engine.request import Request, SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.engine.sampling import SamplingParams
from nanojet.engine.scheduler import Scheduler
from nanojet.model.config import ModelConfig

PROMPT = [7, 3, 250, 19, 19, 4, 88, 1, 64, 2, 33]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=24, ignore_eos=True)
FAVOURED = 42  # a token the bias pushes up (this model's logits are flat: the top few lie within 0.2)


def with_(params: SamplingParams, **fields) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, **fields})


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    directory, _ = hf_model_dir
    return make_engine(directory, page_size=4, head=random_head(ModelConfig.from_dir(directory), seed=2),
                       max_model_len=128, num_pages=400)


@contextlib.contextmanager
def batching(engine, max_num_seqs: int):
    """The engine with a scheduler that runs up to `max_num_seqs` sequences together, while inside."""
    alone = engine.scheduler
    engine.scheduler = Scheduler(engine.kv, max_num_seqs, prefill_chunk=engine.prefill_chunk)
    try:
        yield
    finally:
        engine.scheduler = alone


def forbidding_bias(engine, params: SamplingParams) -> dict[int, float]:
    """Forbid (-100) every token the unbiased output holds, and favour one other a little: the biased output can
    share no token with the unbiased one."""
    unbiased = engine.generate(PROMPT, params).token_ids
    assert FAVOURED not in unbiased
    return {**{token: -100.0 for token in unbiased}, FAVOURED: 0.25}


def install_oracle(monkeypatch, reference: list[int]) -> None:
    monkeypatch.setattr(StaticRound, "draft_candidates", oracle_drafter(reference, 320))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("drafter", ["head", "oracle"])
@pytest.mark.parametrize("budget", [8, 64])
def test_a_logit_bias_changes_the_output_and_speculation_emits_the_same(engine, params, drafter, budget, monkeypatch):
    """The oracle drafts the biased plain output, so whole paths are accepted: a round whose tree rows chose
    without the bias would reject them and emit the unbiased tokens."""
    bias = forbidding_bias(engine, params)
    biased = with_(params, logit_bias=bias)
    plain = engine.generate(PROMPT, biased).token_ids
    assert not set(plain) & {t for t, b in bias.items() if b < 0}
    if drafter == "oracle":
        install_oracle(monkeypatch, PROMPT + plain)
    spec = engine.generate(PROMPT, biased, SpeculativeParams(budget=budget, width=4))
    assert spec.token_ids == plain
    if drafter == "oracle":
        assert max(spec.stats.accept_hist) == 8, spec.stats.accept_hist  # the head's block: 7 drafts + the bonus


@pytest.mark.parametrize("spec", [None, SpeculativeParams(8, 4)], ids=["plain", "speculative"])
def test_biased_and_unbiased_requests_batched_equal_each_alone(engine, spec):
    """One biased round serves them all: a row without a bias (zeros) is unchanged, each biased row gets its own."""
    requests = [Request(PROMPT, with_(GREEDY, logit_bias=forbidding_bias(engine, GREEDY))),
                Request(PROMPT[2:], SAMPLED),
                Request(PROMPT[:7], with_(SAMPLED, logit_bias={FAVOURED: 100.0, 5: -3.5})),
                Request(PROMPT[1:], GREEDY)]
    alone = [engine.generate(r.prompt_ids, r.params).token_ids for r in requests]
    assert alone[2] == [FAVOURED] * 24 and alone[0] != engine.generate(PROMPT, GREEDY).token_ids
    with batching(engine, 4):
        batched = engine.run([Request(r.prompt_ids, r.params, spec) for r in requests])
    assert [r.output_ids for r in batched] == alone
    assert (None if spec is None else (8, 4, None), True, 4, True, None) in engine._runners


def dense_logprobs(target, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the raw logits that chose each output token `[len(output), V]`, from one dense forward."""
    with torch.no_grad():
        hidden, _ = target.forward_dense(torch.tensor([prompt + output[:-1]]))
        return torch.log_softmax(target.logits(hidden[0, len(prompt) - 1:]), dim=-1)


def assert_logprobs_equal(got, expected, ids: list[int], top: int) -> None:
    """Same tokens, same alternatives, values within fp32 rounding (a tree's verify and a one-token step round
    their products differently in the last bits)."""
    assert [e.token_id for e in got] == [e.token_id for e in expected] == ids
    assert [[i for i, _ in e.top] for e in got] == [[i for i, _ in e.top] for e in expected]
    assert all(len(e.top) == top for e in got)
    for a, b in zip(got, expected):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, with_(SAMPLED, logit_bias={FAVOURED: 3.0, 193: -100.0})],
                         ids=["greedy", "sampled", "sampled-biased"])
@pytest.mark.parametrize("drafter", ["head", "oracle"])
def test_logprobs_are_the_raw_distribution_with_and_without_speculation(engine, params, drafter, monkeypatch):
    """The emitted tokens' log-probs and top alternatives: plain decoding's equal log_softmax of a dense forward's
    raw logits (before bias, temperature and top-p), and speculation returns the same, also on accepted paths."""
    params = with_(params, logprobs=3)
    plain = engine.generate(PROMPT, params)
    ids = plain.token_ids
    dense = dense_logprobs(engine.target, PROMPT, ids)
    for position, (entry, row) in enumerate(zip(plain.logprobs, dense)):
        assert entry.logprob == pytest.approx(row[ids[position]].item(), abs=1e-5)
        values, top_ids = row.topk(3)
        assert [i for i, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    if params.logit_bias:  # the favoured token is chosen where the raw distribution does not rank it first
        assert any(e.token_id == FAVOURED and e.top[0][0] != FAVOURED for e in plain.logprobs)
    if drafter == "oracle":
        install_oracle(monkeypatch, PROMPT + ids)
    spec = engine.generate(PROMPT, params, SpeculativeParams(budget=16, width=2))
    assert_logprobs_equal(spec.logprobs, plain.logprobs, ids, 3)
    if drafter == "oracle":
        assert max(spec.stats.accept_hist) == 8


def test_logprob_counts_batched_equal_each_alone(engine):
    """Requests asking for none, 0, 2 and 5 alternatives share a round (it computes 5 for every row); each gets
    what it asked for, as alone."""
    counts = [None, 0, 2, 5]
    requests = [Request(PROMPT[i:], with_(SAMPLED if i % 2 else GREEDY, logprobs=k, max_new_tokens=10 + 3 * i))
                for i, k in enumerate(counts)]
    spec = SpeculativeParams(8, 4)
    alone = [engine.generate(r.prompt_ids, r.params, spec) for r in requests]
    with batching(engine, 4):
        batched = engine.run([Request(r.prompt_ids, r.params, spec) for r in requests])
    assert batched[0].logprobs is None and alone[0].logprobs is None
    assert [r.output_ids for r in batched] == [a.token_ids for a in alone]
    for request, one, count in zip(batched[1:], alone[1:], counts[1:]):
        assert_logprobs_equal(request.logprobs, one.logprobs, one.token_ids, count)
        assert len(request.logprobs) == len(request.output_ids)


def test_the_llm_returns_logprobs_and_checks_the_bias(hf_model_dir):
    from nanojet.llm import LLM
    llm = LLM(hf_model_dir[0], device="cpu", max_model_len=128)
    out = llm.generate("def f(x):", SamplingParams(max_new_tokens=6, logprobs=2, ignore_eos=True))
    assert [e.token_id for e in out.logprobs] == out.token_ids and all(len(e.top) == 2 for e in out.logprobs)
    assert all(e.logprob <= e.top[0][1] <= 0 for e in out.logprobs)
    batch = llm.generate(["def f(x):", "import os"], SamplingParams(max_new_tokens=4, logit_bias={FAVOURED: 100}))
    assert [o.token_ids for o in batch] == [[FAVOURED] * 4] * 2 and batch[0].logprobs is None
    with pytest.raises(ValueError, match=r"logit_bias token id 320 is outside the vocabulary \(0\.\.319\)"):
        llm.generate("x", SamplingParams(max_new_tokens=2, logit_bias={320: 1.0}))
