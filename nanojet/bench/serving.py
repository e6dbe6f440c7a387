"""`bench.py --concurrency 1,4,16`: continuous batching under load, plain (AR) against speculative decoding, in
process (the engine alone) and through HTTP (`python -m nanojet.serve` in a subprocess, streamed completions).

Every request of a run arrives at once and at most `concurrency` decode together, so at concurrency 1 the requests
run one by one. Figures per run: throughput (generated tokens / wall time), time to first token (from the run's
start, so it includes queueing) and time per output token (after the first) at p50 and p90, and tau (tokens per
sequence-round). The in-process ids of every run must equal those at concurrency 1 and AR's (lossless under
batching); HTTP texts must equal across concurrencies.
"""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from nanojet.engine.engine import Engine
from nanojet.engine.request import Request, SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.engine.scheduler import Scheduler


class Mismatch(Exception):
    """Batched or speculative ids differ from the reference run."""


def parse_concurrency(text: str, other_mode: bool) -> list[int]:
    """`--concurrency 1,4,16` -> [1, 4, 16]; ValueError with what to write instead."""
    try:
        levels = sorted({int(c) for c in text.split(",")})
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers like 1,4,16; got {text!r}") from None
    if other_mode or levels[0] < 1:
        raise ValueError("--concurrency needs integers >= 1 and a checkpoint (no --synthetic / --peer)")
    return levels


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0 for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def summary(wall_s: float, tokens: int, ttft: list[float], tpot: list[float], tau: float | None) -> dict:
    return {"wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / max(wall_s, 1e-9),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p90_ms": 1e3 * percentile(ttft, 0.9),
            "tpot_p50_ms": 1e3 * percentile(tpot, 0.5), "tpot_p90_ms": 1e3 * percentile(tpot, 0.9), "tau": tau}


def run_in_process(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                   spec: SpeculativeParams | None, concurrency: int, step_tokens: int) -> tuple[dict, list]:
    scheduler = engine.scheduler = Scheduler(engine.kv, concurrency, step_tokens, engine.prefill_chunk)
    requests = [Request(ids, params, spec) for ids in prompts]
    start = time.perf_counter()
    engine.run(requests)
    wall = time.perf_counter() - start
    ttft = [r.first_token_s - start for r in requests]
    tpot = [(r.finish_s - r.first_token_s) / (len(r.output_ids) - 1) for r in requests if len(r.output_ids) > 1]
    hist: Counter = scheduler.accept_hist
    tau = sum(k * n for k, n in hist.items()) / max(1, sum(hist.values()))
    return summary(wall, sum(len(r.output_ids) for r in requests), ttft, tpot, tau), [r.output_ids for r in requests]


def run_http(url: str, prompts: list[list[int]], params: SamplingParams, concurrency: int) -> tuple[dict, list]:
    """`concurrency` client threads share the prompts; each streams its completions one after another."""
    pending = list(enumerate(prompts))
    lock = threading.Lock()
    texts, ttft, tpot, tokens = [""] * len(prompts), [], [], [0]
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index, ids = pending.pop(0)
            body = {"prompt": ids, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "seed": params.seed, "ignore_eos": params.ignore_eos, "stream": True,
                    "stream_options": {"include_usage": True}}
            request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"})
            first, pieces, count = None, [], 0
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        first = first or time.perf_counter()
                        pieces.append(chunk["choices"][0]["text"])
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
            done = time.perf_counter()
            with lock:
                texts[index], tokens[0] = "".join(pieces), tokens[0] + count
                ttft.append((first or done) - start)
                if count > 1:
                    tpot.append((done - (first or done)) / (count - 1))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(time.perf_counter() - start, tokens[0], ttft, tpot, None), texts


def start_server(model: str, head: str | None, spec: SpeculativeParams | None, max_num_seqs: int, args) -> tuple:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nanojet.serve", "--port", str(port), "--model", model,
               "--max-num-seqs", str(max_num_seqs), "--max-waiting", str(args.samples), "--device", args.device,
               "--dtype", args.dtype, "--step-tokens", str(args.step_tokens)]
    command += ["--head", head, "--budget", str(spec.budget), "--width", str(spec.width)] if spec else ["--ar"]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return process, url
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}") from None
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not come up in 120 s")


def measure_serving(engine: Engine, prompts: list[list[int]], params: SamplingParams, args, model: str,
                    head: str) -> list[dict]:
    """Every mode (AR, then each budget > 1) at every concurrency, in process and (with --http) through HTTP."""
    modes = [("ar", None)] + [(f"budget {b}", SpeculativeParams(b, args.width, args.depth))
                              for b in args.budgets if b > 1]
    rows, reference = [], None
    for name, spec in modes:
        run_in_process(engine, prompts[:1], params, spec, 1, args.step_tokens)  # warm up
        for concurrency in args.concurrency:
            print(f"\rbench: {name}, in process, concurrency {concurrency}   ", end="", file=sys.stderr, flush=True)
            result, outputs = run_in_process(engine, prompts, params, spec, concurrency, args.step_tokens)
            reference = reference or outputs
            if outputs != reference:
                raise Mismatch(f"{name} at concurrency {concurrency} emitted other ids than AR one by one")
            rows.append({"mode": name, "path": "in-process", "concurrency": concurrency, **result})
        if not args.http:
            continue
        process, url = start_server(model, head, spec, max(args.concurrency), args)
        try:
            texts = None
            run_http(url, prompts[:1], params, 1)  # warm up
            for concurrency in args.concurrency:
                print(f"\rbench: {name}, HTTP, concurrency {concurrency}   ", end="", file=sys.stderr, flush=True)
                result, outputs = run_http(url, prompts, params, concurrency)
                texts = texts or outputs
                if outputs != texts:
                    raise Mismatch(f"{name} through HTTP at concurrency {concurrency} returned other texts")
                rows.append({"mode": name, "path": "http", "concurrency": concurrency, **result})
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    print(file=sys.stderr)
    return rows


def print_serving_report(rows: list[dict]) -> None:
    """One line per run: throughput, its gain over concurrency 1 and over AR at the same concurrency, latencies."""
    base = {(r["mode"], r["path"]): r for r in rows if r["concurrency"] == min(x["concurrency"] for x in rows)}
    ar = {(r["path"], r["concurrency"]): r for r in rows if r["mode"] == "ar"}
    print(f"{'mode':<11}{'path':<12}{'conc':>5}{'tok/s':>8}{'vs c=1':>8}{'vs AR':>7}{'tau':>6}"
          f"{'TTFT p50/p90 ms':>18}{'TPOT p50/p90 ms':>18}")
    for r in rows:
        over_base = base[(r["mode"], r["path"])]["wall_s"] / r["wall_s"]
        over_ar = r["tokens_per_s"] / ar[(r["path"], r["concurrency"])]["tokens_per_s"]
        tau = f"{r['tau']:.2f}" if r["tau"] is not None else "-"
        print(f"{r['mode']:<11}{r['path']:<12}{r['concurrency']:>5}{r['tokens_per_s']:>8.1f}{over_base:>7.2f}x"
              f"{over_ar:>6.2f}x{tau:>6}{r['ttft_p50_ms']:>10.0f} /{r['ttft_p90_ms']:>6.0f}"
              f"{r['tpot_p50_ms']:>11.1f} /{r['tpot_p90_ms']:>5.1f}")


def report(engine: Engine, prompts: list[list[int]], params: SamplingParams, args, config: dict) -> int:
    """bench.py's serving mode: measure, print the table, write --json; returns the exit status."""
    rows = measure_serving(engine, prompts, params, args, config["model"], config["head"])
    print_serving_report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {**config, "concurrency": args.concurrency,
                                                          "step_tokens": args.step_tokens}, "runs": rows},
                                              indent=1) + "\n")
    return 0
