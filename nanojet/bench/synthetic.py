"""Random Qwen3 targets and draft heads in the published shapes, and an engine over modules: for measuring the
engine on big shapes (a GPU) without downloading a checkpoint. Outputs are meaningless; timings are not."""
from dataclasses import replace

import torch

from nanojet.engine.engine import Engine
from nanojet.engine.kv_cache import KVCache
from nanojet.engine.round import pages_per_sequence
from nanojet.engine.scheduler import DEFAULT_PREFILL_CHUNK
from nanojet.model.config import ModelConfig
from nanojet.model.head import DraftHead, HeadConfig
from nanojet.model.qwen3 import Qwen3, rope_inv_freq

SHAPES = {  # the published Qwen3 configs (Qwen3-30B-A3B: every layer a MoE layer)
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=False,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
}


def random_module(build, config, dtype: torch.dtype, device: torch.device):
    """`build(config)` with random weights, allocated once on `device` in `dtype` (no fp32 copy first)."""
    with torch.device("meta"):
        module = build(config)
    module = module.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for param in module.parameters():
            param.fill_(1.0) if param.dim() == 1 else param.normal_(0.0, 0.02)  # norms 1, matrices N(0, 0.02)
    shape = getattr(config, "layers", config)
    module.inv_freq = rope_inv_freq(shape.head_dim, shape.rope_theta).to(device)
    return module.eval()


def synthetic_config(name: str, layers: int | None = None, vocab: int | None = None) -> ModelConfig:
    """The published config `name`, optionally cut to fewer layers / a smaller vocabulary."""
    shape = {**SHAPES[name], "num_hidden_layers": layers or SHAPES[name]["num_hidden_layers"],
             "vocab_size": vocab or SHAPES[name]["vocab_size"]}
    return ModelConfig(**shape, rope_theta=1_000_000.0, max_position_embeddings=40960)


def synthetic_target(name: str, dtype: torch.dtype, device: torch.device) -> Qwen3:
    """A random target in the published shape `name` (train_head.py --synthetic)."""
    return random_module(Qwen3, synthetic_config(name), dtype, device)


def synthetic_models(name: str, dtype: torch.dtype, device: torch.device, layers: int | None = None,
                     vocab: int | None = None) -> tuple[Qwen3, DraftHead]:
    """Target in shape `name` (optionally cut to fewer layers / a smaller vocabulary) and a head of the published
    JetSpec size: 5 layers, block 16, 5 taps spread over 0 .. L-2 (a 1-layer cut can only tap its one layer)."""
    return random_models(synthetic_config(name, layers, vocab), dtype, device)


def random_models(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[Qwen3, DraftHead]:
    """A random target of `config` and a random head of the published JetSpec size over it (`synthetic_models`)."""
    depth = config.num_hidden_layers
    taps = sorted({round(i * (depth - 2) / 4) for i in range(5)}) if depth > 1 else [0]
    head_config = HeadConfig(layers=replace(config, num_hidden_layers=5), block_size=16, num_target_layers=depth,
                             target_layer_ids=taps, mask_token_id=config.vocab_size - 1)
    return random_module(Qwen3, config, dtype, device), random_module(DraftHead, head_config, dtype, device)


def build_engine(target: Qwen3, head: DraftHead, max_model_len: int, max_tree_nodes: int,
                 execution: str = "eager", prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Engine:
    """An Engine over modules already on their device, with a KV pool sized the way LLM sizes it."""
    config, kv_page_size = target.config, 16
    pages = pages_per_sequence(max_model_len, max_tree_nodes, head.config.block_size, kv_page_size)
    kv_cache = KVCache(config.num_hidden_layers + head.config.layers.num_hidden_layers, config.num_key_value_heads,
                       config.head_dim, pages, kv_page_size, pages, target.norm.dtype, target.norm.device)
    return Engine(target, kv_cache, max_model_len, eos_token_ids=[], head=head, execution=execution,
                  prefill_chunk=prefill_chunk)
