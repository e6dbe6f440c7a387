"""Log-probs and logit_bias through `python -m nanojet.serve` (speculative, with the embedded model's head) and
the official `openai` client: both endpoints, whole and streamed, in OpenAI's shapes, equal to what plain decoding
in process returns for the same request (the lossless property through the server); out-of-range values are 400s
that name the field. Skipped where the `serve` extra is not installed."""
import json

import pytest
from serve_helpers import MODEL, client, http, start_server

from nanojet.engine.sampling import SamplingParams

openai = pytest.importorskip("openai")

PROMPT = "def parse(line):"
MESSAGES = [{"role": "user", "content": "Write a function that reverses a list."}]


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--max-num-seqs", "4", "--max-model-len", "256")
    yield url
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def plain():
    """The embedded model decoding plainly in this process: the reference the server's answers must equal."""
    from nanojet.llm import DEFAULT_MODEL, LLM
    return LLM(DEFAULT_MODEL, head=None, device="cpu", max_model_len=256)


def chat_ids(llm) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(MESSAGES, enable_thinking=False))


def generate(llm, ids: list[int], **fields):
    return llm.generate(ids, SamplingParams(**{"ignore_eos": True, **fields}))


def test_completion_logprobs_whole_and_streamed(server, plain):
    api = client(server)
    done = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    choice, logprobs = done.choices[0], done.choices[0].logprobs
    expected = generate(plain, plain.tokenizer.encode(PROMPT), max_new_tokens=12, logprobs=3)
    assert choice.text == expected.text and "".join(logprobs.tokens) == choice.text
    assert logprobs.tokens == [plain.tokenizer.decode([e.token_id]) for e in expected.logprobs]
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(12)]
    for top, entry in zip(logprobs.top_logprobs, expected.logprobs):
        alternatives = {plain.tokenizer.decode([i]): value for i, value in entry.top}
        assert set(top) == set(alternatives) | {plain.tokenizer.decode([entry.token_id])}  # greedy: one of the 3
        assert [top[t] for t in alternatives] == pytest.approx(list(alternatives.values()), abs=1e-5)
    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                         stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks]
    assert sum((s.tokens for s in streamed), []) == logprobs.tokens
    assert sum((s.token_logprobs for s in streamed), []) == logprobs.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == logprobs.text_offset
    assert all("".join(s.tokens) == c.choices[0].text for s, c in zip(streamed, chunks))


def test_chat_logprobs_whole_and_streamed(server, plain):
    api = client(server)
    done = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = done.choices[0].logprobs.content
    expected = generate(plain, chat_ids(plain), max_new_tokens=10, logprobs=2)
    assert "".join(t.token for t in content) == done.choices[0].message.content == expected.text
    assert all(bytes(t.bytes) == t.token.encode() and len(t.top_logprobs) == 2 for t in content)
    assert [t.logprob for t in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert [[a.token for a in t.top_logprobs] for t in content] == [
        [plain.tokenizer.decode([i]) for i, _ in e.top] for e in expected.logprobs]
    chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [t for c in chunks[1:] for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    whole = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert whole.choices[0].logprobs is None  # not asked


def test_sampled_choices_and_a_stop_string(server, plain):
    """n = 2 sampled choices each carry their own seed's log-probs; a stop string drops the tokens after it."""
    api = client(server)
    ids = plain.tokenizer.encode(PROMPT)
    two = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=7, n=2, logprobs=1,
                                 extra_body={"ignore_eos": True})
    for i, choice in enumerate(two.choices):
        expected = generate(plain, ids, max_new_tokens=8, temperature=0.9, seed=7 + i, logprobs=1)
        assert choice.text == expected.text
        assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    text = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert text.index("\n") > 0  # the answer's first line ends before its last token
    stopped = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["\n"],
                                     logprobs=0).choices[0]
    tokens = stopped.logprobs.tokens
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.index("\n")]
    assert "".join(tokens).startswith(stopped.text) and stopped.logprobs.text_offset[-1] < len(stopped.text)
    assert len("".join(tokens)) <= len(stopped.text) + 1  # the newline's token at most, none after it


def test_the_stop_token_has_no_logprob_entry(server):
    """The generation that ends at <|endoftext|> after 3 tokens (test_serve.py): two tokens of text, two entries."""
    body = {"model": MODEL, "prompt": "import os", "max_tokens": 16, "temperature": 1, "seed": 43, "logprobs": 1}
    status, _, raw = http(f"{server}/v1/completions", json.dumps(body).encode())
    done = json.loads(raw)
    assert status == 200 and done["usage"]["completion_tokens"] == 3, done
    logprobs = done["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 2 and "".join(logprobs["tokens"]) == done["choices"][0]["text"]


def test_logit_bias_changes_the_answer_as_in_plain_decoding(server, plain):
    """Token ids arrive as strings. Forbidding every token of the unbiased greedy answer changes it; the server's
    speculative answer equals plain decoding with the same bias, on both endpoints."""
    api = client(server)
    for ids, create in ((plain.tokenizer.encode(PROMPT), lambda **f: api.completions.create(prompt=PROMPT, **f)),
                        (chat_ids(plain), lambda **f: api.chat.completions.create(messages=MESSAGES, **f))):
        unbiased = generate(plain, ids, max_new_tokens=12)
        bias = {token: -100.0 for token in unbiased.token_ids}
        expected = generate(plain, ids, max_new_tokens=12, logit_bias=bias)
        done = create(model=MODEL, max_tokens=12, temperature=0, logit_bias={str(t): b for t, b in bias.items()},
                      extra_body={"ignore_eos": True}).choices[0]
        text = done.text if hasattr(done, "text") else done.message.content
        assert text == expected.text != unbiased.text
    forced = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, logprobs=0,
                                    logit_bias={"64": 100}, extra_body={"ignore_eos": True}).choices[0]
    assert forced.logprobs.tokens == [plain.tokenizer.decode([64])] * 5
    assert max(forced.logprobs.token_logprobs) < -1  # the raw distribution, before the bias


@pytest.mark.parametrize("endpoint, fields, param", [
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"logprobs": 2, "echo": True}, "echo"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 100.5}}, "logit_bias"),
    ("completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": 1}, "logprobs"),
    ("chat/completions", {"logit_bias": [5]}, "logit_bias"),
])
def test_out_of_range_values_are_400s_naming_the_field(server, endpoint, fields, param):
    request = {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    status, _, raw = http(f"{server}/v1/{endpoint}", json.dumps({"model": MODEL, "max_tokens": 2, **request,
                                                                 **fields}).encode())
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param and f"'{param}'" in error["message"], error
