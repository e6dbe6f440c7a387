"""The Qwen3 target in one file, dense or Qwen3-MoE: embedding, decoder layers, final norm, lm_head, and taps.

A decoder layer's MLP is dense or a mixture of experts, as `ModelConfig.is_sparse_layer` (transformers' rule)
decides; experts are stored stacked and run through one fused kernel (`kernels.fused_moe`).

Two forwards share the weights:
- `forward` runs flat tokens of one or more sequences over the paged KV pool (prefill, decode, tree verify),
  with attention described by an explicit `AttentionMetadata`;
- `forward_dense` runs a `[batch, seq]` block with plain causal attention and no cache (training, teachers).
Both can return *taps*: the residual stream after chosen decoder layers (HF `hidden_states[i + 1]`).
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanojet import kernels
from nanojet.model.attention import AttentionMetadata
from nanojet.model.config import ModelConfig
from nanojet.model.packed_gemm import Linear, linear, pack_module, pack_rows


def compile_once(method):
    """Mark `method` as a nested compile region: torch.compile traces and compiles its body once and calls that for
    every module it runs on, as long as the inputs match (shapes, dtypes, the module's structure; else it compiles
    another version). Parameters are inputs of the region, not constants. Outside torch.compile a plain call."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    return method if region is None else region(method)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.scale = config.head_dim ** -0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, config.qkv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim))
        self.k_norm = nn.Parameter(torch.ones(self.head_dim))

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # torch.split_with_sizes, not Tensor.split: the latter is a Python wrapper, a cost on every decode step
        q, k, v = torch.split_with_sizes(qkv, [self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def project(self, h: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, plan=None):
        """h `[T, H]` -> q `[T, Hq, D]`, k, v `[T, Hkv, D]` with q/k-norm and RoPE applied."""
        q, k, v = self._split(self.qkv_proj(h))
        q, k = kernels.qk_norm_rope(q, k, self.q_norm, self.k_norm, positions, inv_freq, self.eps, plan)
        return q, k, v

    def project_kv(self, h: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, plan=None):
        """K/V only (the draft head's context rows): skips the query rows of the fused projection."""
        weight = self.qkv_proj.weight[self.q_size:]
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[self.q_size:]
        k, v = torch.split_with_sizes(F.linear(h, weight, bias), [self.kv_size, self.kv_size], dim=-1)
        k, v = k.view(-1, self.num_kv_heads, self.head_dim), v.view(-1, self.num_kv_heads, self.head_dim)
        # One fused kernel serves both: the "query" output here is a discarded copy of k (context rows are few).
        _, k = kernels.qk_norm_rope(k, k, self.k_norm, self.k_norm, positions, inv_freq, self.eps, plan)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
               cache: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' k, v in this layer's `cache` `[2, pages, page_size, Hkv, D]`, then attend q over the
        pool -> `[T, Hq, D]` (the output projection is the caller's)."""
        k_cache, v_cache = cache[0], cache[1]  # (not unbind: a multi-output view cannot be written in place)
        kernels.store_kv(k_cache, v_cache, k, v, meta.slot_mapping, meta.plan)
        return kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.prefix_lens, meta.query_starts,
                                       meta.visibility, self.scale, meta.plan)

    def forward_dense(self, h: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """h `[B, S, H]`; causal attention (or `mask` `[B or 1, 1, S, S]` bool) without a cache."""
        batch, seq = h.shape[:2]
        q, k, v = self.project(h.flatten(0, 1), positions.flatten(), inv_freq)
        q, k, v = (t.view(batch, seq, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.scale, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    @compile_once
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(h)))


class Experts(nn.Module):
    """Every expert's SwiGLU weights, stacked: expert e's gate rows then up rows, and its down projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))


class SparseMoE(nn.Module):
    """Qwen3-MoE block: a linear router picks `num_experts_per_tok` experts per token; their outputs are summed,
    weighted by the router's probabilities."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h `[T, H]` -> (weights `[T, k]` in h's dtype, expert ids `[T, k]`), computed as transformers does:
        softmax in fp32, top k, renormalised to sum 1 when norm_topk_prob, then cast to the logits' dtype. Both
        steps are kernels, row-invariant on a GPU (a token's experts must not depend on the rows beside it)."""
        logits = linear(h, self.gate.weight)  # [T, E]
        return kernels.topk_routing(logits, self.top_k, self.norm_topk_prob)

    @compile_once
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        h = h.reshape(-1, shape[-1])  # forward_dense passes [B, S, H]
        weights, ids = self.route(h)
        return kernels.fused_moe(h, self.experts.gate_up_proj, self.experts.down_proj, weights, ids).view(shape)


class DecoderLayer(nn.Module):
    """Pre-norm Qwen3 block. The residual stream is carried separately so each RMSNorm fuses the add.

    In a layerwise compiled round (the CUDA default) the target's layers each call one compiled `forward_paged`
    (`Qwen3.compiled_layer`). Where layers are traced into the round's graph (the whole round on the CPU, the draft
    head's layers), `forward_paged` is three compile regions (`compile_once`: the attention's input, its output and
    the MLP) around the two kernels that touch the KV pool, so torch.compile compiles each region once for all. The
    pool kernels stay outside the regions: a region cannot write into its inputs, and they must write the pool in
    place."""

    def __init__(self, config: ModelConfig, sparse: bool = False):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = SparseMoE(config) if sparse else MLP(config)
        self.input_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x, residual, attend):
        """The layer with attention `attend(self_attn, h) -> [.., H]` (the dense forwards of training)."""
        h, residual = kernels.rms_norm(x, self.input_layernorm, self.eps, residual)
        h, residual = kernels.rms_norm(attend(self.self_attn, h), self.post_attention_layernorm, self.eps, residual)
        return self.mlp(h), residual

    def forward_paged(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                      cache: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer over the paged KV pool (`cache`: this layer's `[2, pages, page_size, Hkv, D]`)."""
        q, k, v, summed = self.attention_input(x, residual, meta.positions, inv_freq, meta.plan)
        residual = x if summed is None else summed
        h, residual = self.attention_output(self.self_attn.attend(q, k, v, meta, cache), residual)
        return self.mlp(h), residual

    @compile_once
    def attention_input(self, x, residual, positions, inv_freq, plan=None):
        """q, k, v (q/k-normed and rotated) of the normed `x + residual`, and that sum: the residual stream from here
        on (None for the first layer, whose stream is `x` itself: a region's output may not be its input)."""
        h, summed = kernels.rms_norm(x, self.input_layernorm, self.eps, residual)
        q, k, v = self.self_attn.project(h, positions, inv_freq, plan)
        if torch.compiler.is_compiling():
            # q, k, v are views into two buffers. A region must return tensors of their own: inductor (2.13) plans a
            # returned view's memory as if the view owned its buffer, and a later reuse then writes past its end.
            q, k, v = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
        return q, k, v, None if residual is None else summed

    @compile_once
    def attention_output(self, out, residual):
        """Output projection of the attention `[T, Hq, D]`, added to the residual and normed: (h, residual)."""
        return kernels.rms_norm(self.self_attn.o_proj(out.flatten(1)), self.post_attention_layernorm, self.eps,
                                residual)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


class Qwen3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, sparse=config.is_sparse_layer(index))
                                    for index in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        # A plain nn.Linear: `logits` multiplies by its weight through `packed_lm_head`, never calls the module,
        # so `pack_module` must not give it a packed copy of its own.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                             bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)
        self.packed_lm_head: dict[int, tuple] = {}  # the lm_head (tied or not) packed (nanojet/model/packed_gemm.py)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden rows -> fp32 logits (computed only for the rows a caller needs). On a GPU the fp32 sum
        is rounded once, to fp32; the CPU rounds to the model's dtype first, as transformers does."""
        return linear(hidden, self.lm_head_weight, packed=self.packed_lm_head, out_dtype=torch.float32)

    def pack(self, rows: int, logit_rows: int) -> None:
        """CPU rounds: packed weights for forwards of `rows` tokens that score `logit_rows` of them
        (nanojet/model/packed_gemm.py)."""
        pack_module(self, rows)
        pack_rows(self.packed_lm_head, self.lm_head_weight, logit_rows)

    def _run_layers(self, x: torch.Tensor, run_layer, tap_layers: tuple[int, ...]):
        """`run_layer(index, layer, x, residual) -> (x, residual)` over every layer, then the final norm."""
        residual, taps = None, []
        for index, layer in enumerate(self.layers):
            x, residual = run_layer(index, layer, x, residual)
            if index in tap_layers:
                taps.append(x + residual)
        hidden, _ = kernels.rms_norm(x, self.norm, self.config.rms_norm_eps, residual)
        return hidden, (torch.cat(taps, dim=-1) if taps else None)

    def forward(self, tokens: torch.Tensor, meta: AttentionMetadata, kv_pool: torch.Tensor,
                tap_layers: tuple[int, ...] = (), layer_step=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens `[T]` -> (final-normed hidden `[T, H]`, taps `[T, len(tap_layers) * H]` or None).

        Layer i uses `kv_pool[i]` (`[2, pages, page_size, Hkv, D]`); K/V of the new tokens are stored at
        `meta.slot_mapping` before attention reads them. `layer_step` (`compiled_layer`): every layer runs through
        it, outside the compiled round's graph (`_run_compiled_layers`)."""
        meta = meta.planned(self.inv_freq, kv_pool.shape[3], self.config.num_attention_heads)
        if layer_step is not None:
            return self._run_compiled_layers(self.embed_tokens(tokens), meta, kv_pool, tap_layers, layer_step)

        def run_layer(index, layer, x, residual):
            return layer.forward_paged(x, residual, meta, kv_pool[index], self.inv_freq)
        return self._run_layers(self.embed_tokens(tokens), run_layer, tap_layers)

    @staticmethod
    def compiled_layer(backend):
        """`DecoderLayer.forward_paged` compiled with `backend`, one graph for every layer alike (the first, whose
        residual is None, has its own): given to `forward` by a compiled round, it runs each layer from an eager
        loop (`_run_compiled_layers`), so the round's graph holds no layer and compiling a round costs the same at
        any depth. Inside a CUDA graph the loop costs nothing; on the CPU each call pays dynamo's guards and the
        compiled wrapper (docs/compiled.md)."""
        return torch.compile(DecoderLayer.forward_paged, fullgraph=True, dynamic=False, backend=backend)

    @torch.compiler.disable
    def _run_compiled_layers(self, x: torch.Tensor, meta: AttentionMetadata, kv_pool: torch.Tensor,
                             tap_layers: tuple[int, ...], layer_step):
        """`forward`'s layers inside a compiled round: torch.compile breaks the round's graph here (the one break a
        compiled round has, tests/test_compile_depth.py) and runs this eagerly, each layer through `layer_step`."""
        def run_layer(index, layer, x, residual):
            return layer_step(layer, x, residual, meta, kv_pool[index], self.inv_freq)
        return self._run_layers(x, run_layer, tap_layers)

    def forward_dense(self, tokens: torch.Tensor, tap_layers: tuple[int, ...] = ()):
        """tokens `[B, S]` at positions 0..S-1 with causal attention -> (hidden `[B, S, H]`, taps or None)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)

        def attend(attn, h):
            return attn.forward_dense(h, positions, self.inv_freq, None)
        return self._run_layers(self.embed_tokens(tokens), lambda _, layer, x, residual: layer(x, residual, attend),
                                tap_layers)
