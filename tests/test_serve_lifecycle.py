"""The server's life around its answers: bad flags are one line and exit 2, Prometheus metrics, a full queue
answers 503, clients that leave free their pages (streaming or not), SIGTERM and Ctrl-C drain, and missing serve
packages are one line. Skipped where the `serve` extra is not installed."""
import json
import signal
import socket
import subprocess
import sys

import pytest
from conftest import ROOT
from serve_helpers import (
    MAX_NUM_SEQS,
    MODEL,
    client,
    error_of,
    http,
    idle,
    metrics,
    running_server,
    start_server,
    wait_until,
)

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server():
    yield from running_server()


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
