"""What the server tests share: a server on a free loopback port (a module-scoped fixture), plain HTTP, the openai
client, and /metrics read as numbers."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT

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


def running_server():
    """A module's `server` fixture body: the server with the tests' default flags, killed after its module."""
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


def client(url: str, **kwargs):
    import openai  # the serve extra: test modules skip before calling this where it is missing
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


def error_of(body: bytes) -> dict:
    body = json.loads(body)
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]
