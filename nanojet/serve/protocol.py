"""The OpenAI request fields the server reads, checked and turned into prompts and `SamplingParams`; anything
wrong is an `APIError`, which the server answers as OpenAI's error object `{"error": {"message", "type", "param",
"code"}}`."""
import random

MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "user", "assistant")


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


def sampling_from(body: dict, prompt_len: int, max_model_len: int, default_max_tokens: int | None):
    """The request's sampling fields -> (SamplingParams, stop strings); 400 on anything invalid."""
    from nanojet.engine.sampling import SamplingParams  # torch: not needed for `--help` or a bad flag
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise invalid("n", "'n' must be 1")
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {max_model_len} (prompt + at "
                            f"least one new token); shorten the prompt", "context_length_exceeded")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens or room, 1, 2**31, integer=True)
    if max_tokens > room:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                            f"of {max_model_len} tokens; shorten the prompt or lower max_tokens",
                       "context_length_exceeded", param="max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise invalid("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}")
    top_k = number(body, "top_k", 0, -1, 2**31, integer=True)  # vLLM's -1 and OpenAI's absence: no top-k
    seed = number(body, "seed", None, 0, 2**31 - 1, integer=True)
    try:  # SamplingParams says what is wrong with values that pass the range checks above (top_p 0)
        params = SamplingParams(temperature=float(number(body, "temperature", 1.0, 0, 2)),
                                top_p=float(number(body, "top_p", 1.0, 0, 1)), top_k=max(top_k, 0),
                                seed=random.randrange(2**31) if seed is None else seed, max_new_tokens=max_tokens,
                                ignore_eos=flag(body, "ignore_eos"))
    except ValueError as error:
        raise APIError(400, str(error), "invalid_parameter") from None
    return params, stop


def chat_messages(messages) -> list[dict]:
    """`messages` as the chat template takes them ({"role", "content"} with string content); 400 naming the first
    message that is not one."""
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
        if not isinstance(message.get("content"), str):
            raise invalid("messages", f"'{where}.content' must be a string, got {message.get('content')!r}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked
