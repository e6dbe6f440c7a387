"""Prompt sets for benchmarks: jsonl files of public benchmarks (HumanEval, GSM8K, MT-Bench-style `turns`) and the
embedded model's held-out prompts."""
import json
from pathlib import Path

PROMPT_FIELDS = ("prompt", "question", "problem")


def read_prompts(path: Path, count: int) -> list[str]:
    """The first `count` prompts of a jsonl file: each row's prompt, question, problem or turns[0]."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if len(prompts) == count:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON ({error})") from None
        row = row if isinstance(row, dict) else {}
        turns = row.get("turns") if isinstance(row.get("turns"), list) else []
        text = next((row[f] for f in PROMPT_FIELDS if f in row), turns[0] if turns else None)
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path} line {number}: a row needs a text field {', '.join(PROMPT_FIELDS)} or "
                             f"turns[0]; got keys {sorted(row)}")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def builtin_prompts(count: int) -> list[str]:
    from nanojet.weights.build_tiny import held_out_prompts
    return held_out_prompts(count)
