"""What the hardware does during decoding, for bench.py: device copy and matrix-vector bandwidth, the weight bytes a
decode step must read, and how often the host waits on the device per round."""
import traceback
import warnings
from collections import Counter
from dataclasses import replace

import torch

from nanojet.bench.moe_stats import expert_bytes, sparse_layers
from nanojet.engine.engine import Engine
from nanojet.engine.round import synced_clock
from nanojet.engine.sampling import SamplingParams
from nanojet.model.qwen3 import Qwen3


def copy_bandwidth(device: torch.device, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), over 256 MiB: far past any cache."""
    source = torch.empty(2**28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start = synced_clock()
    for _ in range(repeats):
        target.copy_(source)
    return 2 * source.numel() * repeats / (synced_clock() - start)


def matvec_bandwidth(device: torch.device, dtype: torch.dtype, repeats: int = 8) -> float:
    """Bytes/s of weights a one-row matrix product reads, over a 256 MiB matrix (far past any cache): the rate a
    decode step's weights can at best be streamed at, by the same library that runs the model's linears. Best of
    `repeats`, so a noisy moment does not lower the floor."""
    columns = 1024
    weight = torch.randn(2**28 // (columns * torch.finfo(dtype).bits // 8), columns, device=device).to(dtype)
    row = torch.randn(1, columns, device=device, dtype=dtype)
    torch.nn.functional.linear(row, weight)
    best = float("inf")
    for _ in range(repeats):
        start = synced_clock()
        torch.nn.functional.linear(row, weight)
        best = min(best, synced_clock() - start)
    return weight.numel() * weight.element_size() / best


def weight_bytes_per_step(target: Qwen3) -> int:
    """Bytes of weights one decode step reads: every parameter, but of an untied embedding only one row, and of a
    MoE layer's experts only the k its one token is routed to (top-k experts are distinct)."""
    total = sum(p.numel() * p.element_size() for p in target.parameters())
    for moe in sparse_layers(target):
        experts = moe.experts
        total -= sum(p.numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))
        total += moe.top_k * expert_bytes(target)
    if target.lm_head is not None:
        embed = target.embed_tokens.weight
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    return total


def recorded_syncs(run) -> list[list[traceback.FrameSummary]]:
    """Call `run()` with CUDA's sync debug mode on; returns the Python stack at each synchronisation the host waited
    on (the debug mode warns at each one, and the warning is raised where the op returned to Python)."""
    stacks = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stacks.append([f for f in traceback.extract_stack() if f.filename != warnings.__file__][:-1])
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return stacks


def is_outcome_read(stack: list[traceback.FrameSummary]) -> bool:
    """Whether a sync is the round's one host read (`runner(table).tolist()` in `Engine._round`)."""
    return any(frame.name == "_round" and "tolist()" in (frame.line or "") for frame in stack)


def host_syncs_per_round(engine: Engine, ids: list[int], params: SamplingParams, spec) -> float:
    """Device synchronisations the host waits on per decode round. Two generation lengths are counted and
    differenced, so the prefill's syncs drop out."""
    def count(max_new_tokens: int) -> tuple[int, int]:
        run = replace(params, max_new_tokens=max_new_tokens, ignore_eos=True)
        engine.generate(ids, run, spec)  # anything lazy (graphs, kernels) happens before counting
        out = []
        syncs = recorded_syncs(lambda: out.append(engine.generate(ids, run, spec)))
        return len(syncs), out[0].stats.rounds

    short, long = max(2, params.max_new_tokens // 2), max(4, params.max_new_tokens)
    (syncs_short, rounds_short), (syncs_long, rounds_long) = count(short), count(long)
    return (syncs_long - syncs_short) / max(1, rounds_long - rounds_short)


def syncs_beyond_outcome_read(engine: Engine, ids: list[int], params: SamplingParams, spec) -> list[str]:
    """Where a round makes the host wait besides its one outcome read: each distinct stack (innermost 8 frames)
    with its count, e.g. `3x at ...`; empty when the round keeps to its one read. Prefill syncs are not counted."""
    run = replace(params, max_new_tokens=max(4, params.max_new_tokens), ignore_eos=True)
    engine.generate(ids, run, spec)  # anything lazy (graphs, kernels) happens before recording
    counts = Counter()
    for stack in recorded_syncs(lambda: engine.generate(ids, run, spec)):
        if any(frame.name == "_round" for frame in stack) and not is_outcome_read(stack):
            counts["".join(traceback.format_list(stack[-8:]))] += 1
    return [f"{count}x at\n{where}" for where, count in counts.most_common()]


def prefill_memory(target: Qwen3, num_tokens: int, prefill_chunk: int) -> dict:
    """Prefill `num_tokens` random ids on a target alone (no head), in chunks of `prefill_chunk`: seconds and the
    process's peak resident memory (Linux ru_maxrss; on CUDA also the device's peak allocation)."""
    import resource

    from nanojet.engine.kv_cache import KVCache, Sequence
    config, device, page_size = target.config, target.norm.device, 16
    pages = -(-num_tokens // page_size)
    kv = KVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, pages, page_size, pages,
                 target.norm.dtype, device)
    engine = Engine(target, kv, num_tokens + 1, [], prefill_chunk=prefill_chunk)
    ids = torch.randint(config.vocab_size, (num_tokens,)).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = synced_clock()
    with torch.inference_mode():
        engine.prefill(Sequence(), ids)
    seconds = synced_clock() - start
    result = {"prefill_tokens": num_tokens, "prefill_chunk": prefill_chunk, "prefill_s": seconds,
              "kv_pool_bytes": kv.pool.numel() * kv.pool.element_size(),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return result
