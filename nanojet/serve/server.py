"""`python -m nanojet.serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over continuous batching with
speculative decoding.

    python -m nanojet.serve                                  # embedded model and head on 127.0.0.1:8000
    python -m nanojet.serve --model DIR --head DIR --max-num-seqs 16 --budget 8 --width 4 --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` sends server-sent
events ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text). Errors are OpenAI-style JSON
`{"error": {"message", "type", "code"}}`: 400 bad parameters or malformed JSON, 404 unknown model, 413 body too
large, 503 with Retry-After when the queue is full. A client that goes away is cancelled before the next round;
SIGTERM stops taking requests, lets the running ones finish, and exits 0.

This layer only translates: prompts and parameters in, text events out. Decoding lives in nanojet.engine.scheduler and
nanojet.serve.loop.
"""
import argparse
import asyncio
import json
import random
import signal
import sys
import time
import uuid
from pathlib import Path

from nanojet.tools.cli import ArgumentParser, positive_int

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20
MAX_STOP_STRINGS = 4
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m nanojet.serve", description="OpenAI-compatible server for nanojet")
    parser.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: the embedded model)")
    parser.add_argument("--head", default="auto",
                        help="draft head directory, 'none' for plain decoding, or 'auto' (the model's shipped head)")
    parser.add_argument("--ar", action="store_true", help="plain autoregressive decoding (no draft head)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-num-seqs", type=positive_int, default=8, help="sequences decoded together")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="requests allowed to wait for a place before new ones get 503 (default: 4 x max-num-seqs)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit (prompt + generation)")
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


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", "invalid_parameter")
    return value


def sampling_from(body: dict, prompt_len: int, max_model_len: int, default_max_tokens: int | None):
    """The request's sampling fields -> (SamplingParams, stop strings); 400 on anything invalid."""
    from nanojet.engine.sampling import SamplingParams
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "'n' must be 1", "invalid_parameter")
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {max_model_len} (prompt + at "
                            f"least one new token); shorten the prompt", "context_length_exceeded")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens or room, 1, 2**31,
                         integer=True)
    if max_tokens > room:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                            f"of {max_model_len} tokens; shorten the prompt or lower max_tokens",
                       "context_length_exceeded")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}",
                       "invalid_parameter")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", "invalid_parameter")
    top_k = _number(body, "top_k", 0, -1, 2**31, integer=True)  # vLLM's -1 and OpenAI's absence: no top-k
    seed = _number(body, "seed", None, 0, 2**31 - 1, integer=True)
    try:  # SamplingParams says what is wrong with values that pass the range checks above (top_p 0)
        params = SamplingParams(temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                                top_p=float(_number(body, "top_p", 1.0, 0, 1)), top_k=max(top_k, 0),
                                seed=random.randrange(2**31) if seed is None else seed, max_new_tokens=max_tokens,
                                ignore_eos=ignore_eos)
    except ValueError as error:
        raise APIError(400, str(error), "invalid_parameter") from None
    return params, stop


async def cancel_on_disconnect(request, stream) -> None:
    """Poll the connection while a whole answer is generated: a client that has left is told nothing (no chunk
    fails to send, as a stream's does), so its request would otherwise run to the end."""
    while not stream.done:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            stream.request.cancel()
            return


def create_app(llm, loop, model_name: str, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app over a started `ServingLoop`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from nanojet.serve.loop import QueueFull

    app = FastAPI(title="nanojet")

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return JSONResponse({"error": {"message": error.message, "type": error.kind, "code": error.code}},
                            status_code=error.status, headers=error.headers)

    async def read_body(request: Request) -> dict:
        # An oversized body is still read (and dropped) up to DRAIN_BYTES before the 413: a client still sending
        # when the connection closes would see a broken pipe instead of the answer.
        kept, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size <= max_body_bytes:
                kept.append(piece)
            elif size > DRAIN_BYTES:
                break
        if size > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", "request_too_large")
        raw = b"".join(kept)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"malformed JSON body: {error}", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", "invalid_json")
        if body.get("model") not in (None, model_name):
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {model_name!r}",
                           "model_not_found")
        return body

    def start(body: dict, prompt_ids: list[int], default_max_tokens: int | None):
        params, stop = sampling_from(body, len(prompt_ids), llm.max_model_len, default_max_tokens)
        try:
            return loop.submit(prompt_ids, params, stop)
        except ValueError as error:
            raise APIError(400, str(error), "invalid_request") from None
        except QueueFull as error:
            raise APIError(503, f"server busy: {error}; retry shortly", "server_busy", "server_error",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None

    def usage(prompt_ids: list[int], stream) -> dict:
        done = stream.completion_tokens
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": done, "total_tokens": len(prompt_ids) + done}

    async def collect(request: Request, stream) -> tuple[str, str]:
        """Await the whole text, cancelling the generation if the client goes away meanwhile."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, stream))
        pieces = []
        try:
            async for event in stream.events():  # a cancelled request still ends with an event ("abort")
                pieces.append(event.text)
                if event.finish_reason is not None:
                    return "".join(pieces), event.finish_reason
        finally:
            watcher.cancel()
            if not stream.done:
                stream.request.cancel()

    @app.get("/health")
    async def health():
        if loop.draining:
            raise APIError(503, "draining: the server is shutting down", "shutting_down", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "nanojet", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        lines = []
        for name, value in loop.metrics().items():
            lines.append(f"# TYPE {name} {'counter' if name in loop.COUNTERS else 'gauge'}")
            lines.append(f"{name} {value}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            prompt_ids = llm.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         and 0 <= t < llm.model.config.vocab_size for t in prompt):
            prompt_ids = prompt
        else:
            raise APIError(400, "'prompt' must be one non-empty string or one list of token ids", "invalid_parameter")
        stream = start(body, prompt_ids, default_max_tokens=16)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        if body.get("stream"):
            return sse_of(stream, lambda e: chunk(e.text, e.finish_reason), body, prompt_ids, chunk)
        text, finish = await collect(request, stream)
        return {**chunk(text, finish), "usage": usage(prompt_ids, stream)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "invalid_parameter")
        try:
            prompt_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, enable_thinking=False))
        except (ValueError, AttributeError, TypeError) as error:
            raise APIError(400, f"'messages': {error}", "invalid_parameter") from None
        stream = start(body, prompt_ids, default_max_tokens=None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.get("stream"):
            return sse_of(stream, lambda e: chunk({"content": e.text} if e.text else {}, e.finish_reason), body,
                          prompt_ids, chunk, first=chunk({"role": "assistant", "content": ""}, None))
        text, finish = await collect(request, stream)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": usage(prompt_ids, stream)}

    def sse_of(stream, to_chunk, body: dict, prompt_ids: list[int], chunk, first: dict | None = None):
        """Server-sent events of a stream: optional first chunk, one chunk per text event, a usage chunk if asked
        (`stream_options.include_usage`), then `data: [DONE]`. Closing the connection cancels the generation."""
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        async def events():
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for event in stream.events():
                    yield f"data: {json.dumps(to_chunk(event))}\n\n"
                if include_usage:
                    final = {**chunk({} if first is not None else "", None), "choices": [],
                             "usage": usage(prompt_ids, stream)}
                    yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects: the generator is closed mid-stream
                if not stream.done:
                    stream.request.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401 (create_app imports it; checked here, before the model loads)
        import uvicorn
    except ImportError as error:
        print(f"error: the server needs {error.name or 'fastapi and uvicorn'}: pip install fastapi uvicorn "
              f"(or pip install 'nanojet[serve]')", file=sys.stderr)
        return 2
    try:
        from nanojet.engine.engine import SpeculativeParams
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
            # every core between ops, and streaming stalls (HTTP throughput fell to 35-80% of in-process).
            torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
        budget = args.budget if args.budget is not None else (64 if llm.device.type == "cuda" else 8)
        spec = SpeculativeParams(budget, args.width) if head else None
        if spec is not None and budget > llm.max_tree_nodes:
            raise ValueError(f"--budget {budget} exceeds max_tree_nodes {llm.max_tree_nodes}")
        max_waiting = args.max_waiting if args.max_waiting is not None else 4 * args.max_num_seqs
        loop = ServingLoop(llm, spec, args.max_num_seqs, args.step_tokens, max_waiting)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    app = create_app(llm, loop, args.served_model_name or model.name)

    class DrainingServer(uvicorn.Server):
        """SIGTERM: refuse new requests, let uvicorn wait for the running ones, and exit 0 (uvicorn would
        re-raise the signal after its graceful shutdown, ending the process with the signal's status)."""

        def handle_exit(self, sig, frame) -> None:
            loop.drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    loop.start()
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=None))
    print(f"nanojet: serving {args.served_model_name or model.name} on http://{args.host}:{args.port} "
          f"({'speculative, budget ' + str(budget) if spec else 'plain decoding'}, max {args.max_num_seqs} "
          f"sequences)", file=sys.stderr, flush=True)
    server.run()
    loop.stop()
    return 0

