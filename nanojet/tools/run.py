"""Generate text with nanojet: `nanojet-run --prompt "def fibonacci(n):"` (`python run.py` in a checkout).

Streams the completion to stdout and a one-line summary to stderr; `--json` prints one JSON object instead.
Sampling flags left unset take the model's generation_config.json values (a `note:` line on stderr names them).
Bad input (missing model, invalid flag value, prompt too long) prints one line on stderr and exits with 2;
Ctrl-C prints one line and exits 130; a closed stdout (`run.py ... | head -2`) ends it quietly."""
import argparse
import json
import sys
from pathlib import Path

# Light: torch is imported in main, after parsing.
from nanojet.tools.cli import ArgumentParser, add_runtime_flags, finite_float

SPECULATIVE_FLAGS = ("budget", "width", "depth")
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "max_new_tokens")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="nanojet: Qwen3 generation with parallel tree speculative decoding")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: the embedded model)")
    parser.add_argument("--head", default="auto",
                        help="draft head directory, 'none' for plain decoding, or 'auto' (the model's shipped head)")
    parser.add_argument("--ar", action="store_true", help="plain autoregressive decoding (no draft head)")
    parser.add_argument("--budget", type=int, default=None,
                        help="draft tree nodes per round, anchor included (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--width", type=int, default=None, help="candidates per tree depth (default 4)")
    parser.add_argument("--depth", type=int, default=None, help="tree depth limit (default: head block size - 1)")
    model_default = "default: the model's generation_config.json, else"
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"{model_default} 128")
    parser.add_argument("--temperature", type=finite_float, default=None, help=f"0 = greedy ({model_default} 0)")
    parser.add_argument("--top-p", type=finite_float, default=None, help=f"nucleus sampling ({model_default} 1)")
    parser.add_argument("--top-k", type=int, default=None, help=f"0 = off ({model_default} 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same ids, any budget)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens even past EOS")
    parser.add_argument("--token-healing", action=argparse.BooleanOptionalAction, default=None,
                        help="raw text prompts: regenerate the last prompt token so the output can merge with it "
                             "(default: on only when the model's generation_config.json sets token_healing)")
    add_runtime_flags(parser)
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit (prompt + generation)")
    parser.add_argument("--kv-memory-gb", type=finite_float, default=None,
                        help="KV pool size (default: room for one sequence of --max-model-len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # nanojet (and torch) are imported here, after parsing, so --help stays instant
        from nanojet import LLM, SamplingParams, SpeculativeParams
        from nanojet.llm import DEFAULT_HEAD_NAME, DEFAULT_MODEL, exactness, resolve_head
        given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
        SamplingParams(**given, seed=args.seed)  # bad values fail now, before the model loads
        if args.ar and args.head not in ("auto", "none"):
            raise ValueError(f"--ar decodes plainly and would ignore --head {args.head}; drop one of them")
        model = Path(args.model) if args.model else DEFAULT_MODEL
        head = None if args.ar or args.head == "none" else resolve_head(model, args.head)
        drafting_flags = [f"--{name}" for name in SPECULATIVE_FLAGS if getattr(args, name) is not None]
        if head is None and drafting_flags:
            reason = ("--ar" if args.ar else "--head none" if args.head == "none"
                      else f"{model} ships no draft head ({DEFAULT_HEAD_NAME}/)")
            print(f"note: decoding plainly ({reason}), so {' '.join(drafting_flags)} "
                  f"{'has' if len(drafting_flags) == 1 else 'have'} no effect; pass --head DIR to draft",
                  file=sys.stderr)
        llm = LLM(model, head=head, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                  kv_memory_gb=args.kv_memory_gb, compile=args.compile, enforce_eager=args.enforce_eager,
                  prefill_chunk=args.prefill_chunk)
        taken = {k: v for k, v in llm.generation_defaults.sampling.items() if k not in given}
        if taken:
            print(f"note: from {model / 'generation_config.json'}: "
                  f"{', '.join(f'{k}={v}' for k, v in taken.items())}", file=sys.stderr)
        params = SamplingParams(**given, **taken, seed=args.seed, ignore_eos=args.ignore_eos)
        # A GPU verifies 64 nodes for about the price of one (memory-bound); a CPU pays per node, and on the
        # embedded model budget 8 is the fastest there (README, bench.py).
        budget = args.budget if args.budget is not None else (64 if llm.device.type == "cuda" else 8)
        spec = SpeculativeParams(budget, 4 if args.width is None else args.width, args.depth) if head else None
        chat = llm.tokenizer.has_chat_template if args.chat is None else args.chat
        healing = llm.generation_defaults.token_healing if args.token_healing is None else args.token_healing
        stream = None if args.json else (lambda text: print(text, end="", flush=True))
        out = llm.generate(args.prompt, params, spec, chat=chat, on_text=stream, token_healing=healing)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stats = out.stats
    elapsed = stats.prefill_s + stats.decode_s
    if args.json:
        record = {"text": out.text, "token_ids": out.token_ids, "prompt_tokens": stats.prompt_tokens,
                  "new_tokens": stats.new_tokens, "elapsed_s": round(elapsed, 4),
                  "tokens_per_s": round(stats.tokens_per_s, 2), "prefill_s": round(stats.prefill_s, 4),
                  "finish_reason": stats.finish_reason, "mode": "speculative" if spec else "ar",
                  "sampling": {name: getattr(params, name) for name in SAMPLING_FLAGS},
                  "token_healing": {"enabled": healing and not chat, "applied": out.token_healed},
                  "rounds": stats.rounds, "accept_len": round(stats.accept_len, 3),
                  "accept_hist": {str(k): v for k, v in sorted(stats.accept_hist.items())},
                  "tokens_per_forward": round(stats.new_tokens / max(1, stats.target_forwards), 3),
                  "time_split_s": {k: round(v, 4) for k, v in stats.time_split.items()},
                  "execution": llm.engine.execution, "compiled": args.compile,
                  "compile_s": round(stats.compile_s, 3), "compiles": stats.compiles,
                  "recompiles": stats.recompiles, "exactness_caveat": exactness(llm.device, llm.dtype)}
        print(json.dumps(record))
    else:
        summary = f"{stats.new_tokens} tokens in {elapsed:.2f} s ({stats.tokens_per_s:.1f} tok/s)"
        if spec:
            summary += f" | tau {stats.accept_len:.2f} | {stats.rounds} rounds"
        if stats.compiles:
            summary += (f" | {llm.engine.execution}: {stats.compiles} graphs built in {stats.compile_s:.1f} s, "
                        f"not in the time")
        caveat = exactness(llm.device, llm.dtype)
        if spec and caveat and not caveat.startswith("exact"):
            summary += f" | speculative output {caveat}"
        print(f"\n{summary}", file=sys.stderr)
    return 0

