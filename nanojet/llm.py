"""The user-facing entry point: `LLM(model_dir).generate(prompt, SamplingParams(...))`.

Loads the target (and a draft head), sizes the KV pool, applies the chat template and detokenizes."""
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nanojet.engine.engine import Engine, default_execution
from nanojet.engine.kv_cache import KVCache
from nanojet.engine.logprobs import TokenLogprobs
from nanojet.engine.request import GenerationStats, Request, SpeculativeParams
from nanojet.engine.round import pages_per_sequence
from nanojet.engine.sampling import SamplingParams
from nanojet.engine.scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_STEP_TOKENS
from nanojet.model.config import ModelConfig
from nanojet.model.generation_config import GenerationDefaults
from nanojet.model.head import DraftHead, load_head
from nanojet.model.loader import load_weights
from nanojet.model.qwen3 import Qwen3, rope_inv_freq
from nanojet.tokenizer import IncrementalDetokenizer, Tokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = WEIGHTS_DIR / "qwen3-stdlib-tiny"
DEFAULT_HEAD_NAME = "head-causal"  # the draft head shipped beside a model: <model>/head-causal
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is available; use cpu (--device cpu)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls are hundreds of times slower than fp32 on the CPUs this runs on.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32 or bfloat16")
    return DTYPES[name]


def resolve_head(model_dir: str | Path, head: str | Path | None) -> Path | None:
    """`head`: a head directory, "auto" (the head shipped at <model>/head-causal, or None when there is none)
    or None (plain decoding)."""
    if head is None:
        return None
    if head == "none":
        raise ValueError("head='none' is run.py's spelling; pass head=None for plain decoding")
    if head == "auto":
        shipped = Path(model_dir) / DEFAULT_HEAD_NAME
        return shipped if (shipped / "config.json").is_file() else None
    return Path(head)


def load_target(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> Qwen3:
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = Qwen3(config)  # no random init: every parameter comes from the checkpoint
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no full-precision copy on the device
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta).to(device)
    load_weights(model, model_dir, ignore=("lm_head.weight",) if config.tie_word_embeddings else ())
    return model.eval()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@dataclass
class Output:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    stats: GenerationStats
    token_healed: bool = False  # the last prompt token was taken back and regenerated (token healing)
    logprobs: list[TokenLogprobs] | None = None  # one per token id when SamplingParams.logprobs asks


def exactness(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where speculative output equals plain decoding by construction (CUDA: every target kernel is
    row-invariant, nanojet/kernels/README.md); else why it may not. The CPU runs torch's reference ops, whose
    matrix products round a row differently among other rows: in fp32 that has not flipped a token in any test,
    in bf16 a near-tie can flip."""
    if device.type == "cuda":
        return None
    if dtype == torch.float32:
        return "exact in every fp32 test, not by construction (CPU products are not row-invariant)"
    return f"may differ from plain decoding ({str(dtype).removeprefix('torch.')} on the CPU is not row-invariant)"


class LLM:
    def __init__(self, model: str | Path = DEFAULT_MODEL, head: str | Path | None = None, device: str = "auto",
                 dtype: str = "auto", max_model_len: int | None = None, kv_page_size: int = 16,
                 max_tree_nodes: int = 512, kv_memory_gb: float | None = None, compile: bool = False,
                 enforce_eager: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_num_seqs: int = 1,
                 step_tokens: int = DEFAULT_STEP_TOKENS):
        """`head`: a draft head directory, "auto" (the model's shipped head if it has one) or None (plain decoding).
        On CUDA each round shape (tree budget/width/depth, greedy or sampled, batch bucket) is captured as a CUDA
        graph on first use, unless `enforce_eager`. `compile` adds torch.compile (inside the graphs on CUDA; alone
        on the CPU). Prompts are prefilled in chunks of `prefill_chunk` tokens. A list of prompts is generated
        with continuous batching, up to `max_num_seqs` at once (the KV pool holds that many full-length
        sequences unless `kv_memory_gb` sizes it) and `step_tokens` target tokens per step."""
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        head = resolve_head(model, head)
        self.tokenizer = Tokenizer.from_dir(model)
        self.generation_defaults = GenerationDefaults.from_dir(model)
        self.model = load_target(model, self.dtype, self.device)
        config = self.model.config
        self.head: DraftHead | None = None if head is None else load_head(head, config, self.dtype, self.device)
        if self.head is not None:
            self.head.eval()
        if max_model_len is not None and not 2 <= max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} must lie in 2..{config.max_position_embeddings} "
                             f"(the model's max_position_embeddings)")
        self.max_model_len = max_model_len or config.max_position_embeddings
        head_layers = self.head.config.layers.num_hidden_layers if self.head else 0
        table_width = pages_per_sequence(self.max_model_len, max_tree_nodes,
                                         self.head.config.block_size if self.head else 1, kv_page_size)
        layers = config.num_hidden_layers + head_layers
        pages = table_width * max_num_seqs
        if kv_memory_gb is not None and not (isinstance(kv_memory_gb, (int, float)) and math.isfinite(kv_memory_gb)):
            raise ValueError(f"kv_memory_gb must be a finite number of GiB, got {kv_memory_gb!r}")
        if kv_memory_gb is not None:  # a memory budget instead of room for one full-length sequence
            page_bytes = layers * 2 * kv_page_size * config.num_key_value_heads * config.head_dim * self.dtype.itemsize
            pages = int(kv_memory_gb * 2**30 // page_bytes)
            if pages < 1:
                raise ValueError(f"kv_memory_gb {kv_memory_gb} holds no KV page ({page_bytes} bytes each); raise it "
                                 f"(--kv-memory-gb) or leave it unset to size the pool for max_model_len")
        self.kv_cache = KVCache(layers, config.num_key_value_heads, config.head_dim, num_pages=pages,
                                kv_page_size=kv_page_size, max_pages_per_sequence=table_width,
                                dtype=self.dtype, device=self.device)
        eos = sorted(set(config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        self.engine = Engine(self.model, self.kv_cache, self.max_model_len, eos, self.head,
                             execution=default_execution(self.device, compile, enforce_eager),
                             prefill_chunk=prefill_chunk, max_num_seqs=max_num_seqs, step_tokens=step_tokens)
        self.max_tree_nodes = max_tree_nodes

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None,
                      enable_thinking: bool = False) -> list[int]:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                        "content": prompt}]
            prompt = self.tokenizer.apply_chat_template(messages, enable_thinking=enable_thinking)
        return self.tokenizer.encode(prompt)

    def generate(self, prompt: str | list[int] | list[str | list[int]], params: SamplingParams | None = None,
                 spec: SpeculativeParams | None = None, chat: bool = False,
                 on_text: Callable[[str], None] | None = None,
                 token_healing: bool | None = None) -> Output | list[Output]:
        """Generate after `prompt` (text, or token ids used as they are). `spec` turns on tree drafting.
        `params` None: the model's generation_config.json defaults (`self.generation_defaults`). A list of prompts
        (texts or id lists) goes to `generate_batch` and returns a list of outputs in the same order.

        Token healing (raw text prompts; None: on when generation_config.json sets `"token_healing": true`): a
        prompt cut inside what training text tokenizes as one piece (e.g. `"):"` where the data always has
        `"):\n"`) leaves the model an unusual last token. The last prompt token is taken back and the first
        generated token must start with its bytes; the returned text and stream begin after those bytes, so
        they continue the prompt exactly. Off by default, as in transformers: it changes the ids."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], numbers.Integral):
            if on_text is not None:
                raise ValueError("on_text streams one prompt; for many, use the server or generate them unstreamed")
            return self.generate_batch(prompt, params, spec, chat, token_healing)
        params = self._check_params(params, spec)
        ids, healed, first_token_ids = self.prepare_prompt(prompt, params, spec, chat, token_healing)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        skip = len(healed.decode("utf-8"))  # characters of the healed token the prompt already shows

        def stream(tokens: list[int]) -> None:
            nonlocal skip
            text = "".join(detokenizer.push(t) for t in self.text_ids(tokens, params))
            text, skip = text[skip:], max(0, skip - len(text))
            on_text(text)

        result = self.engine.generate(ids, params, spec, stream if on_text else None, first_token_ids)
        if on_text:
            on_text(detokenizer.flush())
        return Output(text=self._text(result.token_ids, params, healed), token_ids=result.token_ids, prompt_token_ids=ids,
                      stats=result.stats, token_healed=bool(healed), logprobs=result.logprobs)

    def generate_batch(self, prompts: list[str | list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None,
                       spec: SpeculativeParams | None = None, chat: bool = False,
                       token_healing: bool | None = None) -> list[Output]:
        """Generate after every prompt with continuous batching (`Scheduler`); outputs come back in prompt order,
        each with exactly the ids `generate` gives for that prompt alone. `params`: one for all, or one each."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts; give one or one each")
        per_prompt = [self._check_params(p, spec) for p in per_prompt]
        prepared = [self.prepare_prompt(prompt, p, spec, chat, token_healing) for prompt, p in zip(prompts, per_prompt)]
        requests = [Request(ids, p, spec, first) for (ids, _, first), p in zip(prepared, per_prompt)]
        self.engine.run(requests)
        failed = next((r for r in requests if r.error), None)
        if failed is not None:
            raise RuntimeError(f"prompt {requests.index(failed)}: {failed.error}")
        return [Output(text=self._text(r.output_ids, r.params, healed), token_ids=r.output_ids, prompt_token_ids=ids,
                       stats=r.stats, token_healed=bool(healed), logprobs=r.logprobs)
                for r, (ids, healed, _) in zip(requests, prepared)]

    def _check_params(self, params: SamplingParams | None, spec: SpeculativeParams | None) -> SamplingParams:
        params = params or SamplingParams(**self.generation_defaults.sampling)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if spec is not None and not isinstance(spec, SpeculativeParams):
            raise ValueError(f"spec must be a SpeculativeParams or None, got {type(spec).__name__}")
        if spec is not None and spec.budget > self.max_tree_nodes:
            raise ValueError(f"budget {spec.budget} exceeds max_tree_nodes {self.max_tree_nodes}")
        return params

    def prepare_prompt(self, prompt: str | list[int], params: SamplingParams, spec: SpeculativeParams | None,
                       chat: bool = False,
                       token_healing: bool | None = None) -> tuple[list[int], bytes, list[int] | None]:
        """Prompt -> (ids to prefill, healed bytes, allowed first tokens or None); see `generate` on healing."""
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be text (str) or a list of token ids, got {type(prompt).__name__}")
        if token_healing is None:
            token_healing = self.generation_defaults.token_healing
        ids = self._check_token_ids(prompt) if isinstance(prompt, list) else self.encode_prompt(prompt, chat)
        self.engine.check(Request(ids, params, spec))  # the prompt as given must fit, healed or not
        if token_healing and isinstance(prompt, str) and not chat and len(ids) > 1:
            tail = self.tokenizer.decode_bytes(ids[-1:])
            candidates = self.tokenizer.ids_starting_with(tail)
            if candidates and _is_utf8(tail):  # a token that is part of a character is left alone
                return ids[:-1], tail, candidates
        return ids, b"", None

    def text_ids(self, token_ids: list[int], params: SamplingParams) -> list[int]:
        """The ids whose text is shown: all but a final stop token that ended the generation (the ids keep it, as
        transformers' generate does; the text never shows it)."""
        if token_ids and not params.ignore_eos and token_ids[-1] in self.engine.eos_token_ids:
            return token_ids[:-1]
        return token_ids

    def _text(self, token_ids: list[int], params: SamplingParams, healed: bytes) -> str:
        data = self.tokenizer.decode_bytes(self.text_ids(token_ids, params))
        return data[len(healed):].decode("utf-8", errors="replace")

    def _check_token_ids(self, ids: list) -> list[int]:
        vocab = self.model.config.vocab_size
        for index, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise ValueError(f"prompt token {index} is {token!r}; token ids must be integers")
            if not 0 <= token < vocab:
                raise ValueError(f"prompt token {index} is id {token}, outside the vocabulary (0..{vocab - 1})")
        return [int(token) for token in ids]
