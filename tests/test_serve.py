"""`python -m nanojet.serve` through the official `openai` client (and plain HTTP where the client hides what is
sent): a server started on a free loopback port with the embedded model and its head. Models, a completion, a
streamed chat, 8 concurrent requests equal to the same requests one by one (greedy and seeded), every bad request
and flag, refused and supported OpenAI fields (echo, n, prompt lists, text parts; log-probs and logit_bias are in
tests/test_serve_logprobs.py), Prometheus metrics, a full queue, dropped streams and whole answers, SIGTERM and
Ctrl-C. Skipped where the `serve` extra is not installed."""
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "qwen3-stdlib-tiny"
MAX_NUM_SEQS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m nanojet.serve` on a free loopback port, once /health answers 200 (at most 120 s)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nanojet.serve", "--port", str(port), *flags], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if http(f"{url}/health")[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()
    process.kill()
    pytest.fail("the server did not come up in 120 s")


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_NUM_SEQS),
                                "--max-model-len", "512")
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def http(url: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    """A plain request (a POST when `body` is given) -> (status, headers, body), errors included."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def client(url: str, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", **kwargs)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name with its labels: value}."""
    lines = http(f"{url}/metrics")[2].decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def wait_until(url: str, condition, seconds: float = 20) -> dict[str, float]:
    """Poll /metrics until `condition(metrics)` holds (or time runs out); returns the last metrics."""
    deadline = time.time() + seconds
    while True:
        current = metrics(url)
        if condition(current) or time.time() > deadline:
            return current
        time.sleep(0.05)


def idle(current: dict[str, float]) -> bool:
    return (current["nanojet:num_requests_running"], current["nanojet:num_requests_waiting"],
            current["nanojet:kv_cache_pages_used"]) == (0, 0, 0)


def test_bad_flags_exit_2_with_one_line():
    """Every bad flag is one line and exit 2 before the banner, a port in use included (the socket is bound
    before the model loads)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, message in ((["--budget", "0"], "--budget"), (["--model", "/no/such/model"], "does not exist"),
                               (["--max-waiting", "-5"], "--max-waiting"), (["--port", "-1"], "--port"),
                               (["--port", "70000"], "--port"), (["--port", port], port)):
            done = subprocess.run([sys.executable, "-m", "nanojet.serve", *flags], cwd=ROOT, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 2 and message in done.stderr, (flags, done.returncode, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1 and "serving" not in done.stderr, (flags, done.stderr)


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


def error_of(body: bytes) -> dict:
    body = json.loads(body)
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


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


def check_exposition(text: str) -> dict[str, str]:
    """Prometheus text: every sample belongs to a family announced by # HELP and # TYPE lines, and every
    histogram's buckets are cumulative up to le="+Inf" == _count. Returns {family: type}."""
    types, helps, buckets = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            types[family] = kind
        else:
            name, value = line.rsplit(" ", 1)
            bare = name.split("{")[0]
            family = next(f for f in (bare, bare.rsplit("_", 1)[0]) if f in types)
            assert family in helps and (family == bare or types[family] == "histogram"), line
            if bare.endswith("_bucket"):
                buckets.setdefault(family, []).append(float(value))
            elif bare.endswith("_count") and types[family] == "histogram":
                assert buckets[family] == sorted(buckets[family]) and buckets[family][-1] == float(value), family
    return types


def test_prometheus_metrics(server):
    """/metrics follows vLLM's names (nanojet: prefix) in Prometheus text: counters by finish reason, token counters,
    latency histograms, and the draft's accepted tokens per round with the acceptance rate by depth."""
    _, url = server
    api = client(url)
    before = metrics(url)
    done = api.completions.create(model=MODEL, prompt="def main():", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = done.choices[0].text
    stopped = api.completions.create(model=MODEL, prompt="def main():", max_tokens=12, temperature=0,
                                     stop=[text[len(text) // 2:len(text) // 2 + 2]], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    success = 'nanojet:request_success_total{finished_reason="%s"}'
    after = wait_until(url, lambda m: m[success % "stop"] > before[success % "stop"])
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert (delta[success % "length"], delta[success % "stop"], delta[success % "abort"]) == (1, 1, 0)
    assert delta["nanojet:prompt_tokens_total"] == done.usage.prompt_tokens + stopped.usage.prompt_tokens
    assert delta["nanojet:generation_tokens_total"] == 12 + stopped.usage.completion_tokens
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta[f"nanojet:{name}_count"] == 2 and delta[f"nanojet:{name}_sum"] > 0, name
    rounds = delta["nanojet:spec_decode_accepted_tokens_per_round_count"]
    assert rounds > 0 and delta["nanojet:spec_decode_accepted_tokens_per_round_sum"] + rounds >= 11  # 12 - prefill's
    # The rate at depth d: the share of all rounds so far that accepted d drafted tokens or more.
    total = after["nanojet:spec_decode_accepted_tokens_per_round_count"]
    rates = [after[f'nanojet:spec_decode_acceptance_rate{{depth="{d}"}}'] for d in range(1, 8)]
    assert rates == sorted(rates, reverse=True) and 0 < rates[0] <= 1
    for d, rate in enumerate(rates, 1):
        below = after[f'nanojet:spec_decode_accepted_tokens_per_round_bucket{{le="{d - 1}"}}']
        assert rate == pytest.approx((total - below) / total), d
    types = check_exposition(http(f"{url}/metrics")[2].decode())
    assert {types[f"nanojet:{name}"] for name in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                                                  "e2e_request_latency_seconds")} == {"histogram"}
    assert types["nanojet:request_success_total"] == types["nanojet:prompt_tokens_total"] == "counter"
    assert types["nanojet:num_requests_running"] == "gauge"


def test_full_queue_answers_503_and_dropped_streams_free_their_pages(server):
    """8 running and 8 waiting streams fill the server: the next request gets 503 with Retry-After. Closing the
    streams (clients gone) cancels them within a round: no request runs or waits and no KV page stays used."""
    _, url = server
    api = client(url, max_retries=0)
    streams = []
    for i in range(2 * MAX_NUM_SEQS):
        streams.append(api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=400, temperature=0,
            stream=True, extra_body={"ignore_eos": True}))
        if i == MAX_NUM_SEQS - 1:  # the first 8 run before the next 8 queue up
            wait_until(url, lambda m: m["nanojet:num_requests_running"] == MAX_NUM_SEQS)
    first = next(iter(streams[0]))  # the oldest request is decoding
    assert first.choices[0].delta.role == "assistant"
    with pytest.raises(openai.APIStatusError) as busy:
        api.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert busy.value.status_code == 503 and int(busy.value.response.headers["retry-after"]) >= 1
    assert error_of(busy.value.response.content)["code"] == "server_busy"
    during = metrics(url)
    assert during["nanojet:num_requests_running"] == MAX_NUM_SEQS and during["nanojet:kv_cache_pages_used"] > 0
    for stream in streams:
        stream.close()
    after = wait_until(url, idle)
    assert idle(after), after
    assert after["nanojet:generation_tokens_total"] < during["nanojet:generation_tokens_total"] + 16 * 400


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


def test_a_whole_answer_whose_client_leaves_is_cancelled(server):
    """A non-streaming request gets no chunk to fail on when its client goes; the server notices the closed
    connection while the request decodes (sampled, so several seconds of rounds) and frees it within a second."""
    _, url = server
    body = json.dumps({"model": MODEL, "prompt": "def main():", "max_tokens": 480, "temperature": 1.0, "seed": 3,
                       "ignore_eos": True}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        running = wait_until(url, lambda m: m["nanojet:num_requests_running"] == 1)
        assert running["nanojet:num_requests_running"] == 1, running
    aborted = 'nanojet:request_success_total{finished_reason="abort"}'
    after = wait_until(url, lambda m: idle(m) and m[aborted] > running[aborted], seconds=1.5)
    assert idle(after) and after[aborted] == running[aborted] + 1, after  # cancelled, not ended by chance


def test_sigterm_drains_running_requests_and_exits_0(server):
    """Last in this module: it stops the server."""
    process, url = server
    api = client(url, max_retries=0)
    stream = api.completions.create(model=MODEL, prompt="def main():", max_tokens=48, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    chunks = iter(stream)
    received = [next(chunks)]  # generation is under way
    process.send_signal(signal.SIGTERM)
    received += list(chunks)
    assert received[-1].choices[0].finish_reason == "length"  # it ran to max_tokens: drained, not cut
    assert process.wait(timeout=60) == 0


def test_ctrl_c_drains_like_sigterm():
    """Ctrl-C (SIGINT) stops taking requests, lets the running one finish, and exits 0 without a traceback."""
    process, url = start_server("--max-num-seqs", "2", "--max-model-len", "256")
    try:
        stream = client(url, max_retries=0).completions.create(model=MODEL, prompt="def main():", max_tokens=32,
                                                               temperature=0, stream=True,
                                                               extra_body={"ignore_eos": True})
        chunks = iter(stream)
        received = [next(chunks)]
        process.send_signal(signal.SIGINT)
        received += list(chunks)
        assert received[-1].choices[0].finish_reason == "length"
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_missing_server_packages_are_one_line(monkeypatch, capsys):
    """Without fastapi/uvicorn (the `serve` extra), the server says what to install instead of a traceback."""
    from nanojet.serve import server as serve
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` raise ImportError
    assert serve.main([]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install fastapi uvicorn" in lines[0] and "uvicorn" in lines[0].split(":")[1]

