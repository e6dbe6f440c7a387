"""Evaluate draft heads of one target: tau at chain / budgets on prompt sets, acceptance by depth, draft fit.

    python scripts/eval_heads.py nanojet/weights/qwen3-stdlib-tiny/head-causal nanojet/weights/qwen3-stdlib-tiny/head-bidirectional
    python scripts/eval_heads.py runs/grid/* --humaneval ../shared/data/humaneval.jsonl --json runs/grid.jsonl

For each head and prompt set (16 held-out stdlib prompts; HumanEval if given): tau of a chain (width 1, the
head's full depth) and of width-4 trees at budgets 8/16/64/256, greedy, 96 new tokens per prompt (EOS ignored),
and acceptance by depth at budget 64. On the stdlib set also `head_eval.draft_fit` on the target's own greedy
text (the same generations). Prints one markdown row per head and set; `--json` appends every figure.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanojet.bench.prompt_sets import builtin_prompts, read_prompts  # noqa: E402
from nanojet.bench.synthetic import build_engine  # noqa: E402
from nanojet.engine.request import SpeculativeParams  # noqa: E402
from nanojet.engine.sampling import SamplingParams  # noqa: E402
from nanojet.llm import DEFAULT_MODEL, load_target  # noqa: E402
from nanojet.model.head import load_head  # noqa: E402
from nanojet.tokenizer import Tokenizer  # noqa: E402
from nanojet.train.head_eval import acceptance, draft_fit  # noqa: E402

BUDGETS = (8, 16, 64, 256)


def evaluate(target, head_dir: Path, prompt_sets: dict[str, list[list[int]]], new_tokens: int) -> list[dict]:
    head = load_head(head_dir, target.config, torch.float32, torch.device("cpu")).eval()
    depth = head.config.block_size - 1
    longest = max(len(p) for prompts in prompt_sets.values() for p in prompts)
    engine = build_engine(target, head, longest + new_tokens + 1, max_tree_nodes=max(BUDGETS))
    rows = []
    for name, prompts in prompt_sets.items():
        row = {"head": str(head_dir), "set": name, "prompts": len(prompts), "block_size": head.config.block_size,
               "layers": head.config.layers.num_hidden_layers, "causal": head.config.causal}
        row["tau_chain"] = acceptance(engine, prompts, SpeculativeParams(depth + 1, 1), new_tokens, depth)["tau"]
        for budget in BUDGETS:
            measured = acceptance(engine, prompts, SpeculativeParams(budget, 4), new_tokens, depth)
            row[f"tau_{budget}"] = measured["tau"]
            if budget == 64:
                row["accept_by_depth_64"] = measured["accept_by_depth"]
        if name == "stdlib":
            greedy = [p + engine.generate(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)).token_ids
                      for p in prompts]
            row["fit"] = draft_fit(target, head, greedy, [len(p) for p in prompts])
        rows.append(row)
    return rows


def markdown(row: dict) -> str:
    kind = "causal" if row["causal"] else "bidirectional"
    taus = " | ".join(f"{row[k]:.2f}" for k in ["tau_chain"] + [f"tau_{b}" for b in BUDGETS])
    depths = " ".join(f"{a:.2f}" for a in row["accept_by_depth_64"])
    return f"| {Path(row['head']).name} | {kind} | {row['set']} | {taus} | {depths} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("heads", nargs="+", type=Path, help="head directories")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the target (default: the embedded model)")
    parser.add_argument("--samples", type=int, default=16, help="prompts per set")
    parser.add_argument("--new-tokens", type=int, default=96, help="greedy tokens generated per prompt")
    parser.add_argument("--humaneval", type=Path, default=None,
                        help="HumanEval jsonl (e.g. ../shared/data/humaneval.jsonl)")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON object per head and set")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_dir(args.model)
    target = load_target(args.model, torch.float32, torch.device("cpu"))
    sets = {"stdlib": [tokenizer.encode(p) for p in builtin_prompts(args.samples)]}
    if args.humaneval:
        sets["humaneval"] = [tokenizer.encode(p) for p in read_prompts(args.humaneval, args.samples)]
    print(f"| head | kind | prompts | chain | {' | '.join(f'b{b}' for b in BUDGETS)} | accepted by depth at b64 |")
    print("|---|---|---|---|" + "---|" * len(BUDGETS) + "---|")
    for head_dir in args.heads:
        for row in evaluate(target, head_dir, sets, args.new_tokens):
            print(markdown(row), flush=True)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
