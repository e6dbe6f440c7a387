"""Regenerated training data for a draft head: prompts answered by the target itself, cached on disk.

A head drafts what the target will write, so it learns best from text the target wrote (DFlash, JetSpec, EAGLE
and SpecForge all train on regenerated responses). `regenerate` answers every prompt with nanojet's batched
plain decoding; prompt i is answered greedily when i is even and sampled (temperature 0.8, top-p 0.95, seed i)
when odd, so the data holds both what greedy decoding loops on and the spread sampling reaches.

Cache format (one JSON object per line): a header `{"regen_cache": 1, "settings": {...}}` naming the target's
weights (sha256 of its safetensors files) and the settings, then one row per prompt `{"prompt_ids": [...],
"response_ids": [...], "temperature": t}`. `cached_regeneration` reuses a file whose settings match and
refuses one whose settings differ.
"""
import hashlib
import json
import time
from pathlib import Path

from nanojet.engine.sampling import SamplingParams

CACHE_VERSION = 1
SAMPLED_TEMPERATURE, SAMPLED_TOP_P = 0.8, 0.95


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the checkpoint's safetensors files (names and bytes): a cache is only valid for these weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sampling_for(index: int, max_new_tokens: int) -> SamplingParams:
    """Even prompts greedy, odd prompts sampled with their own seed."""
    if index % 2 == 0:
        return SamplingParams(max_new_tokens=max_new_tokens)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=SAMPLED_TEMPERATURE, top_p=SAMPLED_TOP_P,
                          seed=index)


def regenerate(llm, prompts: list[list[int]], max_new_tokens: int, log=print) -> list[dict]:
    """Answer every prompt (token ids) with `llm` (an `LLM`, plain decoding, batched by its max_num_seqs)."""
    rows, start, chunk = [], time.time(), 64  # chunks only to report progress; the batcher refills within each
    for first in range(0, len(prompts), chunk):
        part = prompts[first:first + chunk]
        params = [sampling_for(first + i, max_new_tokens) for i in range(len(part))]
        for prompt, p, out in zip(part, params, llm.generate_batch(part, params)):
            rows.append({"prompt_ids": prompt, "response_ids": out.token_ids, "temperature": p.temperature})
        written = sum(len(r["response_ids"]) for r in rows)
        log(f"regenerated {len(rows)}/{len(prompts)} responses, {written} tokens, "
            f"{written / (time.time() - start):.0f} tokens/s")
    return rows


def cached_regeneration(cache: Path, settings: dict, produce) -> list[dict]:
    """The rows in `cache` if its settings equal `settings`; else `produce()`'s rows, written there first."""
    if cache.is_file():
        with cache.open() as handle:
            try:
                header = json.loads(handle.readline())
            except json.JSONDecodeError:
                header = None
            if not isinstance(header, dict) or header.get("regen_cache") != CACHE_VERSION:
                raise ValueError(f"{cache} is not a regeneration cache (version {CACHE_VERSION}); delete it or "
                                 f"give another --regen-cache")
            if header.get("settings") != settings:
                raise ValueError(f"{cache} holds responses for other settings ({header.get('settings')}); delete "
                                 f"it or give another --regen-cache")
            return [json.loads(line) for line in handle if line.strip()]
    rows = produce()
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(cache.suffix + ".partial")  # never leave a truncated cache behind
    with partial.open("w") as handle:
        handle.write(json.dumps({"regen_cache": CACHE_VERSION, "settings": settings}) + "\n")
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    partial.replace(cache)
    return rows


def default_cache(model_dir: Path, settings: dict) -> Path:
    """runs/regen/<model>-<hash of the settings>.jsonl: one file per target and setting, found again by later runs."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path("runs") / "regen" / f"{Path(model_dir).resolve().name}-{key}.jsonl"


def stream_of(rows: list[dict], separator: int) -> list[int]:
    """Prompt, response and a separator per row, as one id stream (the head learns on prompt text as well:
    inference drafts after the prompt too)."""
    ids: list[int] = []
    for row in rows:
        ids += row["prompt_ids"] + row["response_ids"] + [separator]
    return ids
