"""Is speculative decoding lossless here? On the embedded model with its shipped head, held-out prompts: for each
runner (eager rounds, CUDA graphs, torch.compile), greedy and seeded sampling (temperature 0.8, top-p 0.9), every
budget's ids must equal plain decoding's, and a sequence decoded among `--batch` others must equal it decoded alone.

    python scripts/lossless_check.py --dtype bfloat16 --runners eager,graphed,compiled --budgets 2,8,16,64,256 \\
        --prompts 6 --max-new-tokens 64 --batch 8 --json OUT

Prints "k/n equal" per runner and the first mismatch; the JSON (rewritten after each runner, so a run cut short
keeps what finished) holds the same. Exit 1 on any mismatch, 2 on bad arguments. CUDA graphs need a GPU: on the
CPU the graphed runner is reported as not available."""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNNERS = ("eager", "graphed", "compiled")
SETTINGS = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_p=0.9)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--runners", default="eager,graphed,compiled", help=f"comma-separated: {', '.join(RUNNERS)}")
    parser.add_argument("--budgets", default="2,8,16,64,256", help="comma-separated tree budgets")
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together in the batched check")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    args.runners = args.runners.split(",")
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if any(r not in RUNNERS for r in args.runners) or min(args.budgets) < 2 or args.prompts < 1 or args.batch < 1:
        parser.error(f"runners must be among {', '.join(RUNNERS)}, budgets >= 2, --prompts and --batch >= 1")
    return args


def params_for(setting: str, prompt: int, max_new_tokens: int):
    from nanojet.engine.sampling import SamplingParams
    return SamplingParams(**SETTINGS[setting], seed=prompt, max_new_tokens=max_new_tokens, ignore_eos=True)


def first_difference(plain: list[int], spec: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))


def check_alone(llm, prompts: list[list[int]], args, report: dict, save) -> dict:
    """Every prompt, setting and budget against plain decoding, counted into `report` (`save()` after each prompt,
    so a run cut short keeps its counts); returns the ids alone at each budget, for the batched check."""
    from nanojet.engine.request import SpeculativeParams
    alone = {}
    for index, ids in enumerate(prompts):
        for setting in SETTINGS:
            params = params_for(setting, index, args.max_new_tokens)
            plain = llm.generate(ids, params).token_ids
            for budget in args.budgets:
                got = llm.generate(ids, params, SpeculativeParams(budget)).token_ids
                alone[index, setting, budget] = got
                report["total"] += 1
                report["equal"] += got == plain
                if got != plain and report["first_mismatch"] is None:
                    at = first_difference(plain, got)
                    report["first_mismatch"] = {"prompt": index, "setting": setting, "budget": budget, "token": at,
                                                "plain": plain[at:at + 4], "speculative": got[at:at + 4]}
        report["summary"] = f"{report['equal']}/{report['total']} equal"
        save()
    return alone


def check_batched(llm, prompts: list[list[int]], args, alone: dict) -> tuple[int, int, dict | None]:
    """`--batch` sequences (prompts cycled, settings alternating) decoded together at one budget, each against its
    ids alone."""
    from nanojet.engine.request import SpeculativeParams
    budget = 16 if 16 in args.budgets else args.budgets[0]
    rows = [(i % len(prompts), list(SETTINGS)[i % len(SETTINGS)]) for i in range(args.batch)]
    outputs = llm.generate_batch([prompts[p] for p, _ in rows],
                                 [params_for(s, p, args.max_new_tokens) for p, s in rows], SpeculativeParams(budget))
    equal, first = 0, None
    for row, ((prompt, setting), out) in enumerate(zip(rows, outputs)):
        expected = alone[prompt, setting, budget]
        equal += out.token_ids == expected
        if out.token_ids != expected and first is None:
            first = {"row": row, "prompt": prompt, "setting": setting, "budget": budget,
                     "token": first_difference(expected, out.token_ids)}
    return equal, len(rows), first


def check_runner(runner: str, args, device, report: dict, save) -> None:
    """One runner's checks, counted into `report` as they go."""
    from nanojet.bench.prompt_sets import builtin_prompts
    from nanojet.llm import LLM
    if runner == "graphed" and device.type != "cuda":
        report.update(status="not-available", reason="CUDA graphs need a GPU")
        return
    start = time.perf_counter()
    llm = LLM(head="auto", device=device.type, dtype=args.dtype, max_num_seqs=args.batch,
              max_tree_nodes=max(args.budgets), compile=runner == "compiled", enforce_eager=runner == "eager")
    if llm.head is None:
        raise FileNotFoundError("the embedded model has no shipped head (nanojet/weights/qwen3-stdlib-tiny/"
                                "head-causal); build it (nanojet/weights/README.md)")
    report.update(status="running", execution=llm.engine.execution, equal=0, total=0, summary="", first_mismatch=None)
    prompts = [llm.encode_prompt(text) for text in builtin_prompts(args.prompts)]
    alone = check_alone(llm, prompts, args, report, save)
    batched_equal, batched_total, batched_first = check_batched(llm, prompts, args, alone)
    passed = report["equal"] == report["total"] and batched_equal == batched_total
    report.update(status="passed" if passed else "failed", batched_equal=batched_equal, batched_total=batched_total,
                  batched_first_mismatch=batched_first, seconds=round(time.perf_counter() - start, 1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from nanojet.llm import resolve_device
    device = resolve_device(args.device)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "torch": torch.__version__, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "budgets": args.budgets, "batch": args.batch, "runners": {}}
    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    for runner in args.runners:
        report = result["runners"][runner] = {}
        check_runner(runner, args, device, report, save)
        line = report.get("summary", report["status"])
        if "batched_total" in report:
            line += f", batched {report['batched_equal']}/{report['batched_total']} equal alone"
        mismatch = report.get("first_mismatch") or report.get("batched_first_mismatch")
        print(f"{args.dtype} {runner}: {line}" + (f"; first mismatch {json.dumps(mismatch)}" if mismatch else ""),
              flush=True)
        save()
    result["all_equal"] = all(r["status"] != "failed" for r in result["runners"].values())
    save()
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
