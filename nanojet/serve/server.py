"""`python -m nanojet.serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over continuous batching with
speculative decoding.

    python -m nanojet.serve                                  # embedded model and head on 127.0.0.1:8000
    python -m nanojet.serve --model DIR --head DIR --max-num-seqs 16 --budget 8 --width 4 --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` sends server-sent
events ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text). Errors are OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`: 400 bad parameters or malformed JSON, 404 unknown model or route,
405 wrong method, 413 body too large, 503 with Retry-After when the queue is full. A client that goes away is
cancelled within a round (a whole answer's connection is polled while it generates); SIGTERM or Ctrl-C stops taking
requests, lets the running ones finish, and exits 0. Bad flags, a port in use included, are one line on stderr and
exit 2 before the model loads.

This layer only translates: prompts and parameters in (nanojet.serve.protocol), text events out. Decoding lives in
nanojet.engine.scheduler and nanojet.serve.loop.
"""
import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from nanojet.serve.logprobs import chat_logprobs, completion_logprobs
from nanojet.serve.protocol import (
    APIError,
    chat_messages,
    check_fields,
    completion_prompts,
    flag,
    generation_jobs,
    logprob_count,
    stop_strings,
    stream_options,
)
from nanojet.tools.cli import ArgumentParser, positive_int

if TYPE_CHECKING:
    from starlette.requests import Request

    from nanojet.serve.loop import Generations, ServingLoop

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25
ROUTES = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics"


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {port}")
    return port


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m nanojet.serve", description="OpenAI-compatible server for nanojet")
    parser.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: the embedded model)")
    parser.add_argument("--head", default="auto",
                        help="draft head directory, 'none' for plain decoding, or 'auto' (the model's shipped head)")
    parser.add_argument("--ar", action="store_true", help="plain autoregressive decoding (no draft head)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port (0: any free one)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=8, help="sequences decoded together")
    parser.add_argument("--max-waiting", type=positive_int, default=None,
                        help="requests allowed to wait for a place before new ones get 503 (default: 4 x max-num-seqs)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="context limit (prompt + generation)")
    parser.add_argument("--budget", type=positive_int, default=None,
                        help="draft tree nodes per round and sequence (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--width", type=positive_int, default=4, help="candidates per tree depth")
    parser.add_argument("--step-tokens", type=positive_int, default=512,
                        help="target tokens per step: prefill chunks plus the round's tree nodes")
    parser.add_argument("--kv-memory-gb", type=float, default=None,
                        help="KV pool size (default: max-num-seqs sequences of max-model-len)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default on a CPU: one less than torch's, a core for HTTP)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory name)")
    return parser.parse_args(argv)


async def cancel_on_disconnect(request: "Request", generations: "Generations") -> None:
    """Poll the connection while a whole answer is generated: a client that has left is told nothing (no chunk
    fails to send, as a stream's does), so its requests would otherwise run to the end."""
    while not generations.done:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            generations.cancel()
            return


class Routes:
    """What each endpoint does, over a started `ServingLoop`; `create_app` registers these with FastAPI."""

    def __init__(self, llm, loop: "ServingLoop", model_name: str, max_body_bytes: int):
        self.llm, self.loop, self.model_name, self.max_body_bytes = llm, loop, model_name, max_body_bytes

    async def read_body(self, request: "Request") -> dict:
        """The JSON object sent to this endpoint, its fields checked against what it takes."""
        # An oversized body is still read (and dropped) up to DRAIN_BYTES before the 413: a client still sending
        # when the connection closes would see a broken pipe instead of the answer.
        kept, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size <= self.max_body_bytes:
                kept.append(piece)
            elif size > DRAIN_BYTES:
                break
        if size > self.max_body_bytes:
            raise APIError(413, f"request body over {self.max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(b"".join(kept))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"malformed JSON body: {error}", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", "invalid_json")
        if body.get("model") not in (None, self.model_name):
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", param="model")
        check_fields(body, request.url.path)
        return body

    def submit(self, body: dict, prompts: list[list[int]], default_max_tokens: int | None,
               logprobs: int | None) -> "Generations":
        """Every choice the request asks for, queued; the last step, after everything is checked."""
        from nanojet.serve.loop import QueueFull
        jobs = generation_jobs(body, prompts, self.llm.max_model_len, default_max_tokens, self.loop.max_waiting,
                               self.llm.model.config.vocab_size, logprobs)
        try:
            return self.loop.submit(jobs, stop_strings(body))
        except ValueError as error:
            raise APIError(400, str(error), "invalid_request") from None
        except QueueFull as error:
            raise APIError(503, f"server busy: {error}; retry shortly", "server_busy", "server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    @staticmethod
    def usage(prompts: list[list[int]], choices: "Generations") -> dict:
        """Each prompt counts once, however many samples it has (as OpenAI counts)."""
        prompt_tokens, done = sum(len(prompt) for prompt in prompts), choices.completion_tokens()
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    @staticmethod
    async def collect(request: "Request", choices: "Generations") -> list[tuple[str, str, list]]:
        """Await every choice's whole text, finish reason and log-probs (`TextEvent.logprobs`, [] when not asked),
        cancelling them if the client goes away meanwhile."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, choices))
        pieces, finishes = [[] for _ in choices.streams], [""] * len(choices.streams)
        logprobs = [[] for _ in choices.streams]
        try:
            async for event in choices.events():  # a cancelled request still ends with an event ("abort")
                pieces[event.index].append(event.text)
                finishes[event.index] = event.finish_reason or ""
                logprobs[event.index] += event.logprobs or []
        finally:
            watcher.cancel()
            choices.cancel()
        return [("".join(texts), finish, entries) for texts, finish, entries in zip(pieces, finishes, logprobs)]

    def event_stream(self, choices: "Generations", head: dict, choice, first: list[dict],
                     usage_prompts: list[list[int]] | None):
        """Server-sent events, each chunk `head` with one choice: the `first` ones, then `choice(index, text,
        finish_reason, logprobs)` per text event; the usage of `usage_prompts` once every choice has ended (when
        `stream_options.include_usage` asks for it), then `data: [DONE]`. Closing the connection cancels the
        generations."""
        from starlette.responses import StreamingResponse

        async def events():
            try:
                for one in first:
                    yield f"data: {json.dumps({**head, 'choices': [one]})}\n\n"
                async for event in choices.events():
                    chunk = {**head, "choices": [choice(event.index, event.text, event.finish_reason,
                                                        event.logprobs)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if usage_prompts is not None:
                    usage = {**head, "choices": [], "usage": self.usage(usage_prompts, choices)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects: the generator is closed mid-stream
                choices.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(self, request: "Request"):
        body = await self.read_body(request)
        stream, include_usage = stream_options(body)
        prompts = completion_prompts(body, self.llm.tokenizer, self.llm.model.config.vocab_size)
        echo, count = flag(body, "echo"), logprob_count(body, "/v1/completions")
        prompt_ids = [ids for _, ids in prompts]
        choices = self.submit(body, prompt_ids, default_max_tokens=16, logprobs=count)
        n = len(choices.streams) // len(prompts)
        echoes = [text if echo else "" for text, _ in prompts for _ in range(n)]  # choice p * n + i: prompt p
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def choice(index: int, text: str, finish: str | None, logprobs: list | None = None) -> dict:
            shown = None if count is None else completion_logprobs(logprobs or [], self.llm.tokenizer)
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": shown}

        if stream:
            first = [choice(i, text, None) for i, text in enumerate(echoes) if text]
            return self.event_stream(choices, head, choice, first, prompt_ids if include_usage else None)
        answers = await self.collect(request, choices)
        return {**head, "choices": [choice(i, echoes[i] + text, finish, logprobs)
                                    for i, (text, finish, logprobs) in enumerate(answers)],
                "usage": self.usage(prompt_ids, choices)}

    async def chat_completions(self, request: "Request"):
        body = await self.read_body(request)
        stream, include_usage = stream_options(body)
        template = self.llm.tokenizer.apply_chat_template(chat_messages(body.get("messages")), enable_thinking=False)
        prompt = self.llm.tokenizer.encode(template)
        count = logprob_count(body, "/v1/chat/completions")
        choices = self.submit(body, [prompt], default_max_tokens=None, logprobs=count)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

        def shown(logprobs: list | None) -> dict | None:
            return None if count is None else chat_logprobs(logprobs or [], self.llm.tokenizer)

        if stream:
            def delta(index: int, text: str, finish: str | None, logprobs: list | None) -> dict:
                return {"index": index, "delta": {"content": text} if text else {}, "logprobs": shown(logprobs),
                        "finish_reason": finish}

            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(choices.streams))]
            return self.event_stream(choices, {**head, "object": "chat.completion.chunk"}, delta, first,
                                     [prompt] if include_usage else None)
        answers = await self.collect(request, choices)
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": shown(logprobs),
                             "finish_reason": finish} for i, (text, finish, logprobs) in enumerate(answers)],
                "usage": self.usage([prompt], choices)}

    def health(self) -> dict:
        if self.loop.draining:
            raise APIError(503, "draining: the server is shutting down", "shutting_down", "server_error")
        return {"status": "ok"}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "nanojet", "max_model_len": self.llm.max_model_len}]}


def create_app(llm, loop: "ServingLoop", model_name: str, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app over a started `ServingLoop`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    routes = Routes(llm, loop, model_name, max_body_bytes)
    app = FastAPI(title="nanojet")

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # the routing's own 404 and 405
        if error.status_code == 404:
            error = APIError(404, f"no route {request.method} {request.url.path}; this server has {ROUTES}",
                             "not_found")
        elif error.status_code == 405:
            error = APIError(405, f"{request.method} is not allowed on {request.url.path}; use "
                                  f"{error.headers['Allow']}", "method_not_allowed", headers=error.headers)
        else:
            error = APIError(error.status_code, str(error.detail), "http_error", headers=error.headers)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception):  # a bug: uvicorn logs it, the client still gets an error object
        error = APIError(500, f"internal error: {error}", "internal_error", "server_error")
        return JSONResponse(error.body(), status_code=error.status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await routes.chat_completions(request)

    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/metrics")(lambda: PlainTextResponse(loop.metrics_text(), media_type="text/plain; version=0.0.4"))
    return app


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once, as one line."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart past TIME_WAIT
        listener.bind(address)
        listener.listen()
        return listener
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port or "
                         f"--host") from None


def load(args: argparse.Namespace) -> tuple["ServingLoop", str, str]:
    """The model, its head and the serving loop the flags ask for -> (loop, served model name, how it
    decodes)."""
    from nanojet.engine.request import SpeculativeParams
    from nanojet.llm import DEFAULT_HEAD_NAME, DEFAULT_MODEL, LLM
    from nanojet.serve.loop import ServingLoop
    model = Path(args.model) if args.model else DEFAULT_MODEL
    head = None if args.ar or args.head == "none" else args.head
    if head == "auto":
        head = model / DEFAULT_HEAD_NAME if (model / DEFAULT_HEAD_NAME / "config.json").is_file() else None
    llm = LLM(model, head=head, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              kv_memory_gb=args.kv_memory_gb, max_num_seqs=args.max_num_seqs, step_tokens=args.step_tokens)
    if args.threads or llm.device.type == "cpu":
        import torch
        # On a CPU one core is left to the HTTP loop: torch's spinning worker threads would otherwise hold
        # every core between ops, and streaming stalls (docs/serving.md).
        torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    budget = args.budget if args.budget is not None else (64 if llm.device.type == "cuda" else 8)
    spec = SpeculativeParams(budget, args.width) if head else None
    if spec is not None and budget > llm.max_tree_nodes:
        raise ValueError(f"--budget {budget} exceeds max_tree_nodes {llm.max_tree_nodes}")
    max_waiting = args.max_waiting if args.max_waiting is not None else 4 * args.max_num_seqs
    loop = ServingLoop(llm, spec, max_waiting)
    return loop, args.served_model_name or model.name, f"speculative, budget {budget}" if spec else "plain decoding"


def serve(app, listener: socket.socket, loop: "ServingLoop") -> None:
    """uvicorn on the bound socket until SIGTERM or Ctrl-C: new requests are refused, uvicorn waits for the
    running ones, then the loop thread ends."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            loop.drain()
            super().handle_exit(sig, frame)  # a second Ctrl-C stops at once

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown: the process would end with the signal's
            # status, and Ctrl-C with a KeyboardInterrupt traceback. Drained, it exits 0 instead.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    loop.start()
    DrainingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None)).run([listener])
    loop.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401 (create_app imports it; checked here, before the model loads)
        import uvicorn  # noqa: F401
    except ImportError as error:
        print(f"error: the server needs {error.name or 'fastapi and uvicorn'}: pip install fastapi uvicorn "
              f"(or pip install 'nanojet[serve]')", file=sys.stderr)
        return 2
    listener = None
    try:
        listener = listen(args.host, args.port)
        loop, model_name, decoding = load(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        if listener is not None:
            listener.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    app = create_app(loop.llm, loop, model_name)
    host, port = listener.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # IPv6
    print(f"nanojet: serving {model_name} on http://{host}:{port} ({decoding}, max {args.max_num_seqs} sequences)",
          file=sys.stderr, flush=True)
    serve(app, listener, loop)
    return 0
