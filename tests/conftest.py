"""Shared fixtures: small random Qwen3 checkpoints written by HF transformers, and engines over them."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One thread: the tests run tiny matmuls, where a second thread only adds spin-wait overhead (and
# oversubscription when the machine is busy).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def hf_config(**overrides):
    from transformers import Qwen3Config
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
                tie_word_embeddings=False, rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None,
                pad_token_id=None)
    base.update(overrides)
    return Qwen3Config(**base)


def write_hf_model(directory: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A random HF Qwen3ForCausalLM saved with save_pretrained (fp32), returned in eval mode."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():  # HF initialises norms to ones; random norms exercise the weight mapping better
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


def write_hf_moe_model(directory: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A random HF Qwen3MoeForCausalLM saved with save_pretrained (fp32), returned in eval mode. The router is
    drawn wider than HF's init so routing probabilities are far from uniform (renormalising them matters)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6, eos_token_id=None,
                bos_token_id=None, pad_token_id=None, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    base.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**base)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


def write_byte_tokenizer(directory: Path, vocab_size: int = 320) -> None:
    """A tokenizer of the 256 bytes plus specials, so run.py / LLM can be driven on a random model."""
    from nanojet.tokenizer import BYTE_TO_CHAR
    from nanojet.tools.tokenizer_files import write_tokenizer_files
    ranks = {bytes([b]): i for i, b in enumerate(BYTE_TO_CHAR)}
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    assert vocab_size > 258
    write_tokenizer_files(ranks, specials, directory, eos_token="<|endoftext|>")


def make_engine(model_dir: Path, page_size: int = 8, max_model_len: int = 256, head=None,
                dtype=torch.float32, device: str = "cpu", execution: str = "eager", max_tree_nodes: int = 512,
                prefill_chunk: int = 512, num_pages: int | None = None):
    """An Engine over a checkpoint directory, without a tokenizer; its pool holds exactly one sequence of
    `max_model_len` tokens with the scratch of trees up to `max_tree_nodes` (sized as LLM sizes it), or
    `num_pages` pages."""
    from nanojet.engine.engine import Engine
    from nanojet.engine.kv_cache import KVCache
    from nanojet.engine.round import pages_per_sequence
    from nanojet.llm import load_target
    model = load_target(model_dir, dtype, torch.device(device))
    config = model.config
    layers = config.num_hidden_layers + (head.config.layers.num_hidden_layers if head else 0)
    pages = pages_per_sequence(max_model_len, max_tree_nodes, head.config.block_size if head else 1, page_size)
    cache = KVCache(layers, config.num_key_value_heads, config.head_dim, num_pages or pages, page_size, pages, dtype,
                    torch.device(device))
    return Engine(model, cache, max_model_len, eos_token_ids=[], head=head, execution=execution,
                  prefill_chunk=prefill_chunk)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """One shared random checkpoint (GQA 2, head_dim != hidden/heads, untied) with a byte tokenizer."""
    directory = tmp_path_factory.mktemp("hf_model")
    model = write_hf_model(directory, seed=1, head_dim=24)
    write_byte_tokenizer(directory)
    return directory, model


def random_head(target_config, causal: bool = True, seed: int = 0, layers: int = 2, block_size: int = 8,
                target_layer_ids=(0, 1), mask_token_id: int = 300):
    """A randomly initialised draft head that fits `target_config` (drafts are poor; losslessness is not)."""
    from dataclasses import replace

    from nanojet.model.head import DraftHead, HeadConfig
    config = HeadConfig(layers=replace(target_config, num_hidden_layers=layers), block_size=block_size,
                        num_target_layers=target_config.num_hidden_layers, target_layer_ids=list(target_layer_ids),
                        mask_token_id=mask_token_id, causal=causal)
    torch.manual_seed(seed)
    head = DraftHead(config).eval()
    with torch.no_grad():
        for name, param in head.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    return head


def oracle_drafter(reference: list[int], vocab_size: int, shift: int = 0, wrong_from_depth: int | None = None):
    """A stand-in for `StaticRound.draft_candidates` that drafts the known continuation `reference` (prompt + plain
    output): row d-1 of sequence s puts all its mass on `reference[n-1+d]`, where n-1 = length[s] is the anchor's
    position (and returns each row's top `width` candidates, as the head's drafter does). `shift` drafts positions that far off; from `wrong_from_depth` on, rows draft a token the reference
    does not have there (so exactly the shallower depths can be accepted). Tensor ops only: it runs inside the
    static round eagerly, compiled or graphed."""
    padded = torch.tensor(reference + [0] * 64)
    on_device = {}  # the reference per device, copied on the first call (a graph's uncaptured warmup), not in a capture

    def draft_candidates(round_, pool, anchor, length, block_table, scratch=None):
        if length.device not in on_device:
            on_device[length.device] = padded.to(length.device)
        rows = round_.head.config.block_size - 1
        depth = torch.arange(1, rows + 1, device=length.device)
        index = (length[:, None] + depth + shift).clamp(max=padded.numel() - 1)  # [S, B-1]
        tokens = on_device[length.device][index]
        if wrong_from_depth is not None:
            tokens = torch.where(depth >= wrong_from_depth, (tokens + 1) % vocab_size, tokens)
        logprobs = torch.full((*index.shape, vocab_size), -30.0, device=length.device)
        return tuple(logprobs.scatter(-1, tokens[..., None], 0.0).topk(round_.spec.width, dim=-1))

    return draft_candidates


def dense_reference(target, prompt: list[int], params, count: int) -> list[int]:
    """Plain decoding from scratch, the definition the engine must reproduce: every token recomputes a dense
    causal forward over the whole sequence (no KV cache, no tree, no round), and token i is
    `argmax(filter(logits / T) + gumbel_noise(seed, position))` at its absolute position (argmax when greedy)."""
    from nanojet.engine.sampling import gumbel_noise
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            hidden, _ = target.forward_dense(torch.tensor([ids], device=target.norm.device))
            logits = target.logits(hidden[0, -1:])  # [1, V] at position len(ids) - 1
            if params.temperature > 0:
                filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
                logits = filtered + gumbel_noise(params.seed, torch.tensor([len(ids)]), logits.shape[-1])
            ids.append(int(logits.argmax(-1)))
    return ids[len(prompt):]


def draft_after(engine, sequence, anchor: int) -> torch.Tensor:
    """The head's draft log-probs `[B-1, V]` (full vocabulary) for a sequence whose KV holds `sequence.length`
    slots: the distribution the round's top-width candidates are taken from."""
    from nanojet.engine.request import SpeculativeParams
    from nanojet.engine.round import StaticRound
    round_ = StaticRound(engine.target, engine.head, engine.kv, SpeculativeParams(budget=2, width=1), False)
    round_.begin(0, sequence, anchor)
    table = round_.table([sequence])
    hidden = round_.draft_hidden(engine.kv.pool, round_.anchor, round_.length, table)[0, 1:]  # [B-1, H]
    return torch.log_softmax(engine.target.logits(hidden), dim=-1)


def step_metadata(cache, sequences: list, positions: list[torch.Tensor], visibility: list[torch.Tensor],
                  packed: bool = False):
    """Attention metadata built on the host for a step that appends `len(positions[s])` new tokens after each
    sequence's length (the engine builds its own: `Engine.forward_chunks`, the round's persistent buffers).

    `visibility[s]` is the bool `[n_s, n_s]` mask among sequence s's new tokens (causal chain, tree ancestors, or
    all ones), or its bit words when `packed`. Pages for the new slots are reserved here."""
    from nanojet.kernels.reference import pack_visibility
    from nanojet.model.attention import AttentionMetadata
    device = cache.pool.device
    counts = [len(p) for p in positions]
    for sequence, count in zip(sequences, counts):
        cache.reserve(sequence, sequence.length + count)
    if not packed:
        visibility = [pack_visibility(v.to(device)) for v in visibility]
    words = max(v.shape[1] for v in visibility)
    padded = [torch.nn.functional.pad(v, (0, words - v.shape[1])) for v in visibility]
    return AttentionMetadata(
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat([cache.slots(s, s.length, s.length + c) for s, c in zip(sequences, counts)]),
        block_tables=torch.stack([cache.block_table(s) for s in sequences]).to(device),
        prefix_lens=torch.tensor([s.length for s in sequences], dtype=torch.int32, device=device),
        query_starts=torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(device),
        visibility=torch.cat(padded).to(device),
    )


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf: the definition the engine's
    batched filters (`sampling.sample_rows`) are checked against, written for one setting at a time."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
