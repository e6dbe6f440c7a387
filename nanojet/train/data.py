"""train_head.py's training text: the built-in corpus (or, with --regen, the target's responses to prompts cut
from it), or a jsonl file of `text`, `messages` or `prompt` rows, tokenized into one id stream. A bad row is one
error naming the file and line."""
import json
from pathlib import Path

from nanojet.engine.sampling import SamplingParams
from nanojet.llm import LLM
from nanojet.tokenizer import Tokenizer
from nanojet.train.regen import (
    cached_regeneration,
    default_cache,
    regenerate,
    stream_of,
    weights_fingerprint,
)

# Regeneration of the built-in corpus: prompts longer than this are skipped (they would crowd the batch's KV).
REGEN_PROMPT_LIMIT = 256


def load_corpus(data: str, tokenizer: Tokenizer, model_dir: Path, regen: bool, device: str,
                regen_prompts: int = 2000, regen_tokens: int = 192, regen_cache: Path | None = None,
                regen_batch: int = 16) -> list[int]:
    """Training text as one id stream with <|endoftext|>-style separators."""
    separator = tokenizer.eos_token_ids[0]
    if data == "builtin" and regen:
        return stream_of(builtin_regeneration(tokenizer, model_dir, device, regen_prompts, regen_tokens,
                                              regen_cache, regen_batch), separator)
    if data == "builtin":
        from nanojet.weights.build_tiny import corpus
        return corpus(held_out=False, encode_ordinary=tokenizer.encode_ordinary).tolist()
    path = Path(data)
    if path.is_dir():
        raise ValueError(f"--data {path} is a directory; give a .jsonl file (one JSON object per line) or builtin")
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist; give a .jsonl file or builtin")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--data {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    ids: list[int] = []
    llm = LLM(model_dir, device=device) if regen else None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a JSON object with 'text', 'messages' or 'prompt'; "
                             f"got a {type(row).__name__}")
        if "text" in row:
            ids += tokenizer.encode(checked_string(row["text"], "text", where))
        elif "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError(f"{where}: 'messages' must be a list of {{\"role\": str, \"content\": str}} objects")
            ids += tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        elif "prompt" in row:
            prompt = checked_string(row["prompt"], "prompt", where)
            if tokenizer.has_chat_template:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=False)
            prompt_ids = tokenizer.encode(prompt)
            if llm is not None:
                prompt_ids += llm.generate(prompt_ids, SamplingParams(max_new_tokens=256)).token_ids
            ids += prompt_ids
        else:
            raise ValueError(f"{where}: a row needs 'text', 'messages' or 'prompt'; got keys {sorted(row)}")
        ids.append(separator)
    return ids


def builtin_regeneration(tokenizer: Tokenizer, model_dir: Path, device: str, count: int, max_new_tokens: int,
                         cache: Path | None, batch: int) -> list[dict]:
    """The target's responses to `count` function headers (with docstrings) of the training split, cached."""
    from nanojet.weights.build_tiny import function_prompts
    settings = {"target_sha256": weights_fingerprint(model_dir), "prompts": count, "max_new_tokens": max_new_tokens,
                "prompt_limit": REGEN_PROMPT_LIMIT, "source": "build_tiny.function_prompts(held_out=False)"}
    cache = cache or default_cache(model_dir, settings)

    def produce() -> list[dict]:
        encoded = [tokenizer.encode(p) for p in function_prompts(held_out=False, count=4 * count)]
        prompts = [ids for ids in encoded if len(ids) <= REGEN_PROMPT_LIMIT][:count]
        if len(prompts) < count:
            raise ValueError(f"--regen-prompts {count}: the training split has only {len(prompts)} prompts of at "
                             f"most {REGEN_PROMPT_LIMIT} tokens; lower --regen-prompts")
        print(f"regenerating {count} responses of up to {max_new_tokens} tokens into {cache}", flush=True)
        llm = LLM(model_dir, head=None, device=device, max_num_seqs=batch,
                  max_model_len=REGEN_PROMPT_LIMIT + max_new_tokens + 1)
        return regenerate(llm, prompts, max_new_tokens, log=lambda line: print(line, flush=True))

    rows = cached_regeneration(cache, settings, produce)
    print(f"regenerated data: {len(rows)} responses, {sum(len(r['response_ids']) for r in rows)} tokens ({cache})",
          flush=True)
    return rows


def checked_string(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__} {json.dumps(value)[:40]}")
    return value
