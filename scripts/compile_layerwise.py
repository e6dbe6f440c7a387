"""An experiment for the next step of issue 26 (compile time flat in depth), not what the runtime does: the target's
paged forward compiled two ways, at several depths.

    python scripts/compile_layerwise.py --layers 2,14,28 --rows 1,8 [--device cpu|cuda]

- `whole`: torch.compile over the whole forward, as a compiled round does today (each decoder layer three nested
  compile regions, compiled once; the calls between them unrolled layer by layer in one graph);
- `layerwise`: an eager loop over the layers, each calling one torch.compile'd `DecoderLayer.forward_paged` (two
  graphs for any depth: the first layer, whose residual is None, and the rest). Inside a CUDA graph the loop costs
  nothing; on the CPU each call pays dynamo's guards and the compiled wrapper.

For each (way, depth, rows): seconds of the first call (compiling) and milliseconds per forward after it. Every
figure comes from a fresh process with inductor's graph caches off and its kernel cache filled by an unreported
first run, as in scripts/compile_time.py. A synthetic Qwen3-0.6B shape cut to `--layers`, vocabulary 4096."""
import argparse
import json
import subprocess
import sys
import tempfile
import time

from compile_time import compile_environment  # beside this file


def measure(way: str, layers: int, rows: int, device: str) -> dict:
    import torch

    from nanojet.bench.synthetic import synthetic_models
    from nanojet.model.attention import AttentionMetadata
    from nanojet.model.qwen3 import DecoderLayer
    torch.manual_seed(0)
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target, _ = synthetic_models("qwen3-0.6b", dtype, device, layers=layers, vocab=4096)
    config, pages, page_size, context = target.config, 8, 16, 20
    pool = torch.zeros(layers, 2, pages, page_size, config.num_key_value_heads, config.head_dim, dtype=dtype,
                       device=device)
    new = torch.arange(rows, device=device)
    meta = AttentionMetadata(positions=context + new, slot_mapping=context + new,
                             block_tables=torch.arange(pages, dtype=torch.int32, device=device)[None],
                             prefix_lens=torch.tensor([context], dtype=torch.int32, device=device),
                             query_starts=torch.tensor([0, rows], dtype=torch.int32, device=device),
                             visibility=((1 << (new[:, None] + 1)) - 1).to(torch.int32))  # causal rows
    tokens = torch.randint(config.vocab_size, (rows,), device=device)
    if way == "whole":
        forward = torch.compile(lambda: target(tokens, meta, pool)[0], fullgraph=True, dynamic=False)
    else:
        layer_step = torch.compile(DecoderLayer.forward_paged, fullgraph=True, dynamic=False)

        def forward():
            x, residual = target.embed_tokens(tokens), None
            for index, layer in enumerate(target.layers):
                x, residual = layer_step(layer, x, residual, meta, pool[index], target.inv_freq)
            return x
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        start = time.perf_counter()
        forward()
        sync()
        compile_s = time.perf_counter() - start
        forward()
        sync()
        start = time.perf_counter()
        for _ in range(20):
            forward()
        sync()
    return {"way": way, "layers": layers, "rows": rows, "compile_s": round(compile_s, 2),
            "forward_ms": round((time.perf_counter() - start) / 20 * 1e3, 2)}


def run_child(args, way: str, layers: int, rows: int, cache: str) -> dict:
    environment = compile_environment(cache)
    command = [sys.executable, __file__, "--one", f"{way},{layers},{rows}", "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{way} at {layers} layers, {rows} rows failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,14,28", help="comma-separated target depths")
    parser.add_argument("--rows", default="1,8", help="comma-separated tokens per forward (1: decode)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: way,layers,rows
    args = parser.parse_args(argv)
    if args.one:
        way, layers, rows = args.one.split(",")
        print(json.dumps(measure(way, int(layers), int(rows), args.device)))
        return 0
    print(f"{'way':>9} {'layers':>6} {'rows':>4} {'compile s':>9} {'forward ms':>10}")
    with tempfile.TemporaryDirectory(prefix="nanojet-layerwise-") as cache:
        for rows in (int(n) for n in args.rows.split(",")):
            for layers in (int(n) for n in args.layers.split(",")):
                for way in ("whole", "layerwise"):
                    run_child(args, way, layers, rows, cache)  # fills the kernel cache
                    row = run_child(args, way, layers, rows, cache)
                    print(f"{way:>9} {layers:>6} {rows:>4} {row['compile_s']:>9.1f} {row['forward_ms']:>10.1f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
