"""Pure-torch reference of every kernel: the CPU runtime path and the oracle the Triton kernels are tested against.

Shapes: T new tokens in a step, Hq query heads, Hkv key/value heads, D head dim, P page size (slots per KV page).
A K/V cache of one layer is `[num_pages, P, Hkv, D]`; a flat slot is `page * P + offset`.
"""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual` (or of `x`). Returns (normed, the sum that was normed) so a caller
    can carry the residual stream from layer to layer without a separate add."""
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32:  # the casts below would be no-ops, each still a dispatch on a decode step's path
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)), x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # HF Qwen3RMSNorm casts back to the input dtype before scaling; matching it keeps bf16 parity.
    return weight * normed.to(x.dtype), x


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[T, D]` (rotate-half layout) for integer positions, computed in fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 positions: torch.Tensor, inv_freq: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q `[T, Hq, D]` and k `[T, Hkv, D]`, then rotary embedding at `positions`.

    q and k go through one norm and one rotation side by side (each head's values are what separate calls give):
    half the ops, which is most of the cost of a decode step on a small model."""
    num_q_heads, num_k_heads = q.shape[1], k.shape[1]
    both = torch.cat([q, k], dim=1)  # [T, Hq + Hkv, D]
    weight = torch.cat([q_weight.expand(num_q_heads, -1), k_weight.expand(num_k_heads, -1)])  # [Hq + Hkv, D]
    both, _ = rms_norm(both, weight, eps)
    cos, sin = rope_cos_sin(positions, inv_freq)
    cos, sin = cos[:, None, :].to(q.dtype), sin[:, None, :].to(q.dtype)  # broadcast over heads
    return (both * cos + _rotate_half(both) * sin).split([num_q_heads, num_k_heads], dim=1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused `[T, 2I]` projection whose first half is the gate."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v `[T, Hkv, D]` into the caches at flat slots `[T]`; slot -1 marks padding and is skipped."""
    if bool((slot_mapping < 0).any()):  # a host read, fine on this path; most steps have no padding to drop
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, prefix_lens: torch.Tensor, query_starts: torch.Tensor,
                    visibility: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the step's queries over paged keys.

    q `[T, Hq, D]`; sequence s owns queries `query_starts[s]:query_starts[s+1]`. Its keys are logical slots
    `0 .. prefix_lens[s] + n_new - 1` read through `block_tables[s]`: the prefix is visible to every query,
    new token j (logical slot prefix + j, already stored) is visible to query i when bit j of
    `visibility[i]` is set. A query that sees nothing returns zeros instead of NaN. fp32 accumulation."""
    page_size, num_kv_heads, head_dim = k_cache.shape[1:]
    k_rows, v_rows = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    starts, prefixes = query_starts.tolist(), prefix_lens.tolist()
    counts = {hi - lo for lo, hi in zip(starts, starts[1:])}
    if counts == {1}:  # one decode step per sequence
        return _attend_decode(q, k_rows, v_rows, block_tables, prefix_lens, visibility, max(prefixes) + 1,
                              page_size, scale)
    if len(counts) == 1 and 0 not in counts:  # every sequence has n new tokens: a round
        n = counts.pop()
        if len(prefixes) * q.shape[1] * n * (max(prefixes) + n) <= SCORE_ELEMENTS:
            return _attend_batched(q, k_rows, v_rows, block_tables, prefix_lens, visibility, n, page_size, scale)
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


def _attend_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, block_tables: torch.Tensor,
                   prefix_lens: torch.Tensor, visibility: torch.Tensor, n_keys: int, page_size: int,
                   scale: float) -> torch.Tensor:
    """`paged_attention` for one new token per sequence (plain decoding): the fewest ops that give the same
    attention, since on a small model a decode step's time is mostly per-op overhead. The new token (logical slot
    `prefix`) is visible to itself when its bit 0 is set."""
    num_sequences, num_kv_heads, head_dim = prefix_lens.shape[0], k_rows.shape[1], k_rows.shape[2]
    logical = torch.arange(n_keys, device=q.device)
    slots = block_tables[:, logical // page_size].long() * page_size + logical % page_size  # [S, keys]
    keys = k_rows[slots].float().permute(0, 2, 3, 1)  # [S, Hkv, D, keys]
    values = v_rows[slots].float().transpose(1, 2)  # [S, Hkv, keys, D]
    prefix = prefix_lens.long()[:, None]
    visible = (logical < prefix) | ((logical == prefix) & (visibility[:, :1] & 1).bool())  # [S, keys]
    queries = q.float().view(num_sequences, num_kv_heads, -1, head_dim)  # [S, Hkv, G, D]: GQA without a repeat
    scores = (queries @ keys) * scale  # [S, Hkv, G, keys]
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None], float("-inf")), dim=-1).nan_to_num_(0.0)
    return (probs @ values).view(q.shape).to(q.dtype)


def _attend_batched(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, block_tables: torch.Tensor,
                    prefix_lens: torch.Tensor, visibility: torch.Tensor, n: int, page_size: int,
                    scale: float) -> torch.Tensor:
    """`paged_attention` for S sequences of n new tokens each, in one batch of matmuls instead of a loop over
    sequences (a batched round's shape): keys padded to the longest sequence, padding masked out."""
    num_sequences, num_kv_heads, head_dim = prefix_lens.shape[0], k_rows.shape[1], k_rows.shape[2]
    prefix = prefix_lens.long()[:, None]  # [S, 1]
    n_keys = int(prefix.max()) + n
    logical = torch.arange(n_keys, device=q.device)
    pages = block_tables[:, :-(-n_keys // page_size)].long()
    slots = pages.gather(1, (logical // page_size).expand(num_sequences, -1)) * page_size + logical % page_size
    keys = k_rows[slots].float().permute(0, 2, 1, 3)  # [S, Hkv, keys, D]; rows past a sequence's keys are masked
    values = v_rows[slots].float().permute(0, 2, 1, 3)
    visible = (logical < prefix)[:, None, :].repeat(1, n, 1)  # [S, n, keys]: the prefix
    new_keys = (prefix + torch.arange(n, device=q.device)).unsqueeze(1).expand(-1, n, -1)  # [S, n, n]
    visible.scatter_(2, new_keys, unpack_visibility(visibility, n).view(num_sequences, n, n))
    group = q.shape[1] // num_kv_heads
    queries = q.float().view(num_sequences, n, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    scores = (queries.flatten(2, 3) @ keys.transpose(2, 3)).view(num_sequences, num_kv_heads, group, n, n_keys)
    scores = scores * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None], float("-inf")), dim=-1).nan_to_num_(0.0)
    mixed = (probs.flatten(2, 3) @ values).view(num_sequences, num_kv_heads, group, n, head_dim)
    return mixed.permute(0, 3, 1, 2, 4).reshape(q.shape).to(q.dtype)


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
