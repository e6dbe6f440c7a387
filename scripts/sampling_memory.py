"""Peak memory of one Gumbel-noise draw (nanojet/engine/sampling.py) at a verify step's shape: the chunked hash against
the whole vocabulary in one chunk (how it was computed before). Memory only, not time.

    python scripts/sampling_memory.py                  # CPU: peak resident memory of a fresh process per variant
    python scripts/sampling_memory.py --device cuda    # CUDA: torch.cuda.max_memory_allocated

Prints one line per variant: the peak memory the draw added, and how much of it is above the [N, V] fp32 output.
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(device: str, rows: int, vocab: int, chunk_elements: int) -> int:
    """Bytes the draw adds to the peak (this process: call it once per process on the CPU)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from nanojet.engine.sampling import gumbel_noise
    positions = torch.arange(rows, device=device) + 1000
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        gumbel_noise(3, positions, vocab, chunk_elements)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gumbel_noise(3, positions, vocab, chunk_elements)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=512, help="N: tree nodes sampled in one step")
    parser.add_argument("--vocab", type=int, default=151936, help="V: Qwen3's vocabulary")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)  # child process: one variant
    args = parser.parse_args()
    if args.measure is not None:
        print(measure(args.device, args.rows, args.vocab, args.measure))
        return 0
    sys.path.insert(0, str(ROOT))
    from nanojet.engine.sampling import NOISE_CHUNK_ELEMENTS
    output_bytes = args.rows * args.vocab * 4
    for name, chunk_elements in (("chunked", NOISE_CHUNK_ELEMENTS), ("one chunk (before)", args.rows * args.vocab)):
        child = [sys.executable, __file__, "--device", args.device, "--rows", str(args.rows), "--vocab",
                 str(args.vocab), "--measure", str(chunk_elements)]
        peak = int(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print(json.dumps({"variant": name, "device": args.device, "rows": args.rows, "vocab": args.vocab,
                          "peak_mib": round(peak / 2**20), "above_output_mib": round((peak - output_bytes) / 2**20)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
