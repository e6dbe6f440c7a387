"""The round's drafter and the draft vocabulary: each depth's top-width candidates are those of the head's full
log-softmax (restricted to the draft vocabulary when the head has one, with ids mapped back to the target's),
the vocabulary is chosen by frequency and round-trips through the head folder, and decoding stays lossless."""
import pytest
import torch
from conftest import draft_after, make_engine, random_head

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.round import StaticRound
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig
from nanojet.model.draft_vocab import (
    FILE_NAME,
    load_draft_vocab,
    save_draft_vocab,
    select_draft_vocab,
)
from nanojet.model.head import load_head

PROMPT = [4, 8, 15, 16, 23, 42, 100, 7, 9, 200, 3, 5, 1]
VOCAB = 320


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    head = random_head(ModelConfig.from_dir(hf_model_dir[0]), seed=5)
    return make_engine(hf_model_dir[0], page_size=4, head=head)


def candidates_after(engine, sequence, anchor: int, width: int, depth: int | None = None):
    round_ = StaticRound(engine.target, engine.head, engine.kv, SpeculativeParams(budget=64, width=width, depth=depth),
                         False)
    round_.begin(0, sequence, anchor)
    table = round_.table([sequence])
    logprobs, tokens = round_.draft_candidates(engine.kv.pool, round_.anchor, round_.length, table)
    return logprobs[0], tokens[0]


@pytest.mark.parametrize("subset", [None, "even ids"])
def test_candidates_are_the_top_of_the_full_log_softmax(engine, subset):
    """Log-probs = logit - logsumexp over the (draft) vocabulary, tokens in target ids, only the depths the tree
    can reach; with a draft vocabulary, the same as renormalising the full distribution over it."""
    vocab = None if subset is None else torch.arange(0, VOCAB, 2)
    engine.head.draft_vocab = vocab
    try:
        sequence = Sequence()
        with torch.no_grad():
            anchor = int(engine.prefill(sequence, PROMPT, extend_head=True).argmax(-1)[0])
            full = draft_after(engine, sequence, anchor)  # [B-1, V]
            logprobs, tokens = candidates_after(engine, sequence, anchor, width=5, depth=4)
        engine.kv.free(sequence)
    finally:
        engine.head.draft_vocab = None
    if vocab is not None:
        full = torch.log_softmax(full[:, vocab], dim=-1)  # renormalised over the draft vocabulary
    expected_logprobs, expected_index = full[:4].topk(5, dim=-1)
    expected_tokens = expected_index if vocab is None else vocab[expected_index]
    assert logprobs.shape == tokens.shape == (4, 5)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)


def test_a_draft_vocabulary_head_is_lossless_and_drafts_only_its_tokens(engine, monkeypatch):
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=24, ignore_eos=True)
    plain = engine.generate(PROMPT, params).token_ids
    vocab = torch.tensor(sorted(set(PROMPT + plain[:12])))  # the continuation's first half only
    drafted = []
    original = StaticRound.draft_candidates

    def recording(self, *args):
        logprobs, tokens = original(self, *args)
        drafted.append(tokens)
        return logprobs, tokens

    monkeypatch.setattr(StaticRound, "draft_candidates", recording)
    engine.head.draft_vocab = vocab
    try:
        out = engine.generate(PROMPT, params, SpeculativeParams(budget=16, width=4))
    finally:
        engine.head.draft_vocab = None
    assert out.token_ids == plain
    assert set(torch.cat(drafted).flatten().tolist()) <= set(vocab.tolist())


def test_width_above_the_draft_vocabulary_is_refused(engine):
    engine.head.draft_vocab = torch.tensor([1, 2, 3])
    try:
        with pytest.raises(ValueError, match="draft vocabulary"):
            StaticRound(engine.target, engine.head, engine.kv, SpeculativeParams(budget=8, width=4), False)
    finally:
        engine.head.draft_vocab = None


def test_selection_takes_the_most_frequent_ids_and_the_forced_ones():
    data = [5, 5, 5, 7, 7, 9, 9, 2, 11]
    assert select_draft_vocab(data, 16, 3).tolist() == [5, 7, 9]  # 7 and 9 tie; both fit
    assert select_draft_vocab(data, 16, 2).tolist() == [5, 7]  # a tie goes to the lower id
    assert select_draft_vocab(data, 16, 3, always=[15]).tolist() == [5, 7, 15]
    assert select_draft_vocab(data, 16, 16).tolist() == [2, 5, 7, 9, 11]  # ids never seen are not taken
    with pytest.raises(ValueError, match="size"):
        select_draft_vocab(data, 16, 0)
    with pytest.raises(ValueError, match="token ids"):
        select_draft_vocab([16], 16, 4)


def test_the_vocabulary_file_round_trips_and_old_loaders_ignore_it(tmp_path, hf_model_dir):
    config = ModelConfig.from_dir(hf_model_dir[0])
    head = random_head(config, seed=3)
    head.save(tmp_path)
    assert load_head(tmp_path, config, torch.float32, torch.device("cpu")).draft_vocab is None
    save_draft_vocab(tmp_path, torch.tensor([3, 8, 300]))
    loaded = load_head(tmp_path, config, torch.float32, torch.device("cpu"))
    assert loaded.draft_vocab.tolist() == [3, 8, 300]
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == ["model.safetensors"]  # weights only
    loaded.save(tmp_path / "again")  # a loaded head saves its vocabulary with it
    assert load_draft_vocab(tmp_path / "again", config.vocab_size).tolist() == [3, 8, 300]
    save_draft_vocab(tmp_path, torch.tensor([8, 3]))
    with pytest.raises(ValueError, match="ascending"):
        load_head(tmp_path, config, torch.float32, torch.device("cpu"))
    (tmp_path / FILE_NAME).write_text('{"ids": [1]}')
    with pytest.raises(ValueError, match="token_ids"):
        load_head(tmp_path, config, torch.float32, torch.device("cpu"))


def test_train_head_writes_the_most_frequent_tokens_of_its_data(tmp_path, hf_model_dir):
    from test_train_head import train_args, write_data

    from nanojet.tokenizer import Tokenizer
    from nanojet.tools import train_head
    from nanojet.train.data import load_corpus
    directory = hf_model_dir[0]
    data = write_data(tmp_path / "data.jsonl")
    out = train_head.train(train_args(directory, tmp_path / "head", data, draft_vocab=6))
    tokenizer = Tokenizer.from_dir(directory)
    stream = load_corpus(str(data), tokenizer, directory, False, "cpu")
    expected = select_draft_vocab(stream, VOCAB, 6, always=tokenizer.eos_token_ids)
    assert load_draft_vocab(out, VOCAB).tolist() == expected.tolist()
    assert set(tokenizer.eos_token_ids) <= set(expected.tolist()) and len(expected) == 6


def test_set_draft_vocab_script_writes_and_removes_a_vocabulary(tmp_path):
    """scripts/set_draft_vocab.py gives an existing head the corpus's most frequent tokens (EOS included), the head
    loads with them, --none removes them, and bad input is one line and exit 2."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from nanojet.llm import DEFAULT_MODEL
    root = Path(__file__).resolve().parent.parent
    head_dir = tmp_path / "head"
    shutil.copytree(DEFAULT_MODEL / "head-causal", head_dir)
    (head_dir / FILE_NAME).unlink(missing_ok=True)

    def run(*args):
        return subprocess.run([sys.executable, str(root / "scripts/set_draft_vocab.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=tmp_path)
    done = run(head_dir, "--size", 64)
    assert done.returncode == 0, done.stderr
    target = ModelConfig.from_dir(DEFAULT_MODEL)
    vocab = load_draft_vocab(head_dir, target.vocab_size)
    assert vocab.numel() == 64 and target.eos_token_ids[0] in vocab.tolist()
    head = load_head(head_dir, target, torch.float32, torch.device("cpu"))
    assert torch.equal(head.draft_vocab, vocab)
    assert run(head_dir, "--none").returncode == 0 and load_draft_vocab(head_dir, target.vocab_size) is None
    for bad in ([tmp_path / "missing", "--size", 8], [head_dir, "--size", 0], [head_dir, "--size", 10**6],
                [head_dir, "--size", 8, "--data", tmp_path / "missing.jsonl"]):
        failed = run(*bad)
        assert failed.returncode == 2 and "error" in failed.stderr.strip().splitlines()[-1], failed.stderr
        assert "Traceback" not in failed.stderr
