"""The causal parallel draft head (JetFlow), in the JetSpec / DFlash checkpoint format.

A few Qwen3 decoder layers that draft a whole block in one forward. Context: taps of chosen target layers,
concatenated, projected by `fc` and normed by `hidden_norm`; in every head layer K/V span `[context ; block]`
and Q comes from the block only. The block is the target's embedding of `[anchor, MASK x (B-1)]` at positions
`n-1 .. n+B-2`, attended causally (JetFlow) or fully (DFlash). Final norm, then the target's lm_head on block
rows 1..B-1: row j drafts the token at depth j. The context K/V are exact functions of the taps, so they live
in the paged pool at the same slots as the target's K/V and grow by the accepted path each round.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nanojet import kernels
from nanojet.model.attention import AttentionMetadata
from nanojet.model.config import ModelConfig
from nanojet.model.draft_vocab import load_draft_vocab, save_draft_vocab
from nanojet.model.loader import hf_state_dict, load_weights
from nanojet.model.packed_gemm import Linear, linear, weight_version
from nanojet.model.qwen3 import DecoderLayer, rope_inv_freq


@dataclass
class HeadConfig:
    layers: ModelConfig  # shapes of the head's decoder layers (hidden size and vocabulary are the target's)
    block_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    causal: bool = True
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged on save

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"head config: block_size must be >= 2 (anchor + one draft row), got {self.block_size}")
        if not self.target_layer_ids:
            raise ValueError("head config: dflash_config.target_layer_ids is empty")

    @classmethod
    def from_dict(cls, raw: dict, target_layers: int | None = None) -> "HeadConfig":
        """Read a JetSpec / DFlash config.json. Absent `target_layer_ids` are derived by the published rule
        (`published_layer_ids`); absent `num_target_layers` is the target's (`target_layers`)."""
        dflash = raw.get("dflash_config") or {}
        num_target_layers = raw.get("num_target_layers", target_layers)
        missing = [k for k, v in (("block_size", raw.get("block_size")), ("num_target_layers", num_target_layers))
                   if v is None]
        if "mask_token_id" not in dflash:  # no tokenizer here to look `<|MASK|>` up in
            missing.append("dflash_config.mask_token_id")
        if missing:
            raise ValueError(f"head config lacks {', '.join(missing)}; is this a JetSpec/DFlash draft head?")
        layers = ModelConfig.from_dict({**raw, "architectures": ["Qwen3ForCausalLM"]})
        ids = dflash.get("target_layer_ids")
        if ids is None:
            ids = published_layer_ids(num_target_layers, layers.num_hidden_layers)
        # JetSpec writes `causal`, some exports `causal_head`; DFlash heads have neither and are bidirectional.
        causal = next((source[key] for source in (dflash, raw) for key in ("causal", "causal_head") if key in source),
                      False)
        return cls(layers=layers, block_size=raw["block_size"], num_target_layers=num_target_layers,
                   target_layer_ids=list(ids), mask_token_id=dflash["mask_token_id"], causal=bool(causal), extra=raw)

    def to_dict(self) -> dict:
        c = self.layers
        return {**self.extra, "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
                "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
                "attention_bias": c.attention_bias, "tie_word_embeddings": False, "hidden_act": "silu",
                "block_size": self.block_size, "num_target_layers": self.num_target_layers,
                "dflash_config": {"target_layer_ids": self.target_layer_ids, "mask_token_id": self.mask_token_id,
                                  "causal": self.causal, "causal_head": self.causal}}

    def check_fits(self, target: ModelConfig) -> None:
        """Refuse a head that cannot run on this target, with the reason. A head trained on a target of another
        depth or vocabulary still runs (losslessly; its acceptance is another matter), so that is not refused."""
        c = self.layers
        problems = []
        if c.hidden_size != target.hidden_size:
            problems.append(f"hidden size {c.hidden_size} != target's {target.hidden_size} (it reads the target's "
                            f"embeddings and taps)")
        if any(not 0 <= i < target.num_hidden_layers for i in self.target_layer_ids):
            problems.append(f"target_layer_ids {self.target_layer_ids} must lie in 0..{target.num_hidden_layers - 1} "
                            f"(the target's layers)")
        if (c.num_key_value_heads, c.head_dim) != (target.num_key_value_heads, target.head_dim):
            problems.append(f"its KV heads x head_dim ({c.num_key_value_heads} x {c.head_dim}) differ from the "
                            f"target's ({target.num_key_value_heads} x {target.head_dim}); nanojet keeps both in one "
                            f"paged KV pool, whose rows have the target's shape")
        if not 0 <= self.mask_token_id < target.vocab_size:
            problems.append(f"mask_token_id {self.mask_token_id} is outside the target's vocabulary "
                            f"(0..{target.vocab_size - 1})")
        if problems:
            raise ValueError(f"draft head does not fit the target model: {'; '.join(problems)}; "
                             f"use a head trained for this target (train_head.py) or decode plainly")


def published_layer_ids(num_target_layers: int, num_head_layers: int) -> list[int]:
    """The taps DFlash / JetSpec heads use when their config names none: one per head layer, spread evenly over
    target layers 1 .. L-3 (the middle layer for a one-layer head)."""
    if num_head_layers == 1:
        return [num_target_layers // 2]
    first, last = 1, num_target_layers - 3
    return [int(round(first + i * (last - first) / (num_head_layers - 1))) for i in range(num_head_layers)]


class DraftHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        c = config.layers
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.fc = Linear(len(config.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)
        # Target ids the head may draft (nanojet/model/draft_vocab.py), None: all. Not in model.safetensors.
        self.register_buffer("draft_vocab", None, persistent=False)
        self._draft_rows: tuple | None = None  # (lm_head weight, vocabulary, its rows, their packed copies)
        self._context_kv: tuple | None = None  # (weight versions, `context_kv_weights`)

    def draft_lm_head(self, lm_head_weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The rows of the target's lm_head `[V, H]` that drafting scores (all of them, or the draft vocabulary's),
        built once rather than per round, and a dict for their packed copies (nanojet/model/packed_gemm.py), new whenever
        the rows are."""
        cached = self._draft_rows
        if cached is None or cached[0] is not lm_head_weight or cached[1] is not self.draft_vocab:
            vocab = self.draft_vocab
            rows = lm_head_weight if vocab is None else lm_head_weight[vocab.to(lm_head_weight.device)]  # a copy
            self._draft_rows = cached = (lm_head_weight, self.draft_vocab, rows, {})
        return cached[2], cached[3]

    def block_visibility(self, device: torch.device | None = None) -> torch.Tensor:
        """bool `[B, B]` mask inside the block: lower-triangular (causal) or all ones (bidirectional)."""
        ones = torch.ones(self.config.block_size, self.config.block_size, dtype=torch.bool, device=device)
        return ones.tril() if self.config.causal else ones

    def project_context(self, taps: torch.Tensor) -> torch.Tensor:
        """taps `[C, k*H]` -> context rows `[C, H]`."""
        return kernels.rms_norm(self.fc(taps), self.hidden_norm, self.config.layers.rms_norm_eps)[0]

    def extend_context(self, taps: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_pool: torch.Tensor) -> None:
        """Write the context K/V of new committed positions into the head's layers of the pool
        (`kv_pool[i]` is head layer i)."""
        context = self.project_context(taps)
        plan = kernels.plan_context(positions, self.inv_freq, slot_mapping)  # shared by the layers, as in forward
        if plan is not None and context.dtype == torch.float32:
            self._extend_context_at_once(context, plan, kv_pool)
            return
        positions, slot_mapping = kernels.materialized(positions, slot_mapping)  # once for all layers
        for index, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(context, positions, self.inv_freq, plan)
            kernels.store_kv(kv_pool[index][0], kv_pool[index][1], k, v, slot_mapping, plan)

    def _extend_context_at_once(self, context: torch.Tensor, plan, kv_pool: torch.Tensor) -> None:
        """`extend_context` on the reference path in fp32 (the eager CPU round), all layers at once. Every layer
        projects the same context rows, so their K/V come from one product with the layers' K/V weights stacked,
        are normed and rotated in one pass and stored with one copy: a dozen ops instead of two dozen per layer.
        Bit for bit what the per-layer path writes (`torch.rms_norm` without a weight, then the weight, is the same
        products in the same order)."""
        weight, bias, k_norms, packed = self.context_kv_weights()
        attn = self.layers[0].self_attn
        rows, layers, heads, head_dim = context.shape[0], len(self.layers), attn.num_kv_heads, attn.head_dim
        kv = linear(context, weight, bias, packed).view(rows, layers, 2, heads, head_dim)
        k = torch.rms_norm(kv[:, :, 0], (head_dim,), None, attn.eps) * k_norms  # [rows, layers, heads, D]
        k = kernels.reference.rotate(k.view(rows, layers * heads, head_dim), plan.rope)
        both = torch.stack([k.view(rows, layers, heads, head_dim), kv[:, :, 1]], dim=2)  # [rows, layers, 2, heads, D]
        slots, keep = plan.store
        if keep is not None:
            both = both[keep]
        kv_pool.view(layers, 2, -1, heads, head_dim).index_copy_(2, slots, both.permute(1, 2, 0, 3, 4))

    def context_kv_weights(self) -> tuple:
        """(every layer's K and V rows of its fused projection stacked `[L * 2 * kv, H]`, their bias or None, the
        layers' k-norm weights `[L, 1, D]`, a dict for the stack's packed copies), rebuilt whenever a layer's
        weights were written since (training)."""
        params = [p for layer in self.layers for p in (layer.self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.bias,
                                                       layer.self_attn.k_norm) if p is not None]
        key = tuple((id(p), weight_version(p)) for p in params)
        if self._context_kv is None or self._context_kv[0] != key:
            q_size = self.layers[0].self_attn.q_size
            projections = [layer.self_attn.qkv_proj for layer in self.layers]
            with torch.no_grad():
                weight = torch.cat([p.weight[q_size:] for p in projections])
                bias = None if projections[0].bias is None else torch.cat([p.bias[q_size:] for p in projections])
                k_norms = torch.stack([layer.self_attn.k_norm for layer in self.layers])[:, None]
            self._context_kv = (key, weight, bias, k_norms, {})
        return self._context_kv[1:]

    def forward(self, block_embeds: torch.Tensor, meta: AttentionMetadata, kv_pool: torch.Tensor) -> torch.Tensor:
        """block_embeds `[B, H]` (embedded anchor + masks) -> final-normed hidden `[B, H]`.

        `meta` describes the block as new tokens after the context (prefix = committed context length)."""
        meta = meta.planned(self.inv_freq, kv_pool.shape[3], self.config.layers.num_attention_heads)
        x, residual = block_embeds, None
        for index, layer in enumerate(self.layers):
            x, residual = layer.forward_paged(x, residual, meta, kv_pool[index], self.inv_freq)
        return kernels.rms_norm(x, self.norm, self.config.layers.rms_norm_eps, residual)[0]

    def forward_dense(self, context: torch.Tensor, context_positions: torch.Tensor, block_embeds: torch.Tensor,
                      block_positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training forward without the pool: context rows `[C, H]`, many blocks flattened to `[Q, H]`, and a bool
        `[Q, C + Q]` mask saying which context rows and block rows each block row sees (block-sparse: a block
        sees the context before its anchor and, causally or fully, its own rows). Returns hidden `[Q, H]`."""
        def attend(attn, h):
            q, k, v = attn.project(h, block_positions, self.inv_freq)
            k_context, v_context = attn.project_kv(context, context_positions, self.inv_freq)
            k, v = torch.cat([k_context, k]), torch.cat([v_context, v])
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=attn.scale,
                enable_gqa=True)
            return attn.o_proj(out.transpose(0, 1).flatten(1))
        x, residual = block_embeds, None
        for layer in self.layers:
            x, residual = layer(x, residual, attend)
        return kernels.rms_norm(x, self.norm, self.config.layers.rms_norm_eps, residual)[0]

    def save(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json + model.safetensors (in `dtype`, default the parameters' own)."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.to(dtype or v.dtype) for k, v in hf_state_dict(self).items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if self.draft_vocab is not None:
            save_draft_vocab(out, self.draft_vocab.cpu())


def load_head(head_dir: str | Path, target: ModelConfig, dtype: torch.dtype, device: torch.device) -> DraftHead:
    path = Path(head_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no draft head at {path} (its config.json is missing); give a head directory "
                                f"(train_head.py writes one) or decode plainly (head=None, run.py --head none)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path / 'config.json'} must hold a JSON object")
    config = HeadConfig.from_dict(raw, target.num_hidden_layers)
    config.check_fits(target)
    with torch.device("meta"):
        head = DraftHead(config)
    head = head.to(dtype).to_empty(device=device)
    head.inv_freq = rope_inv_freq(config.layers.head_dim, config.layers.rope_theta).to(device)
    # Published heads sometimes carry copies of the target's embedding / lm_head; the target's are used.
    load_weights(head, path, ignore=("embed_tokens.weight", "lm_head.weight"))
    vocab = load_draft_vocab(path, target.vocab_size)
    head.draft_vocab = None if vocab is None else vocab.to(device)
    return head
