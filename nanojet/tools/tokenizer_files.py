"""Writes a Hugging Face `tokenizer.json` + `tokenizer_config.json` equivalent to tiktoken with given BPE ranks
(Qwen-style): how the embedded model's tokenizer was made (nanojet/weights/build_tiny.py) and how tests give a random
model a tokenizer. Not the runtime: nanojet/tokenizer.py reads these files."""
import json
from pathlib import Path

from nanojet.tokenizer import QWEN3_CHAT_TEMPLATE, QWEN_PATTERN, token_to_str


def _bpe_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge BPE makes on `token`'s bytes using only tokens ranked below it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_index = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:
                best_rank, best_index = rank, i
        if best_index < 0:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) cannot be built from lower-ranked tokens; "
                         f"the ranks are not a BPE merge order")
    return parts[0], parts[1]


def write_tokenizer_files(ranks: dict[bytes, int], special_tokens: dict[str, int], out_dir: str | Path,
                          eos_token: str) -> None:
    """Write HF `tokenizer.json` + `tokenizer_config.json` equivalent to tiktoken with these ranks (Qwen-style)."""
    if eos_token not in special_tokens:
        raise ValueError(f"eos_token {eos_token!r} must be one of the special tokens {sorted(special_tokens)}")
    clashes = set(special_tokens.values()) & set(ranks.values())
    if clashes:
        raise ValueError(f"special token ids {sorted(clashes)[:5]} are also BPE ranks; number specials after the ranks")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(ranks, key=ranks.get)
    merges = [" ".join(map(token_to_str, _bpe_merge(token, ranks))) for token in ordered if len(token) > 1]
    added = [{"id": special_tokens[name], "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name in sorted(special_tokens, key=special_tokens.get)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token_to_str(token): ranks[token] for token in ordered}, "merges": merges},
    }
    pad_token = "<|endoftext|>" if "<|endoftext|>" in special_tokens else eos_token
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": eos_token, "pad_token": pad_token,
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 131072, "chat_template": QWEN3_CHAT_TEMPLATE,
        "added_tokens_decoder": {str(entry["id"]): {k: v for k, v in entry.items() if k != "id"} for entry in added},
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
