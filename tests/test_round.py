"""The round (docs/architecture.md), the one implementation, against a from-scratch dense reference: plain decoding
recomputed densely token by token (conftest.dense_reference). Drafters of known quality make the round accept
what it should, so commit, head context and bonus tokens are exercised on long paths, not only on rejections."""
import pytest
import torch
from conftest import dense_reference, make_engine, oracle_drafter, random_head

from nanojet.engine.engine import causal_visibility
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.engine.sampling import SamplingParams
from nanojet.kernels.reference import pack_visibility
from nanojet.model.config import ModelConfig

PROMPT = [7, 3, 250, 19, 19, 4, 88, 1, 64, 2, 33]  # 11 tokens: crosses KV pages of 4
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=5, max_new_tokens=24, ignore_eos=True)
# (budget, width, depth): None is plain decoding; 3 nodes pad to bucket 4, 50 to 64; a depth limit shortens paths.
SHAPES = [None, (3, 2, None), (8, 4, None), (50, 4, None), (16, 2, 3)]


@pytest.fixture(scope="module")
def setup(hf_model_dir):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), seed=2)
    engine = make_engine(directory, page_size=4, head=head)
    expected = {p.temperature: dense_reference(engine.target, PROMPT, p, p.max_new_tokens) for p in (GREEDY, SAMPLED)}
    return engine, expected


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("drafter", ["head", "oracle", "right-to-depth-2"])
def test_round_equals_dense_reference(setup, params, shape, drafter, monkeypatch):
    engine, expected = setup
    expected = expected[params.temperature]
    spec = None if shape is None else SpeculativeParams(*shape)
    if drafter != "head":
        if spec is None:
            pytest.skip("plain decoding drafts nothing")
        wrong = None if drafter == "oracle" else 3
        monkeypatch.setattr(StaticRound, "draft_candidates", oracle_drafter(PROMPT + expected, 320,
                                                                          wrong_from_depth=wrong))
    out = engine.generate(PROMPT, params, spec)
    assert out.token_ids == expected
    assert sorted(engine.kv.free_pages) == list(range(engine.kv.num_pages))  # every page came back
    if drafter == "head":
        return
    # The longest path the tree allows (depth limit, block size, budget), or the drafter's right depths + bonus.
    longest = StaticRound(engine.target, engine.head, engine.kv, spec, not params.greedy).path_len
    if drafter != "oracle":
        longest = min(longest, 3)
    assert max(out.stats.accept_hist) == longest, out.stats.accept_hist
    # Every round but the last (cut by max_new_tokens) accepts the longest path the drafter allows.
    assert out.stats.accept_hist[longest] >= out.stats.rounds - 1


def test_causal_visibility_words_equal_the_packed_mask():
    for count in (1, 5, 31, 32, 33, 64, 100):
        expected = pack_visibility(torch.ones(count, count, dtype=torch.bool).tril())
        assert torch.equal(causal_visibility(count, torch.device("cpu")), expected), count


class HostTraffic(torch.overrides.TorchFunctionMode):
    """Counts what the round's Python makes the host do: tensors built from host data (a pageable copy to the
    device on a GPU) and reads of device values (a sync on a GPU). The pool kernels' torch references read
    lengths on the host by design (the Triton kernels do not), and so does the plan they share within a forward
    (`reference.plan_forward`, `plan_context`, built on that path only), so their insides are not counted."""
    READS = {"tolist", "item", "__bool__", "__int__", "__index__", "__float__"}

    def __init__(self):
        super().__init__()
        self.built_from_host, self.reads, self.in_kernel = [], 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.in_kernel:
            if name in ("tensor", "as_tensor") and args and not isinstance(args[0], torch.Tensor):
                self.built_from_host.append(name)
            self.reads += name in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [{}, {"logit_bias": {5: 1.5, 40: -100.0}, "logprobs": 3}],
                         ids=["", "biased-logprobs"])
@pytest.mark.parametrize("shape", [None, (8, 4, None)], ids=["plain", "speculative"])
def test_a_round_builds_nothing_from_host_data_and_reads_once(setup, shape, extra, monkeypatch):
    """Counted from the second generation on: building a round (once per shape) copies its constants. The
    log-prob words travel in the outcome's one read; the bias reaches the round through staging rows."""
    from nanojet.engine.engine import Engine
    from nanojet.kernels import reference
    engine, _ = setup
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=40, ignore_eos=True, **extra)
    spec = None if shape is None else SpeculativeParams(*shape)
    engine.generate(PROMPT, params, spec)
    traffic = HostTraffic()
    for name in ("paged_attention", "store_kv", "move_kv", "plan_forward", "plan_context"):
        def wrapped(*args, _kernel=getattr(reference, name), **kwargs):
            traffic.in_kernel += 1
            try:
                return _kernel(*args, **kwargs)
            finally:
                traffic.in_kernel -= 1
        monkeypatch.setattr(reference, name, wrapped)
    original_round = Engine._round

    def watched_round(self, *args):
        with traffic:
            return original_round(self, *args)

    monkeypatch.setattr(Engine, "_round", watched_round)
    out = engine.generate(PROMPT, params, spec)
    assert traffic.built_from_host == []
    assert traffic.reads == out.stats.rounds  # the outcome read, once per round


@pytest.fixture(scope="module")
def head_dir(hf_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("head")
    random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=2).save(directory)
    return directory


@pytest.mark.parametrize("budget,compile", [(3, False), (100, False), (300, False), (300, True)],
                         ids=["3-eager", "100-eager", "300-eager", "300-compiled"])
def test_page_table_holds_every_budget_at_the_context_limit(hf_model_dir, head_dir, budget, compile, monkeypatch):
    """LLM sizes the page table from what a round reserves (the padded tree bucket, not the budget): a request
    exactly as long as the context runs to its end with long accepted paths, for budgets that pad 3 -> 4,
    100 -> 128 and 300 -> 512 nodes. Compiled rounds share the host side (`StaticRound.table`); one compiled
    budget (the largest bucket) keeps CI's compile time down."""
    from nanojet.llm import LLM
    directory, _ = hf_model_dir
    prompt, new_tokens = list(range(3, 3 + 37)), 29
    llm = LLM(directory, head=head_dir, device="cpu", max_model_len=len(prompt) + new_tokens, max_tree_nodes=budget,
              kv_page_size=4, compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    expected = dense_reference(llm.model, prompt, params, new_tokens)
    monkeypatch.setattr(StaticRound, "draft_candidates", oracle_drafter(prompt + expected, 320))
    out = llm.generate(prompt, params, SpeculativeParams(budget=budget, width=4))
    assert out.token_ids == expected and out.stats.finish_reason in ("length", "context")
    assert max(out.stats.accept_hist) >= 3
    assert sorted(llm.kv_cache.free_pages) == list(range(llm.kv_cache.num_pages))


GRAPH_KEY_RUNS = [  # consecutive generations of one engine; each changes one thing a round is built for
    (SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_new_tokens=16, ignore_eos=True), (8, 4, None)),
    (SamplingParams(temperature=0.8, top_p=0.5, seed=5, max_new_tokens=16, ignore_eos=True), (8, 4, None)),
    (SamplingParams(temperature=0.8, top_p=0.5, top_k=3, seed=5, max_new_tokens=16, ignore_eos=True), (8, 4, None)),
    (SamplingParams(temperature=1.7, top_p=0.5, top_k=3, seed=5, max_new_tokens=16, ignore_eos=True), (8, 4, None)),
    (SamplingParams(temperature=1.7, top_p=0.5, top_k=3, seed=6, max_new_tokens=16, ignore_eos=True), (8, 4, None)),
    (SamplingParams(temperature=1.7, top_p=0.5, top_k=3, seed=6, max_new_tokens=16, ignore_eos=True), (16, 2, 3)),
    (SamplingParams(max_new_tokens=16, ignore_eos=True), (16, 2, 3)),
    (SamplingParams(max_new_tokens=16, ignore_eos=True), (16, 2, None)),  # only the depth limit changes
    (SamplingParams(max_new_tokens=16, ignore_eos=True), (16, 1, None)),  # only the width changes
]


def check_graph_keys(engine, monkeypatch, runs=GRAPH_KEY_RUNS) -> None:
    """Each run equals the dense reference with its own parameters: a round reused across a change it is built
    for (a runner key missing a field) would sample with the old parameters or shape."""
    for params, shape in runs:
        expected = dense_reference(engine.target, PROMPT, params, params.max_new_tokens)
        monkeypatch.setattr(StaticRound, "draft_candidates", oracle_drafter(PROMPT + expected, 320))
        out = engine.generate(PROMPT, params, SpeculativeParams(*shape))
        assert out.token_ids == expected, (params, shape)
        assert max(out.stats.accept_hist) == min(8, (shape[2] or 7) + 1), out.stats.accept_hist


def test_round_keys_follow_every_sampling_and_tree_change(hf_model_dir, monkeypatch):
    directory, _ = hf_model_dir
    check_graph_keys(make_engine(directory, page_size=4, head=random_head(ModelConfig.from_dir(directory), seed=2)),
                     monkeypatch)
