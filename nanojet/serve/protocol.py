"""The OpenAI request fields the server reads, checked and turned into prompts and `SamplingParams`; anything
wrong is an `APIError`, which the server answers as OpenAI's error object `{"error": {"message", "type", "param",
"code"}}`.

Nothing is silently ignored: a field the server does not implement (penalties, suffix, tools, response_format, ...)
is refused with a 400 naming it unless it holds its "off" value (which OpenAI clients send), and so is a field it
does not know, and `echo` with `logprobs` (the prompt's log-probs are not computed). `n` samples of a prompt are n
generations whose seeds are seed, seed + 1, ... (mod 2^31), so choice 0 is what n = 1 gives with the same seed."""
import random
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanojet.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 4
MAX_N = 128  # OpenAI's limit; the queue (--max-waiting) usually binds first
CHAT_ROLES = ("system", "user", "assistant")
# What each endpoint reads. `user` is accepted and unused: it names the end user for OpenAI's abuse monitoring and
# changes nothing generated.
COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "ignore_eos", "n", "stream", "stream_options", "user", "logprobs", "logit_bias"}
FIELDS = {"/v1/completions": COMMON_FIELDS | {"prompt", "echo", "best_of"},
          "/v1/chat/completions": COMMON_FIELDS | {"messages", "top_logprobs"}}
# Fields this server does not implement, accepted only at a value that means "off" (OpenAI clients send them so).
OFF_VALUES = {"presence_penalty": (0,), "frequency_penalty": (0,), "suffix": ("",), "tools": ([],),
              "tool_choice": ("none",), "response_format": ({"type": "text"},)}
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs` (OpenAI's limit); chat's `top_logprobs` goes to 20


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind
        self.param, self.headers = param, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(name: str, message: str) -> APIError:
    return APIError(400, message, "invalid_parameter", param=name)


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    """`body[name]` checked to lie in [low, high] (`default` when absent or null)."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise invalid(name, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}")
    return value


def flag(body: dict, name: str) -> bool:
    """A boolean field (absent or null: false); a string like "yes" is refused, not read as true."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false, got {value!r}")
    return bool(value)


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage): `stream_options.include_usage` adds a usage chunk to a stream."""
    stream, options = flag(body, "stream"), body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options", f"'stream_options' must be an object like {{\"include_usage\": true}}, "
                                        f"got {options!r}")
    return stream, flag(options, "include_usage")


def check_fields(body: dict, endpoint: str) -> None:
    """Refuse, naming it, a field this server does not implement (unless it holds its "off" value, which OpenAI
    clients send) or does not know. A null field counts as absent."""
    for name, value in body.items():
        if value is None:
            continue
        if name in OFF_VALUES:
            if value not in OFF_VALUES[name]:
                raise APIError(400, f"'{name}' is not supported by this server (got {value!r}); leave it out",
                               "unsupported_parameter", param=name)
        elif name not in FIELDS[endpoint]:
            raise APIError(400, f"'{name}' is not a field this server takes; {endpoint} takes "
                                f"{', '.join(sorted(FIELDS[endpoint]))}", "unsupported_parameter", param=name)


def choice_count(body: dict) -> int:
    """`n`, the samples per prompt; `best_of` (completions) may only repeat it, as nothing ranks samples here."""
    n = number(body, "n", 1, 1, MAX_N, integer=True)
    if body.get("best_of") not in (None, 1, n) or isinstance(body.get("best_of"), bool):
        raise APIError(400, f"'best_of' is not supported by this server (got {body['best_of']!r}); leave it out or "
                            f"make it equal to n", "unsupported_parameter", param="best_of")
    return n


def logprob_count(body: dict, endpoint: str) -> int | None:
    """The alternatives per token a request asks for, or None when it asks for no log-probs. Completions:
    `logprobs`, an integer 0..5, not with `echo`. Chat: `logprobs: true`, with `top_logprobs` 0..20 (which needs
    it)."""
    from nanojet.engine.sampling import MAX_LOGPROBS
    if endpoint == "/v1/completions":
        count = number(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS, integer=True)
        if count is not None and flag(body, "echo"):
            raise APIError(400, "'echo' with 'logprobs' is not supported by this server (the prompt's log-probs are "
                                "not computed); leave one of them out", "unsupported_parameter", param="echo")
        return count
    top = number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if not flag(body, "logprobs"):
        if top:
            raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return None
    return top or 0


def logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """`logit_bias`: an object of at most 300 {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    from nanojet.engine.sampling import MAX_LOGIT_BIAS
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise invalid("logit_bias", f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} {{\"token id\": "
                                    f"bias}} entries, got {bias!r:.80}")
    checked = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdecimal() and int(key) < vocab_size):
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids in 0..{vocab_size - 1}, got {key!r}")
        checked[int(key)] = number({"logit_bias": value}, "logit_bias", None, -100, 100)
    return checked


def generation_jobs(body: dict, prompts: list[list[int]], max_model_len: int, default_max_tokens: int | None,
                    max_choices: int, vocab_size: int,
                    logprobs: int | None = None) -> list[tuple[list[int], "SamplingParams"]]:
    """(prompt ids, SamplingParams) per choice: sample i of prompt p is choice p * n + i and has seed
    (seed + i) mod 2^31 (`seed` drawn at random when absent). At most `max_choices` in all (what the server can
    queue at once); `logprobs` alternatives per token (None: no log-probs); 400 on anything invalid."""
    from nanojet.engine.sampling import (
        SamplingParams,  # torch: not needed for `--help` or a bad flag
    )
    n = choice_count(body)
    if n * len(prompts) > max_choices:
        raise invalid("n", f"{len(prompts)} prompt(s) x n={n} is {n * len(prompts)} generations; this server "
                           f"queues at most {max_choices} at once")
    top_k = number(body, "top_k", 0, -1, 2**31, integer=True)  # vLLM's -1 and OpenAI's absence: no top-k
    seed = number(body, "seed", None, 0, 2**31 - 1, integer=True)
    seed = random.randrange(2**31) if seed is None else seed
    try:  # SamplingParams says what is wrong with values that pass the range checks (top_p 0)
        base = SamplingParams(temperature=float(number(body, "temperature", 1.0, 0, 2)),
                              top_p=float(number(body, "top_p", 1.0, 0, 1)), top_k=max(top_k, 0), seed=seed,
                              ignore_eos=flag(body, "ignore_eos"), logprobs=logprobs,
                              logit_bias=logit_bias(body, vocab_size))
    except ValueError as error:
        raise APIError(400, str(error), "invalid_parameter") from None
    return [(prompt, replace(base, max_new_tokens=max_new_tokens(body, len(prompt), max_model_len, default_max_tokens),
                             seed=(seed + i) % 2**31)) for prompt in prompts for i in range(n)]


def max_new_tokens(body: dict, prompt_len: int, max_model_len: int, default: int | None) -> int:
    """`max_tokens` (or `max_completion_tokens`; absent: `default`, or the rest of the context)."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {max_model_len} (prompt + at "
                            f"least one new token); shorten the prompt", "context_length_exceeded")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = number({"max_tokens": max_tokens}, "max_tokens", default or room, 1, 2**31, integer=True)
    if max_tokens > room:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                            f"of {max_model_len} tokens; shorten the prompt or lower max_tokens",
                       "context_length_exceeded", param="max_tokens")
    return max_tokens


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise invalid("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}")
    return stop


def completion_prompts(body: dict, tokenizer, vocab_size: int) -> list[tuple[str, list[int]]]:
    """`prompt` -> [(text, token ids)]: one string or one list of token ids, or a list of either."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or _token_ids(prompt, vocab_size) else prompt
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) and p or _token_ids(p, vocab_size)
                                                     for p in prompts):
        return [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p), p) for p in prompts]
    raise invalid("prompt", f"'prompt' must be a non-empty string, a list of token ids (each in 0..{vocab_size - 1}), "
                            f"or a non-empty list of either")


def _token_ids(value, vocab_size: int) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in value)


def chat_messages(messages) -> list[dict]:
    """`messages` as the chat template takes them ({"role", "content"} with string content: text parts joined with
    newlines, as vLLM joins them); 400 naming the first message that is not one."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid("messages", f"'{where}' must be an object like {{\"role\": \"user\", \"content\": "
                                      f"\"Hello\"}}, got {message!r}")
        if message.get("role") not in CHAT_ROLES:
            raise invalid("messages", f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}; got "
                                      f"{message.get('role')!r}")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise invalid("messages", f"'{where}.{extra[0]}' is not supported by this server; leave it out")
        checked.append({"role": message["role"], "content": _content_text(message.get("content"), where)})
    return checked


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("messages", f"'{where}.content' must be a string or a list of text parts, got {content!r}")
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        what = f"parts of type {kind!r} are not supported" if kind not in (None, "text") else f"got {part!r}"
        raise invalid("messages", f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": "
                                  f"\"...\"}}; {what}")
    return "\n".join(part["text"] for part in content)
