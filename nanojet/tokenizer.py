"""Tokenizer: Qwen's byte-level BPE run by tiktoken, loaded from HF files or a `.tiktoken` ranks file.

Owns text <-> ids (special tokens included), the Qwen3 chat template and a UTF-8 safe streaming detokenizer
(nanojet/tools/tokenizer_files.py writes the files this reads, for the embedded model and the tests).
tiktoken merges by token rank; HF BPE merges by merge priority. The two agree when every merge produces a token
whose id grows with the merge's position, which is how Qwen's files are made and what `from_dir` checks.
"""
import base64
import codecs
import json
import re
import unicodedata
from pathlib import Path

# Qwen2/Qwen3 pre-tokenizer (the Split regex of their tokenizer.json); tiktoken's fancy-regex reads it unchanged.
# Unlike GPT-2 / cl100k it splits numbers into single digits.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen3's chat template without the tool branches (what `apply_chat_template` implements), for tokenizer_config.json.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if not ns.found and message.role == 'user' %}{%- set ns.found = true %}{%- set ns.last_query_index = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # The remaining bytes (controls, space, ...) get code points from 256 up, so that 0x20 becomes "Ġ".
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_to_str(token: bytes) -> str:
    return token.decode("latin-1").translate(BYTE_TO_CHAR)  # latin-1 keeps byte b as code point b


def _str_to_token(text: str, source: Path) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        raise ValueError(f"{source}: token {text!r} is not byte-level BPE; nanojet reads only GPT-2-style "
                         f"byte-level vocabularies (Qwen, GPT-2, Llama 3)") from None


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token) rank` pair per line."""
    path = Path(path)
    ranks = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{line_number}: expected 'base64-token rank', got {line[:60]!r}; "
                             f"the file is corrupt, re-download it") from None
    return ranks


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-download or regenerate it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object; re-download or regenerate it")
    return data


def _ranks_from_bpe(vocab: dict[str, int], merges: list, source: Path) -> dict[bytes, int]:
    """HF vocab + merges -> tiktoken ranks (rank = id), after checking that tiktoken will merge like HF."""
    ranks = {_str_to_token(text, source): int(index) for text, index in vocab.items()}
    previous = -1
    for position, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        # tiktoken applies the lowest-id merge first, so HF's merge order must be id order (equal ids: several
        # merges that build the same token, as in converted Llama 3 files).
        if merged is None or merged < previous or left not in vocab or right not in vocab:
            raise ValueError(f"{source}: merge {position} ({left!r}, {right!r}) does not produce a token with an id at "
                             f"least that of the merge before it; tiktoken cannot reproduce this BPE")
        previous = merged
    return ranks


class Tokenizer:
    """Byte-level BPE tokenizer backed by `tiktoken.Encoding`, plus special tokens and the chat template."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], *, pattern: str = QWEN_PATTERN,
                 nfc: bool = True, eos_token_ids: list[int] | None = None) -> None:
        import tiktoken

        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:  # tiktoken would panic on text containing such a byte
            raise ValueError(f"the vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
                             f"byte-level BPE needs all 256")
        try:
            self._encoding = tiktoken.Encoding("nanojet", pat_str=pattern, mergeable_ranks=ranks,
                                               special_tokens=special_tokens)
        except ValueError as error:
            raise ValueError(f"tiktoken rejected the tokenizer ({error}); check the pre-tokenizer regex") from None
        self._ranks = ranks
        self._special_tokens = dict(special_tokens)
        self._nfc = nfc  # Qwen normalizes text to NFC before BPE (HF: normalizer NFC; not applied to specials)
        # Longest first, so that one special that is a prefix of another matches like HF's leftmost-longest search.
        names = sorted(special_tokens, key=len, reverse=True)
        self._special_regex = re.compile("|".join(map(re.escape, names))) if names else None
        if eos_token_ids is None:
            eos_token_ids = [special_tokens[n] for n in ("<|endoftext|>", "<|im_end|>") if n in special_tokens]
        self._eos_token_ids = list(eos_token_ids)
        self.has_chat_template = False  # set by from_dir: chat models ship one in tokenizer_config.json

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a model directory: tokenizer.json, else vocab.json + merges.txt, else a *.tiktoken file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist; pass the model directory")
        if path.is_file() and path.suffix != ".tiktoken":
            raise ValueError(f"{path} is a file; pass the directory that holds the tokenizer files (or a .tiktoken)")
        directory = path if path.is_dir() else path.parent  # a .tiktoken path selects that ranks file
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        special_tokens = {entry["content"]: int(index)
                          for index, entry in config.get("added_tokens_decoder", {}).items()}
        pattern, nfc = QWEN_PATTERN, True  # Qwen's slow and tiktoken tokenizers normalize to NFC too
        tiktoken_files = [path] if path.is_file() else sorted(directory.glob("*.tiktoken"))
        if path.is_dir() and (directory / "tokenizer.json").is_file():
            source = directory / "tokenizer.json"
            data = _read_json(source)
            model = data.get("model") or {}
            if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
                raise ValueError(f"{source}: expected a BPE model with vocab and merges, got {model.get('type')!r}")
            ranks = _ranks_from_bpe(model["vocab"], model["merges"], source)
            special_tokens.update({entry["content"]: int(entry["id"]) for entry in data.get("added_tokens") or []})
            pattern = _split_pattern(data.get("pre_tokenizer"), source)
            normalizer = (data.get("normalizer") or {}).get("type")
            if normalizer not in (None, "NFC"):
                raise ValueError(f"{source}: normalizer {normalizer!r} is not supported (only NFC or none)")
            nfc = normalizer == "NFC"
        elif path.is_dir() and (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [line for line in lines if line and not line.startswith("#version")]
            ranks = _ranks_from_bpe(_read_json(directory / "vocab.json"), merges, directory / "merges.txt")
        elif tiktoken_files:
            ranks = load_tiktoken_ranks(tiktoken_files[0])
        else:
            raise FileNotFoundError(f"no tokenizer.json, vocab.json + merges.txt or *.tiktoken in {directory}; "
                                    f"copy the tokenizer files of the model into it")
        eos_token_ids = _eos_token_ids(config, directory / "generation_config.json", special_tokens)
        tokenizer = cls(ranks, special_tokens, pattern=pattern, nfc=nfc, eos_token_ids=eos_token_ids)
        tokenizer.has_chat_template = "chat_template" in config or (directory / "chat_template.jinja").is_file()
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._encoding.max_token_value + 1

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    def token_id(self, name: str) -> int:
        """Id of a special token or of a single ordinary token written as text."""
        if name in self._special_tokens:
            return self._special_tokens[name]
        if name.encode("utf-8") in self._ranks:
            return self._ranks[name.encode("utf-8")]
        raise ValueError(f"token {name!r} is not in the vocabulary; special tokens: {sorted(self._special_tokens)}")

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text become their ids (HF's default)."""
        ids: list[int] = []
        start = 0
        for match in self._special_regex.finditer(text) if self._special_regex else ():
            ids += self.encode_ordinary(text[start:match.start()])
            ids.append(self._special_tokens[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, special tokens written in the text encoded as plain text."""
        return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text) if self._nfc else text)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Ids -> bytes. Ids with no token (a model's embedding is often padded past the tokenizer) decode to
        nothing, as in HF, so a stray padded id cannot crash a stream."""
        try:
            return self._encoding.decode_bytes(ids)
        except KeyError:
            return b"".join(self._token_bytes(i) for i in ids)

    def _token_bytes(self, token_id: int) -> bytes:
        try:
            return self._encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return b""

    def ids_starting_with(self, prefix: bytes) -> list[int]:
        """Ordinary tokens whose bytes start with `prefix` (token healing's candidates for a cut-off token)."""
        return [i for token, i in self._ranks.items() if token.startswith(prefix)]

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True) -> str:
        """Qwen3's chat template for system / user / assistant turns (no tools)."""
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"chat message {message!r}: need role system/user/assistant and string content")
        user_indices = [i for i, m in enumerate(messages) if m["role"] == "user"]
        last_query_index = user_indices[-1] if user_indices else len(messages) - 1
        parts = []
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role != "assistant":
                parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
                continue
            reasoning = ""
            if "</think>" in content:  # history keeps only the answer; the thinking is stripped
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            # Turns after the last user message (the current agentic step) keep their reasoning.
            if index > last_query_index and (index == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                content = f"<think>\n{reasoning}\n</think>\n\n{content}"
            parts.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
        return "".join(parts)


def _split_pattern(pre_tokenizer: dict | None, source: Path) -> str:
    """The Split regex of an HF pre_tokenizer (alone or in a Sequence)."""
    pre_tokenizer = pre_tokenizer or {}
    for step in [pre_tokenizer, *pre_tokenizer.get("pretokenizers", [])]:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    raise ValueError(f"{source}: pre_tokenizer has no Split regex (Qwen-style byte-level BPE expected)")


def _eos_token_ids(config: dict, generation_path: Path, special_tokens: dict[str, int]) -> list[int] | None:
    """generation_config.json's eos_token_id, else tokenizer_config's eos_token, else None (Qwen defaults)."""
    if generation_path.is_file():
        eos = _read_json(generation_path).get("eos_token_id")
        if eos is not None:
            return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    eos_token = config.get("eos_token")
    if isinstance(eos_token, dict):  # older configs store an AddedToken object
        eos_token = eos_token.get("content")
    if not eos_token:
        return None
    if eos_token not in special_tokens:
        raise ValueError(f"tokenizer_config.json: eos_token {eos_token!r} is not among the added tokens; fix the file")
    return [special_tokens[eos_token]]


class IncrementalDetokenizer:
    """Streaming decode: `push` returns only whole characters; bytes of a split character wait for the rest."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Python's incremental UTF-8 decoder holds back an incomplete tail and replaces invalid bytes exactly as a
        # one-shot decode(errors="replace") would, so the streamed pieces concatenate to tokenizer.decode(ids).
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
