"""Continuous batching is lossless: every sequence's ids equal what it produces alone (greedy and seeded sampling,
fp32), whatever joins or leaves the batch: staggered arrivals, random prompt and output lengths, mixed sampling
parameters, inert padding rows, preemption when the pool runs out, cancellation. Drafters that really accept
(an oracle per row) make the batched round commit long paths, not only rejections."""
import random
from collections import Counter

import pytest
import torch
from conftest import make_engine, oracle_drafter, random_head

from nanojet.engine.engine import Engine, sequence_buckets
from nanojet.engine.kv_cache import Sequence
from nanojet.engine.request import Request, SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.engine.sampling import SamplingParams
from nanojet.engine.scheduler import Scheduler
from nanojet.model.config import ModelConfig

VOCAB = 320


def random_requests(seed: int, count: int, max_new: int = 30) -> list[Request]:
    """Prompts of 2..40 tokens, 4..max_new new tokens, each request greedy or sampled with its own seed, top-k,
    top-p and temperature."""
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        prompt = [rng.randrange(256) for _ in range(rng.randint(2, 40))]
        sampled = index % 2 == 1
        params = SamplingParams(temperature=rng.choice([0.7, 1.0]) if sampled else 0.0,
                                top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000),
                                max_new_tokens=rng.randint(4, max_new), ignore_eos=True)
        requests.append(Request(prompt, params))
    return requests


def batching(engine, spec: SpeculativeParams | None, requests: list[Request], max_num_seqs: int,
             step_tokens: int = 512) -> Scheduler:
    """The engine with a scheduler of its own for these requests, which all draft with `spec`."""
    engine.scheduler = Scheduler(engine.kv, max_num_seqs, step_tokens, engine.prefill_chunk)
    for request in requests:
        request.spec = spec
    return engine.scheduler


def run_staggered(engine, requests: list[Request], seed: int) -> None:
    """Add each request at a random step (several while others decode), then step until all have finished."""
    rng = random.Random(seed)
    arrivals = sorted(rng.randrange(12) for _ in requests)
    step = 0
    while not all(r.finished for r in requests):
        for request, arrival in zip(requests, arrivals):
            if arrival == step:
                engine.add(request)
        engine.step()
        step += 1


def install_row_oracles(monkeypatch, references: dict[int, list[int]], wrong_from_depth: int | None = None) -> None:
    """Each row of a batched round drafts the known continuation of the sequence it serves (conftest.oracle_drafter,
    row by row); `references` maps id(Sequence) to prompt + its plain output. Inert rows draft anything."""
    served = {}
    table = StaticRound.table

    def recording_table(self, sequences):
        served[id(self)] = [references.get(id(s), [0]) for s in sequences]
        return table(self, sequences)

    def draft_candidates(round_, pool, anchor, length, block_table, scratch=None):
        rows = [oracle_drafter(reference, VOCAB, wrong_from_depth=wrong_from_depth)(
            round_, pool, anchor[row:row + 1], length[row:row + 1], block_table)
            for row, reference in enumerate(served[id(round_)])]
        return tuple(torch.cat(parts) for parts in zip(*rows))  # (log-probs, tokens), each [S, D, width]

    monkeypatch.setattr(StaticRound, "table", recording_table)
    monkeypatch.setattr(StaticRound, "draft_candidates", draft_candidates)


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    head = random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2)
    return make_engine(hf_model_dir[0], page_size=4, head=head, max_model_len=128, num_pages=400)


@pytest.fixture(scope="module")
def alone(engine):
    """Plain decoding of each random request on its own (Engine.generate, batch of one)."""
    return [engine.generate(r.prompt_ids, r.params).token_ids for r in random_requests(0, 7)]


def all_pages_free(engine) -> bool:
    return sorted(engine.kv.free_pages) == list(range(engine.kv.num_pages))


@pytest.mark.parametrize("shape", [None, (8, 4), (24, 3)], ids=["ar", "budget8", "budget24"])
@pytest.mark.parametrize("drafter", ["head", "oracle", "right-to-depth-3"])
def test_batched_ids_equal_ids_alone(engine, alone, shape, drafter, monkeypatch):
    if shape is None and drafter != "head":
        pytest.skip("plain decoding drafts nothing")
    requests = random_requests(0, 7)
    if drafter != "head":
        install_row_oracles(monkeypatch, {id(r.sequence): r.prompt_ids + ids for r, ids in zip(requests, alone)},
                            wrong_from_depth=None if drafter == "oracle" else 3)
    spec = None if shape is None else SpeculativeParams(*shape)
    scheduler = batching(engine, spec, requests, max_num_seqs=4, step_tokens=48)  # prompts need several chunks
    run_staggered(engine, requests, seed=1)
    for request, expected in zip(requests, alone):
        assert request.output_ids == expected, (request.params, request.stats.accept_hist)
        assert request.stats.finish_reason == "length"
    assert all_pages_free(engine)
    assert scheduler.rounds < sum(r.stats.rounds for r in requests)  # sequences really shared rounds
    if drafter == "head" or shape is None:
        return
    longest = 8 if drafter == "oracle" else 3  # the head's block (7 drafts + the bonus), or right depths + bonus
    assert max(scheduler.accept_hist) == longest, scheduler.accept_hist
    assert scheduler.accept_hist[longest] > scheduler.rounds // 2  # not a lucky round: most sequences' paths


def test_preempted_sequences_recompute_losslessly(hf_model_dir, monkeypatch):
    """A pool too small for every admitted sequence's growth: the newest is preempted (pages freed, tokens kept)
    and resumes later with the very ids it would have produced alone."""
    head = random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2)
    engine = make_engine(hf_model_dir[0], page_size=4, head=head, max_model_len=128, num_pages=60)
    requests = random_requests(3, 6, max_new=60)
    alone = [engine.generate(r.prompt_ids, r.params).token_ids for r in requests]
    install_row_oracles(monkeypatch, {id(r.sequence): r.prompt_ids + ids for r, ids in zip(requests, alone)},
                        wrong_from_depth=5)
    scheduler = batching(engine, SpeculativeParams(16, 2), requests, max_num_seqs=6)
    tokens_at_preemption = []
    preempt = Scheduler.preempt

    def recording_preempt(self, request):
        tokens_at_preemption.append(len(request.output_ids))
        preempt(self, request)

    monkeypatch.setattr(Scheduler, "preempt", recording_preempt)
    engine.run(requests)
    assert scheduler.preemptions > 0 and max(tokens_at_preemption) > 1  # some lost decoded K/V, not only a prompt
    assert [r.output_ids for r in requests] == alone
    assert max(scheduler.accept_hist) == 5
    assert all_pages_free(engine)


def test_cancelled_request_frees_its_pages_and_others_continue(engine, alone):
    requests = random_requests(0, 3)
    scheduler = batching(engine, SpeculativeParams(8, 4), requests, max_num_seqs=4)
    for request in requests:
        engine.add(request)
    while len(requests[1].output_ids) < 2:
        engine.step()
    used = scheduler.kv_pages_used
    requests[1].cancel()
    engine.step()  # the next step drops it before its round
    assert requests[1].finished and requests[1].stats.finish_reason == "cancelled"
    assert requests[1].sequence.pages == [] and scheduler.kv_pages_used < used
    while engine.has_work:
        engine.step()
    assert [requests[0].output_ids, requests[2].output_ids] == [alone[0], alone[2]]
    assert all_pages_free(engine)


@torch.inference_mode()
def test_inert_rows_touch_only_their_idle_pages(engine):
    """A round of 4 rows with 1 live sequence: the 3 padding rows draft, verify and commit into the round's idle
    pages; every other page of the pool is left exactly as it was."""
    sequence = Sequence()
    engine.prefill(sequence, [5, 9, 200, 31, 7], extend_head=True)
    runner = engine.runner(SpeculativeParams(8, 4), True, 4)
    runner.round.begin(0, sequence, 11, SamplingParams(temperature=0.8, seed=4))
    for row in (1, 2, 3):
        runner.round.begin(row, None)
    engine.kv.pool[:, :, 100:].normal_()  # pages nobody owns hold recognisable values
    table = runner.round.table([sequence, None, None, None])
    written = set(sequence.pages) | set(runner.round.idle.pages)
    before = engine.kv.pool.clone()
    runner(table)
    changed = (engine.kv.pool != before).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()
    assert changed and set(changed) <= written
    runner.round.finish([sequence, None, None, None], [1, 0, 0, 0])
    engine.kv.free(sequence)
    assert all_pages_free(engine)


def test_sequence_buckets():
    assert sequence_buckets(1) == [1]
    assert sequence_buckets(6) == [1, 2, 4, 6]
    assert sequence_buckets(16) == [1, 2, 4, 8, 16]


def test_requests_that_cannot_fit_are_refused(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add(Request([]))
    with pytest.raises(ValueError, match="context holds 128"):
        engine.add(Request(list(range(128))))
    small = make_engine_like(engine, num_pages=4)
    with pytest.raises(ValueError, match="need 15 KV pages .* the KV pool has 4"):
        small.add(Request([1] * 20, SamplingParams(max_new_tokens=40)))
    assert not engine.has_work and not small.has_work  # nothing refused was queued


def make_engine_like(engine, num_pages: int):
    from nanojet.engine.engine import Engine
    from nanojet.engine.kv_cache import KVCache
    pool = engine.kv.pool
    cache = KVCache(pool.shape[0], pool.shape[4], pool.shape[5], num_pages, engine.kv.kv_page_size,
                    engine.kv.max_pages_per_sequence, pool.dtype, pool.device)
    return Engine(engine.target, cache, engine.max_model_len, [], engine.head)


def test_llm_generate_list_returns_outputs_in_order(hf_model_dir):
    from nanojet import LLM
    llm = LLM(hf_model_dir[0], device="cpu", max_model_len=96, max_num_seqs=3, kv_page_size=4)
    prompts = ["def f(x):", "import os", [5, 6, 7, 8, 9], "class A:", "x = 1"]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 9, 4, 12, 7)]
    params[1] = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=9, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, batched):
        single = llm.generate(prompt, p)
        assert (out.token_ids, out.text, out.prompt_token_ids) == (single.token_ids, single.text,
                                                                    single.prompt_token_ids)


def test_prefill_chunks_interleave_with_rounds_under_the_step_budget(engine, alone, monkeypatch):
    """Prompts prefill in chunks, several sequences per forward, in the same steps as rounds of the sequences
    already decoding, and never over the step's budget: 48 tokens minus the 8 tree nodes of each ready sequence,
    but at least a quarter of it."""
    steps = []  # per step: the chunks prefilled [(request, tokens)] and the sequences ready before them
    step, prefill = Engine.step, Engine._prefill

    def recording_step(self):
        steps.append({"chunks": [], "ready": None})
        step(self)

    def recording_prefill(self, chunks):
        steps[-1]["chunks"] = [(request, end - start) for request, start, end in chunks]
        prefill(self, chunks)

    monkeypatch.setattr(Engine, "step", recording_step)
    monkeypatch.setattr(Engine, "_prefill", recording_prefill)
    monkeypatch.setattr(Scheduler, "admit", lambda self, admit=Scheduler.admit: (
        admit(self), steps[-1].update(ready=sum(r.ready for r in self.running))))
    requests = random_requests(0, 7)
    batching(engine, SpeculativeParams(8, 4), requests, max_num_seqs=4, step_tokens=48)
    run_staggered(engine, requests, seed=1)
    assert [r.output_ids for r in requests] == alone
    for entry in steps:
        assert sum(n for _, n in entry["chunks"]) <= max(48 - 8 * entry["ready"], 12)
    assert any(len(entry["chunks"]) > 1 for entry in steps)  # several prompts in one forward
    assert any(entry["chunks"] and entry["ready"] for entry in steps)  # prefill in a step that also runs a round
    chunks_per_request = Counter(request.arrival for entry in steps for request, _ in entry["chunks"])
    assert max(chunks_per_request.values()) > 1  # a prompt split over several steps


def test_a_tight_pool_waits_preempts_or_refuses_but_never_fails_a_request(engine, alone):
    """The pool shrinks from ample to one page short of the largest request alone: at every size each request
    either completes with exactly its ids alone (waiting for pages or preempted on the way) or is refused up
    front by `Engine.check`; no admitted request ends in an error, and every page comes back."""
    spec = SpeculativeParams(8, 4)
    largest = max(engine.scheduler.pages(len(r.prompt_ids) + r.params.max_new_tokens - 1 + engine.scratch_slots(spec))
                  for r in random_requests(0, 7))
    for num_pages in (400, 4 * largest, 2 * largest, largest + 1, largest, largest - 1):
        small = make_engine_like(engine, num_pages=num_pages)
        small.scheduler = Scheduler(small.kv, max_num_seqs=7, step_tokens=48)
        admitted, expected = [], []
        for request, ids in zip(random_requests(0, 7), alone):
            request.spec = spec
            try:
                small.check(request)
            except ValueError as error:
                assert num_pages < largest + 1 and "KV pool has" in str(error)
                continue
            admitted.append(request)
            expected.append(ids)
        small.run(admitted)
        assert [r.output_ids for r in admitted] == expected, num_pages
        assert all(r.error is None for r in admitted) and all_pages_free(small)
        assert (len(admitted) == 7) == (num_pages >= largest), num_pages
