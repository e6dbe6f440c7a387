"""Generated tokens' log-probs (nanojet/engine/logprobs.py) in OpenAI's two response shapes: the completions
endpoint's parallel lists and the chat endpoint's `content` list. A token is shown as its text, or as
`bytes:\\xNN...` when its bytes are not whole UTF-8 characters (OpenAI's notation); chat adds the raw bytes."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not needed for `--help` or a bad flag
    from nanojet.engine.logprobs import TokenLogprobs

LOWEST_LOGPROB = -9999.0  # what a token of probability 0 reports (JSON has no -Infinity)


def token_text(tokenizer, token_id: int) -> tuple[str, bytes]:
    """(how a token is shown, its bytes)."""
    data = tokenizer.decode_bytes([token_id])
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data), data


def _value(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def completion_logprobs(entries: list[tuple["TokenLogprobs", int]], tokenizer) -> dict:
    """`choices[i].logprobs` of /v1/completions: `tokens`, `token_logprobs`, `top_logprobs` ({text: logprob} of
    the alternatives and the chosen token, so up to `logprobs` + 1 entries, as OpenAI) and `text_offset` (where
    each token's text starts in the choice's text)."""
    tokens, top = [], []
    for entry, _ in entries:
        tokens.append(token_text(tokenizer, entry.token_id)[0])
        alternatives = {token_text(tokenizer, i)[0]: _value(value) for i, value in entry.top}
        alternatives.setdefault(tokens[-1], _value(entry.logprob))
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [_value(entry.logprob) for entry, _ in entries],
            "top_logprobs": top, "text_offset": [offset for _, offset in entries]}


def chat_logprobs(entries: list[tuple["TokenLogprobs", int]], tokenizer) -> dict:
    """`choices[i].logprobs` of /v1/chat/completions: `content`, one {token, logprob, bytes, top_logprobs} per
    token, the alternatives as {token, logprob, bytes}."""
    def shown(token_id: int, logprob: float) -> dict:
        text, data = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(data)}
    return {"content": [{**shown(entry.token_id, entry.logprob),
                         "top_logprobs": [shown(i, value) for i, value in entry.top]} for entry, _ in entries]}
