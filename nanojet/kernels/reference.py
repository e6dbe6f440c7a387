"""Pure-torch reference of every kernel: the CPU runtime path and the oracle the Triton kernels are tested against.

Shapes: T new tokens in a step, Hq query heads, Hkv key/value heads, D head dim, P page size (slots per KV page).
A K/V cache of one layer is `[num_pages, P, Hkv, D]`; a flat slot is `page * P + offset`.
"""
from dataclasses import dataclass

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual` (or of `x`) over the last dim. Returns (normed, the sum that was normed) so a
    caller can carry the residual stream from layer to layer without a separate add."""
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32:
        # One call instead of six ops (a decode step on a small model is mostly per-op overhead); the same
        # products in the same order, so bit for bit what the formula below gives in fp32.
        return torch.rms_norm(x, weight.shape, weight, eps), x  # (not F.rms_norm: a Python wrapper around it)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # HF Qwen3RMSNorm casts back to the input dtype before scaling; matching it keeps bf16 parity.
    return weight * normed.to(x.dtype), x


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x @ weight^T + bias` in x's dtype, then converted to `out_dtype` if given (the Triton kernel rounds its fp32
    sum once, straight to `out_dtype`)."""
    out = torch.nn.functional.linear(x, weight, bias)
    return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin `[T, 1, D]` (rotate-half layout, fp32) at integer positions, broadcast over heads.

    The sin table's first half is negated, so rotation is `x * cos + x.roll(D / 2) * sin`: rotate_half(x) * sin
    with the negation moved into the table (a sign flip is exact, so the products are bit for bit the same)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    sin = freqs.sin()
    return torch.cat([freqs, freqs], dim=-1).cos()[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 positions: torch.Tensor, inv_freq: torch.Tensor, eps: float, *,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q `[T, Hq, D]` and k `[T, Hkv, D]`, then rotary embedding at `positions`
    (`rope`: their `rope_tables`, when a caller built them once for several layers).

    q and k are normed apart and rotated side by side (each head's values are what separate calls give): fewer
    ops, which are most of the cost of a decode step on a small model."""
    num_q_heads, num_k_heads = q.shape[1], k.shape[1]
    both = torch.cat([rms_norm(q, q_weight, eps)[0], rms_norm(k, k_weight, eps)[0]], dim=1)  # [T, Hq + Hkv, D]
    rotated = rotate(both, rope or rope_tables(positions, inv_freq))
    return torch.split_with_sizes(rotated, [num_q_heads, num_k_heads], dim=1)  # (Tensor.split is a Python wrapper)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of `x` `[T, heads, D]` by its `rope_tables` (cos, signed sin `[T, 1, D]`)."""
    cos, sin = rope
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused `[T, 2I]` projection whose first half is the gate."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, *, plan: "ForwardPlan | None" = None) -> None:
    """Write k, v `[T, Hkv, D]` into the caches at flat slots `[T]`; slot -1 marks padding and is skipped
    (`plan`: the forward's, which found the padding once for every layer)."""
    slots, keep = plan.store if plan is not None else store_rows(slot_mapping)
    if keep is not None:
        k, v = k[keep], v[keep]
    if k.dtype != k_cache.dtype:  # a same-dtype .to() is a no-op that still costs a dispatch
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def store_rows(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the slots to write, the rows they come from: None for all) of a slot mapping whose -1 entries are padding."""
    if not bool((slot_mapping < 0).any()):  # a host read, fine on this path; most steps have no padding to drop
        return slot_mapping, None
    keep = slot_mapping >= 0
    return slot_mapping[keep], keep


def move_kv(pool: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy K/V rows `src_slots[j] -> dst_slots[j]` in every layer of a pool `[L, 2, pages, P, Hkv, D]`.

    Commit moves an accepted tree path (src p_0 < p_1 < ..., src >= dst) down to consecutive slots; the
    gather happens before the scatter, so overlapping ranges are safe."""
    flat = pool.view(pool.shape[0], 2, -1, *pool.shape[4:])
    flat[:, :, dst_slots] = flat[:, :, src_slots]


def pack_visibility(visible: torch.Tensor) -> torch.Tensor:
    """bool `[T, n]` -> bit words `[T, ceil(n/32)]` int32 (bit j of word j // 32 holds column j)."""
    rows, n = visible.shape
    words = (n + 31) // 32
    padded = torch.nn.functional.pad(visible.long(), (0, words * 32 - n))  # out of place: the round vmaps it
    weights = torch.ones(32, dtype=torch.int64, device=visible.device) << torch.arange(32, device=visible.device)
    packed = (padded.view(rows, words, 32) * weights).sum(-1)  # [T, W] in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_visibility(words: torch.Tensor, n: int) -> torch.Tensor:
    """Bit words `[T, W]` int32 -> bool `[T, n]` (bit j of a query: new token j is visible to it)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words[:, :, None] >> shifts) & 1  # [T, W, 32]
    return bits.reshape(words.shape[0], -1)[:, :n].bool()


@dataclass
class ForwardPlan:
    """What every layer of one forward derives alike from its metadata, built once by `plan_forward` rather than
    in each layer: on a small model a decode step is mostly per-op overhead, and this was a third of its ops.
    Only this module reads a plan: the Triton kernels derive what they need inside the kernel, and a compiled
    graph has no per-op overhead to save."""
    rope: tuple[torch.Tensor, torch.Tensor]  # `rope_tables` at the forward's positions
    store: tuple[torch.Tensor, torch.Tensor | None]  # `store_rows` of its slot mapping
    attention: "AttentionPlan | None"  # None: the general path (sequences with different new-token counts)


@dataclass
class AttentionPlan:
    """S sequences of n new tokens each, attended in one batch: each sequence's keys, padded to the longest, and
    what each query may see (its prefix, and the new tokens its visibility bits name; never the padding)."""
    num_sequences: int  # S
    new_tokens: int  # n
    key_slots: torch.Tensor | slice  # [S * keys] int64 flat pool slots, sequence by sequence; a slice when one
                                     # sequence's pages are consecutive: its keys are one run of rows, read in place
    visible: torch.Tensor | None  # [S, 1, n, keys] bool; None: every query sees every key (no mask to apply)


def plan_forward(positions: torch.Tensor, inv_freq: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, prefix_lens: torch.Tensor, query_starts: torch.Tensor,
                 visibility: torch.Tensor, page_size: int, num_q_heads: int) -> ForwardPlan:
    return ForwardPlan(rope=rope_tables(positions, inv_freq), store=store_rows(slot_mapping),
                       attention=plan_attention(block_tables, prefix_lens, query_starts, visibility, page_size,
                                                num_q_heads))


def plan_context(positions: torch.Tensor, inv_freq: torch.Tensor, slot_mapping: torch.Tensor) -> ForwardPlan:
    """The plan of rows that are only projected and stored, never attended (the draft head's context rows)."""
    return ForwardPlan(rope=rope_tables(positions, inv_freq), store=store_rows(slot_mapping), attention=None)


def plan_attention(block_tables: torch.Tensor, prefix_lens: torch.Tensor, query_starts: torch.Tensor,
                   visibility: torch.Tensor, page_size: int, num_q_heads: int) -> AttentionPlan | None:
    """The batched path's plan when every sequence has the same n >= 1 new tokens (a decode step, a round) and
    the scores stay under `SCORE_ELEMENTS`; else None. Reads query_starts and prefix_lens on the host."""
    starts = query_starts.tolist()
    counts = {hi - lo for lo, hi in zip(starts, starts[1:])}
    if len(counts) != 1 or 0 in counts:
        return None
    n, num_sequences = counts.pop(), prefix_lens.shape[0]
    n_keys = int(prefix_lens.max()) + n  # a host read
    if num_sequences * num_q_heads * n * n_keys > SCORE_ELEMENTS:
        return None
    device = block_tables.device
    pages = block_tables[:, :-(-n_keys // page_size)]
    key_slots = _consecutive_run(pages, page_size, n_keys) if num_sequences == 1 else None
    if key_slots is None:
        key_slots = (pages.long()[:, :, None] * page_size + torch.arange(page_size, device=device)).flatten(1)
        key_slots = key_slots[:, :n_keys].flatten()
    among_new = unpack_visibility(visibility, n).view(num_sequences, n, n)
    if num_sequences == 1:  # no padding: the prefix, then the new tokens (the fewest ops for batch-1 decoding)
        # A decode step, or a draft block that sees itself whole, hides nothing: attention without a mask is cheaper.
        visible = None if bool(among_new.all()) else torch.cat(
            [torch.ones(1, n, n_keys - n, dtype=torch.bool, device=device), among_new], dim=2)[:, None]
    else:
        prefix = prefix_lens.long()[:, None]  # [S, 1]
        logical = torch.arange(n_keys, device=device)
        visible = (logical < prefix)[:, None, :].repeat(1, n, 1)  # [S, n, keys]: the prefix; keys past it hidden
        new_keys = (prefix + torch.arange(n, device=device)).unsqueeze(1).expand(-1, n, -1)  # [S, n, n]
        visible = visible.scatter_(2, new_keys, among_new)[:, None]
    return AttentionPlan(num_sequences=num_sequences, new_tokens=n, key_slots=key_slots, visible=visible)


def _consecutive_run(pages: torch.Tensor, page_size: int, n_keys: int) -> slice | None:
    """The flat slots of one sequence's keys as a slice when its pages `[1, P]` are consecutive ids (the usual case
    for a lone sequence: the pool hands out and takes back pages in order), else None. One host read."""
    ids = pages[0].tolist()
    first = ids[0]
    if ids != list(range(first, first + len(ids))):
        return None
    return slice(first * page_size, first * page_size + n_keys)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, prefix_lens: torch.Tensor, query_starts: torch.Tensor,
                    visibility: torch.Tensor, scale: float, *, plan: ForwardPlan | None = None) -> torch.Tensor:
    """Attention of the step's queries over paged keys (`plan`: the forward's, built once for every layer).

    q `[T, Hq, D]`; sequence s owns queries `query_starts[s]:query_starts[s+1]`. Its keys are logical slots
    `0 .. prefix_lens[s] + n_new - 1` read through `block_tables[s]`: the prefix is visible to every query,
    new token j (logical slot prefix + j, already stored) is visible to query i when bit j of
    `visibility[i]` is set. A query that sees nothing returns zeros instead of NaN. fp32 accumulation."""
    page_size, num_kv_heads, head_dim = k_cache.shape[1:]
    k_rows, v_rows = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    batched = plan.attention if plan is not None else plan_attention(block_tables, prefix_lens, query_starts,
                                                                      visibility, page_size, q.shape[1])
    if batched is not None:
        return _attend_batched(q, k_rows, v_rows, batched, scale)
    starts, prefixes = query_starts.tolist(), prefix_lens.tolist()
    out = torch.zeros_like(q)
    offsets = torch.arange(page_size, device=q.device)
    for s, prefix in enumerate(prefixes):
        lo, hi = starts[s], starts[s + 1]
        n = hi - lo
        if n == 0:
            continue
        n_keys = prefix + n
        pages = block_tables[s, :-(-n_keys // page_size)].long()
        slots = (pages[:, None] * page_size + offsets).flatten()[:n_keys]
        keys = k_rows[slots].float().transpose(0, 1)  # [Hkv, keys, D]
        values = v_rows[slots].float().transpose(0, 1)
        # Queries in blocks, so a long prefill chunk over a long prefix keeps its scores near 2^24 elements.
        rows_per_block = max(1, SCORE_ELEMENTS // (q.shape[1] * n_keys))
        for first in range(0, n, rows_per_block):
            last = min(n, first + rows_per_block)
            out[lo + first:lo + last] = _attend(q[lo + first:lo + last], keys, values, prefix,
                                                visibility[lo + first:lo + last], n, scale)
    return out


SCORE_ELEMENTS = 2**24


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int, visibility: torch.Tensor,
            num_new: int, scale: float) -> torch.Tensor:
    """q `[m, Hq, D]` over one sequence's keys/values `[Hkv, prefix + num_new, D]` (fp32) -> `[m, Hq, D]`."""
    m, num_q_heads, head_dim = q.shape
    num_kv_heads, n_keys = keys.shape[:2]
    group = num_q_heads // num_kv_heads
    visible = torch.cat([torch.ones(m, prefix, dtype=torch.bool, device=q.device),
                         unpack_visibility(visibility, num_new)], dim=1)  # [m, keys]
    # Query heads grouped under their KV head: [Hkv, G * m, D] against [Hkv, keys, D], no K/V repeat.
    queries = q.float().view(m, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).flatten(1, 2)
    scores = (queries @ keys.transpose(1, 2)).view(num_kv_heads, group, m, n_keys) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num_(0.0)
    mixed = (probs.flatten(1, 2) @ values).view(num_kv_heads, group, m, head_dim)
    return mixed.permute(2, 0, 1, 3).reshape(m, -1, head_dim).to(q.dtype)


def _attend_batched(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, plan: AttentionPlan,
                    scale: float) -> torch.Tensor:
    """`paged_attention` for S sequences of n new tokens each (a decode step, a round): one fused attention call
    over keys gathered per sequence, instead of a loop over sequences and a dozen ops per layer (on a small model
    the ops are the cost). A query that sees nothing gets zeros (torch's attention since 2.5)."""
    num_sequences, n, rows = plan.num_sequences, plan.new_tokens, (plan.num_sequences, -1, *k_rows.shape[1:])
    if isinstance(plan.key_slots, slice):  # one run of rows: read in place, no copy
        keys, values = k_rows[plan.key_slots].view(rows), v_rows[plan.key_slots].view(rows)
    else:  # index_select, not advanced indexing: faster on the CPU
        keys = k_rows.index_select(0, plan.key_slots).view(rows)
        values = v_rows.index_select(0, plan.key_slots).view(rows)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [S, Hkv, keys, D]; padding rows are masked
    queries = q.view(num_sequences, n, *q.shape[1:]).transpose(1, 2)  # [S, Hq, n, D]
    if q.dtype != torch.float32:  # fp32 accumulation (in fp32 the casts are no-ops, each still a dispatch)
        keys, values, queries = keys.float(), values.float(), queries.float()
    mixed = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=plan.visible,
                                                             scale=scale, enable_gqa=True)  # [S, Hq, n, D]
    out = mixed.transpose(1, 2).reshape(q.shape)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def topk_routing(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE router's choice from its logits `[T, E]`, as transformers computes it: softmax in fp32, the top k,
    renormalised to sum 1 when `renormalize`, then cast to the logits' dtype. Returns (weights `[T, k]`, ids int64)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def fused_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts MLP of tokens `hidden [T, H]`, each routed to k experts (`topk_ids [T, k]`, weighted by
    `topk_weights [T, k]`). Expert e's weights are stacked: `gate_up[e]` `[2I, H]` (gate rows, then up rows) and
    `down[e]` `[H, I]`. Returns `sum_j topk_weights[t, j] * down_e(silu(gate_e x) * up_e x)` with e = topk_ids[t, j].

    The (token, slot) pairs are sorted by expert so each expert runs one matmul over its rows. Rounding follows
    transformers' grouped_mm path: each weighted row is rounded to the activation dtype, the sum over k
    accumulates in fp32 and is rounded once."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)  # pair p = t * k + j, grouped by expert
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()  # a host read: fine on this path
    rows = torch.empty(num_tokens * top_k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        x = hidden[pairs // top_k]  # [count, H]
        gate_up_rows = torch.nn.functional.linear(x, gate_up[expert])  # [count, 2I]
        rows[pairs] = torch.nn.functional.linear(silu_and_mul(gate_up_rows), down[expert])
    weighted = rows * topk_weights.flatten()[:, None].to(rows.dtype)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
