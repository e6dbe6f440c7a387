"""train_head.py's training text: the built-in corpus, or a jsonl file of `text`, `messages` or `prompt` rows,
tokenized into one id stream. A bad row is one error naming the file and line."""
import json
from pathlib import Path

from .llm import LLM
from .sampling import SamplingParams
from .tokenizer import Tokenizer


def load_corpus(data: str, tokenizer: Tokenizer, model_dir: Path, regen: bool, device: str) -> list[int]:
    """Training text as one id stream with <|endoftext|>-style separators."""
    separator = tokenizer.eos_token_ids[0]
    if data == "builtin":
        from weights.build_tiny import corpus
        return corpus(held_out=False).tolist()
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


def checked_string(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__} {json.dumps(value)[:40]}")
    return value
