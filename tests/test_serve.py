"""`python -m nanojet.serve` through the official `openai` client (and plain HTTP where the client hides what is
sent): a server started on a free loopback port with the embedded model and its head. Models, a completion, a
streamed chat, 8 concurrent requests equal to the same requests one by one (greedy and seeded), every bad request,
refused and supported OpenAI fields (echo, n, prompt lists, text parts; log-probs and logit_bias are in
tests/test_serve_logprobs.py), and the stop token kept out of the text. Flags, metrics, a full queue, dropped
clients, SIGTERM and Ctrl-C are in tests/test_serve_lifecycle.py. Skipped where the `serve` extra is not
installed."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import MODEL, client, error_of, http, metrics, running_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server():
    yield from running_server()


def test_models_and_a_completion(server):
    _, url = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == [MODEL]
    done = api.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    assert (done.usage.completion_tokens, done.usage.total_tokens) == (12, 12 + done.usage.prompt_tokens)
    text = done.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a stop string inside the greedy text ends it there
    stopped = api.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                     stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_the_whole_answer(server):
    _, url = server
    api = client(url)
    messages = [{"role": "user", "content": "Write a function that reverses a list."}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16
    status, headers, raw = http(f"{url}/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True}).encode())
    lines = [line for line in raw.decode().split("\n") if line]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_requests_equal_the_same_requests_one_by_one(server):
    _, url = server
    api = client(url)
    prompts = ["import os\n", "def parse(line):", "class Stack:", "for i in range(", "# sort a list\n",
               "def read_json(path):", "while True:", "x = [1, 2, 3]\n"]
    requests = [dict(model=MODEL, prompt=p, max_tokens=10 + 3 * i, temperature=0 if i % 2 else 0.8, top_p=0.95,
                     seed=i, extra_body={"ignore_eos": True}) for i, p in enumerate(prompts)]
    one_by_one = [api.completions.create(**r).choices[0].text for r in requests]
    rounds = metrics(url)["nanojet:rounds_total"]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: api.completions.create(**r).choices[0].text, requests))
    assert together == one_by_one
    # They shared rounds: fewer rounds than the longest request would need alone, times two.
    assert metrics(url)["nanojet:rounds_total"] - rounds < sum(r["max_tokens"] for r in requests) / 2


def test_bad_requests_get_openai_style_errors(server):
    _, url = server
    api = client(url, max_retries=0)
    cases = [(dict(temperature=-1), openai.BadRequestError, "temperature"),
             (dict(top_p=0), openai.BadRequestError, "top_p"),
             (dict(n=0), openai.BadRequestError, "'n'"),
             (dict(stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "stop"),
             (dict(max_tokens=600), openai.BadRequestError, "exceeds the context"),
             (dict(model="gpt-4"), openai.NotFoundError, "does not exist")]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            api.completions.create(**{"model": MODEL, "prompt": "hello", "max_tokens": 4, **overrides})
    status, _, body = http(f"{url}/v1/completions", b'{"prompt": "x",')
    assert status == 400 and error_of(body)["code"] == "invalid_json"
    status, _, body = http(f"{url}/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode())
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    status, _, body = http(f"{url}/v1/chat/completions", json.dumps({"model": MODEL,
                                                                     "messages": [{"role": "robot"}]}).encode())
    assert status == 400 and "messages" in error_of(body)["message"]
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "x " * 600}]}  # no max_tokens given
    status, _, body = http(f"{url}/v1/chat/completions", json.dumps(long_chat).encode())
    assert status == 400 and error_of(body)["code"] == "context_length_exceeded"


def test_http_errors_are_openai_errors(server):
    """Unknown routes and methods, wrong-typed messages and a non-boolean `stream` answer OpenAI's error object
    with a message that says what is wrong."""
    _, url = server
    status, _, body = http(f"{url}/v1/nothing")
    assert status == 404 and error_of(body)["code"] == "not_found"
    status, headers, body = http(f"{url}/v1/completions")  # a GET
    assert status == 405 and error_of(body)["code"] == "method_not_allowed" and "POST" in headers["allow"]
    status, _, body = http(f"{url}/v1/chat/completions", json.dumps({"model": MODEL, "messages": [1, 2]}).encode())
    assert status == 400 and "'messages[0]' must be an object" in error_of(body)["message"], body
    for endpoint, request in (("completions", {"prompt": "hello"}),
                              ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, _, body = http(f"{url}/v1/{endpoint}", json.dumps({"model": MODEL, "max_tokens": 2, "stream": "yes",
                                                                   **request}).encode())
        assert status == 400 and "'stream'" in error_of(body)["message"], body


def post(url: str, endpoint: str, **fields) -> tuple[int, dict]:
    status, _, body = http(f"{url}/v1/{endpoint}", json.dumps({"model": MODEL, **fields}).encode())
    return status, json.loads(body)


def test_unsupported_fields_are_refused_by_name_and_their_defaults_accepted(server):
    """Nothing is silently ignored: a field the server does not implement is a 400 naming it, unless it holds the
    value that means "off" (OpenAI clients send those)."""
    _, url = server
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"prompt": "hi", "max_tokens": 2}
    refused = [("completions", completion, "presence_penalty", 0.5), ("completions", completion, "suffix", "x"),
               ("completions", completion, "frequency_penalty", -1.0), ("completions", completion, "best_of", 3),
               ("completions", completion, "no_such_field", 1), ("completions", completion, "top_logprobs", 2),
               ("chat/completions", chat, "tool_choice", "auto"),
               ("chat/completions", chat, "tools", [{"type": "function", "function": {"name": "f"}}]),
               ("chat/completions", chat, "response_format", {"type": "json_object"}),
               ("chat/completions", chat, "echo", True)]
    for endpoint, request, name, value in refused:
        status, body = post(url, endpoint, **request, **{name: value})
        assert status == 400 and body["error"]["param"] == name and f"'{name}'" in body["error"]["message"], body
    off = {"logprobs": None, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "me"}
    status, body = post(url, "completions", **completion, **off, suffix=None, best_of=1, echo=False)
    assert status == 200, body
    status, body = post(url, "chat/completions", **chat, **off, top_logprobs=0, tools=[], tool_choice="none",
                        response_format={"type": "text"})
    assert status == 200, body
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client(url, max_retries=0).completions.create(model=MODEL, prompt="hi", max_tokens=2, presence_penalty=1)


def test_echo_n_choices_and_prompt_lists(server):
    """echo prepends the prompt; n samples are what n requests with seeds seed, seed + 1, ... give; a list of
    prompts answers choice p * n + i for sample i of prompt p; all streamed the same way."""
    _, url = server
    api = client(url)
    prompt = "def fibonacci(n):"
    sampled = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "top_p": 0.95, "extra_body": {"ignore_eos": True}}
    plain = api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    echoed = api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain
    streamed = api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == prompt + plain
    alone = [api.completions.create(prompt=prompt, seed=11 + i, **sampled).choices[0].text for i in range(3)]
    three = api.completions.create(prompt=prompt, seed=11, n=3, **sampled)
    assert [(c.index, c.text) for c in three.choices] == list(enumerate(alone)) and len(set(alone)) > 1
    assert (three.usage.completion_tokens, three.usage.prompt_tokens) == (24, echoed.usage.prompt_tokens)
    chunks = list(api.completions.create(prompt=prompt, seed=11, n=3, stream=True, **sampled))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)] == alone
    for prompts in (["class Stack:", "import os\n"], [[10, 20, 30], [40, 50]]):  # texts, then token ids
        firsts = [api.completions.create(prompt=p, seed=5, **sampled).choices[0].text for p in prompts]
        both = api.completions.create(prompt=prompts, seed=5, n=2, **sampled)
        assert [c.index for c in both.choices] == [0, 1, 2, 3] and both.usage.completion_tokens == 32
        assert [both.choices[0].text, both.choices[2].text] == firsts
    status, body = post(url, "completions", prompt=prompt, max_tokens=2, n=9)  # more than the server may queue
    assert status == 400 and body["error"]["param"] == "n", body


def test_chat_content_as_text_parts(server):
    """Chat content may be a list of text parts (joined with newlines); other part types are refused."""
    _, url = server
    api = client(url)
    text = [{"role": "user", "content": "Write a function\nthat reverses a list."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Write a function"},
                                          {"type": "text", "text": "that reverses a list."}]}]
    answers = [api.chat.completions.create(model=MODEL, messages=m, max_tokens=8, temperature=0) for m in (text, parts)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]
    status, body = post(url, "chat/completions", messages=image, max_tokens=2)
    assert status == 400 and "image_url" in body["error"]["message"], body
    two = api.chat.completions.create(model=MODEL, messages=text, max_tokens=6, temperature=1.0, seed=2, n=2)
    chunks = list(api.chat.completions.create(model=MODEL, messages=text, max_tokens=6, temperature=1.0, seed=2, n=2,
                                              stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert streamed == [c.message.content for c in two.choices]


def test_the_stop_token_is_not_part_of_the_text(server):
    """This seed ends at <|endoftext|> after 3 tokens: the text stops before it, streamed or whole."""
    _, url = server
    body = {"model": "qwen3-stdlib-tiny", "prompt": "import os", "max_tokens": 16, "temperature": 1, "seed": 43}
    status, _, whole = http(f"{url}/v1/completions", json.dumps(body).encode())
    whole = json.loads(whole)
    assert status == 200 and whole["usage"]["completion_tokens"] == 3
    assert whole["choices"][0]["finish_reason"] == "stop" and "<|endoftext|>" not in whole["choices"][0]["text"]
    status, _, events = http(f"{url}/v1/completions", json.dumps({**body, "stream": True}).encode())
    chunks = [json.loads(line[6:]) for line in events.decode().splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
