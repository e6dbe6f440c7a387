"""Mutation check: apply realistic one-line bugs, one at a time, to a temporary copy of the repo and run the tests.

    python tests/mutants.py                  # each mutant against the tests named for it (minutes)
    python tests/mutants.py --full           # each mutant against the whole suite (-x: a caught mutant stops early)
    python tests/mutants.py --only noise     # mutants whose name contains "noise"

A mutant that no test catches is a weak spot: either a test is missing, or the mutant is equivalent (changes no
behaviour); say which when you add it. This is a tool, not part of CI. Keep the list current: when a file changes,
a mutant whose line no longer exists is reported as stale, never silently skipped.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str      # class/what: the bug it stands for
    path: str      # file, relative to the repo root
    original: str  # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]  # where a catch is expected (pytest node ids or files)


MUTANTS = [
    # noise keys: every token's Gumbel noise is keyed by its own absolute position
    Mutant("noise-key/first-token", "nanojet/engine/engine.py", "torch.full((1,), len(request.prompt_ids), device=self.device)",
           "torch.full((1,), len(request.prompt_ids) + 1, device=self.device)", ("tests/test_round.py",)),
    Mutant("noise-key/round", "nanojet/engine/round.py", "sample_rows(logits, positions + 1,",
           "sample_rows(logits, positions + 2,", ("tests/test_round.py",)),
    Mutant("noise-key/seed-per-row", "nanojet/engine/round.py", "for t in (temperature, top_k, top_p, seed)))",
           "for t in (temperature, top_k, top_p, seed * 0)))", ("tests/test_round.py", "tests/test_batching.py")),
    # label alignment: block row j is taught the target's distribution after position a+j-1
    Mutant("labels/shifted", "nanojet/train/distill.py", "label_positions = anchors[:, :, None] + offsets[:-1]",
           "label_positions = anchors[:, :, None] + offsets[1:]", ("tests/test_train_head.py",)),
    # graph keys: a round is built for a tree shape, a sampling mode, a batch bucket, a bias and log-prob count
    Mutant("graph-key/sampled", "nanojet/engine/engine.py", "return tree, sampled, num_sequences, biased, logprobs",
           "return tree, num_sequences, biased, logprobs", ("tests/test_round.py", "tests/test_compiled.py")),
    Mutant("graph-key/rows", "nanojet/engine/engine.py", "return tree, sampled, num_sequences, biased, logprobs",
           "return tree, sampled, biased, logprobs", ("tests/test_batching.py",)),
    Mutant("graph-key/biased", "nanojet/engine/engine.py", "return tree, sampled, num_sequences, biased, logprobs",
           "return tree, sampled, num_sequences, logprobs", ("tests/test_logprobs.py",)),
    Mutant("graph-key/logprobs", "nanojet/engine/engine.py", "return tree, sampled, num_sequences, biased, logprobs",
           "return tree, sampled, num_sequences, biased", ("tests/test_logprobs.py",)),
    # logit bias and log-probs: only the target's choice is biased, on every row; log-probs follow the path
    Mutant("bias/tree-rows-unbiased", "nanojet/engine/round.py", "        if self.biased:\n            logits = bias_logits(",
           "        if self.biased and rows_per_sequence == 1:\n            logits = bias_logits(",
           ("tests/test_logprobs.py",)),
    Mutant("logprobs/path-rows-shifted", "nanojet/engine/round.py", "logits[(paths + self.logit_starts).flatten()]",
           "logits[(paths.roll(1, 1) + self.logit_starts).flatten()]", ("tests/test_logprobs.py",)),
    Mutant("logprobs/first-sequence-rows", "nanojet/engine/round.py", "logits[(paths + self.logit_starts).flatten()]",
           "logits[paths.flatten()]", ("tests/test_logprobs.py",)),
    Mutant("logprobs/stream-sends-the-stop-token", "nanojet/serve/loop.py", "sum(offset < self.sent for",
           "sum(offset <= self.sent for", ("tests/test_serve_logprobs.py",)),
    Mutant("graph-key/shape", "nanojet/engine/engine.py", "(spec.budget, spec.width, spec.depth)",
           "(spec.budget, spec.width)", ("tests/test_round.py",)),
    # path length: the longest path a tree allows
    Mutant("path/one-short", "nanojet/engine/round.py", "self.path_len = min(depth + 1, nodes)",
           "self.path_len = max(1, min(depth, nodes))", ("tests/test_round.py",)),
    # tree scoring: a node's score is the sum of its ranks' log-probs
    Mutant("tree/score-ignores-parent", "nanojet/engine/tree.py",
           "candidates = (level_scores[:, None] + row).flatten()",
           "candidates = (0 * level_scores[:, None] + row).flatten()",
           ("tests/test_tree.py", "tests/test_speculative.py")),
    Mutant("tree/worst-first", "nanojet/engine/tree.py",
           "chosen = scores.sort(descending=True, stable=True)", "chosen = scores.sort(descending=False, stable=True)",
           ("tests/test_tree.py", "tests/test_speculative.py")),
    # candidate table (nanojet/engine/candidates.py): every node that could be chosen is listed, scored and ordered
    Mutant("tree-table/bound-one-short", "nanojet/engine/candidates.py", "if dominated + product * (rank + 1) <= keep]",
           "if dominated + product * (rank + 1) < keep]", ("tests/test_tree_table.py",)),
    Mutant("tree-table/score-last-depth-only", "nanojet/engine/candidates.py",
           "scores = logprobs[table.score_index].sum(-1)", "scores = logprobs[table.score_index].min(-1).values",
           ("tests/test_tree_table.py",)),
    Mutant("tree-table/unstable-ties", "nanojet/engine/candidates.py", "scores.sort(descending=True, stable=True)",
           "scores.flip(0).sort(descending=True, stable=True)", ("tests/test_tree_table.py",)),
    Mutant("tree-table/lineage-without-root", "nanojet/engine/candidates.py",
           "for j in range(len(path), -1, -1)]", "for j in range(len(path), 0, -1)]", ("tests/test_tree_table.py",)),
    # the head's context K/V, every layer at once (eager CPU): current weights, each layer's k-norm
    Mutant("context-at-once/stale-weights", "nanojet/model/head.py", "key = tuple((id(p), weight_version(p)) for p in params)",
           "key = tuple(id(p) for p in params)", ("tests/test_head.py",)),
    Mutant("context-at-once/one-k-norm", "nanojet/model/head.py",
           "k_norms = torch.stack([layer.self_attn.k_norm for layer in self.layers])[:, None]",
           "k_norms = torch.stack([self.layers[0].self_attn.k_norm for _ in self.layers])[:, None]",
           ("tests/test_head.py", "tests/test_speculative.py")),
    # commit rows: the accepted path's K/V move down to the committed slots
    Mutant("commit/no-move", "nanojet/engine/round.py",
           "kept = torch.where(rows < counts[:, None], paths, rows)", "kept = rows.expand_as(paths)",
           ("tests/test_round.py", "tests/test_speculative.py")),
    Mutant("commit/head-context-position", "nanojet/engine/round.py",
           "self.head.extend_context(taps[path_rows.flatten()], (length[:, None] + rows).flatten()",
           "self.head.extend_context(taps[path_rows.flatten()], (length[:, None] + rows + 1).flatten()",
           ("tests/test_speculative.py",)),
    Mutant("commit/bonus-from-anchor", "nanojet/engine/round.py", "anchor.copy_(choices[path_rows[:, -1]])",
           "anchor.copy_(choices[path_rows[:, 0]])", ("tests/test_round.py",)),
    # masks: tree ancestors, the causal chain of a prefill chunk, the causal head block
    Mutant("mask/tree-no-ancestors", "nanojet/engine/tree.py",
           "        reach = (reach @ reach).clamp(max=1.0)", "        reach = reach.clamp(max=1.0)",
           ("tests/test_tree.py", "tests/test_round.py")),
    Mutant("mask/tree-one-squaring-short", "nanojet/engine/tree.py",
           "for _ in range(max(0, max_depth - 1).bit_length()):",
           "for _ in range(max(0, max_depth - 1).bit_length() - 1):", ("tests/test_tree.py",)),
    # the reference attention's plan: what each query may see, shared by every layer of a forward
    Mutant("mask/plan-drops-tree-mask", "nanojet/kernels/reference.py",
           "visible = None if bool(among_new.all()) else torch.cat(",
           "visible = None if True else torch.cat(", ("tests/test_kernels.py", "tests/test_speculative.py")),
    Mutant("mask/plan-batched-prefix-one-short", "nanojet/kernels/reference.py",
           "visible = (logical < prefix)[:, None, :].repeat(1, n, 1)",
           "visible = (logical < prefix - 1)[:, None, :].repeat(1, n, 1)",
           ("tests/test_kernels.py", "tests/test_batching.py")),
    Mutant("plan/rope-at-wrong-position", "nanojet/kernels/reference.py",
           "    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]",
           "    freqs = (positions + 1).float()[:, None] * inv_freq[None, :]  # [T, D/2]",
           ("tests/test_kernels.py", "tests/test_qwen3.py")),
    Mutant("mask/prefill-chunk-no-self", "nanojet/engine/engine.py", "visible_bits = (row + 1 - word_start).clamp(0, 32)",
           "visible_bits = (row - word_start).clamp(0, 32)", ("tests/test_prefill.py",)),
    Mutant("mask/prefill-chunk-no-prefix", "nanojet/engine/engine.py",
           "prefix_lens=torch.tensor([start for *_, start in chunks],",
           "prefix_lens=torch.tensor([0 for *_, start in chunks],", ("tests/test_prefill.py",)),
    Mutant("mask/head-block-anticausal", "nanojet/model/head.py", "return ones.tril() if self.config.causal else ones",
           "return ones.triu() if self.config.causal else ones", ("tests/test_head.py",)),
    # acceptance walk: a node is accepted only when every ancestor matched too
    Mutant("accept/ignores-ancestors", "nanojet/engine/tree.py",
           "accepted = (matches[None, :] | ~ancestors).all(dim=-1)", "accepted = matches.clone()",
           ("tests/test_tree.py", "tests/test_speculative.py")),
    # padding nodes must never be accepted (token -1 matches no choice)
    Mutant("tree/padding-token-zero", "nanojet/engine/tree.py", "pad(tokens, (0, extra), value=-1)",
           "pad(tokens, (0, extra), value=0)", ("tests/test_tree.py", "tests/test_round.py")),
    # the draft block sees the committed context: prefix = committed length
    Mutant("draft/context-one-short", "nanojet/engine/round.py",
           "block_tables=block_table, prefix_lens=length.to(torch.int32),\n"
           "                                 query_starts=self.query_starts[block_size]",
           "block_tables=block_table, prefix_lens=(length - 1).to(torch.int32),\n"
           "                                 query_starts=self.query_starts[block_size]",
           ("tests/test_head.py", "tests/test_train_head.py")),
    # pages: a trim that frees a page still holding committed K/V
    Mutant("kv/trim-frees-a-live-page", "nanojet/engine/kv_cache.py", "keep = -(-num_slots // self.kv_page_size)",
           "keep = num_slots // self.kv_page_size", ("tests/test_kv_cache.py", "tests/test_round.py")),
    # stops: EOS inside an accepted path is emitted, nothing after it
    Mutant("stop/eos-dropped", "nanojet/engine/request.py", "return tokens[:i + 1]",
           'return tokens[:i + 1 - (self.stats.finish_reason == "eos")]',
           ("tests/test_speculative.py", "tests/test_errors_and_cli.py")),
    # sampling filters
    Mutant("sampling/rows-top-k-one-more", "nanojet/engine/sampling.py", ".values.gather(-1, (k - 1)[:, None])",
           ".values.gather(-1, k.clamp(max=vocab_size - 1)[:, None])", ("tests/test_sampling.py", "tests/test_round.py")),
    Mutant("sampling/rows-top-p-drops-boundary", "nanojet/engine/sampling.py",
           "drop_sorted = (probs.cumsum(-1) - probs >= top_p[:, None])",
           "drop_sorted = (probs.cumsum(-1) >= top_p[:, None])",
           ("tests/test_sampling.py", "tests/test_round.py")),
    # drafting: candidates are log-probs over the draft vocabulary, in target ids; plain decoding's noise key
    Mutant("draft/logits-as-logprobs", "nanojet/engine/round.py",
           "top_logprobs = top_logits - logits.logsumexp(dim=-1, keepdim=True)", "top_logprobs = top_logits",
           ("tests/test_draft_vocab.py",)),
    Mutant("draft/vocab-ids-unmapped", "nanojet/engine/round.py",
           "top_index if self.draft_ids is None else self.draft_ids[top_index]", "top_index",
           ("tests/test_draft_vocab.py",)),
    Mutant("draft/rows-off-by-one", "nanojet/engine/round.py",
           "logits.view(self.num_sequences, 1 + self.depth, -1)[:, 1:]",
           "logits.view(self.num_sequences, 1 + self.depth, -1)[:, :-1]",
           ("tests/test_draft_vocab.py", "tests/test_head.py")),
    Mutant("verify/real-rows-shifted", "nanojet/engine/round.py", "[:, :nodes].flatten(0, 1)",
           "[:, bucket - nodes:].flatten(0, 1)", ("tests/test_round.py",)),
    # batching: inert rows write only the round's idle pages
    Mutant("batch/inert-rows-on-a-live-sequence", "nanojet/engine/round.py", "                sequence = self.idle\n",
           "                sequence = sequences[0]\n", ("tests/test_batching.py",)),
]


def copy_repo(destination: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree (what the suite sees)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_mutant(mutant: Mutant, full: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="nanojet-mutant-") as temp:
        clone = Path(temp)
        copy_repo(clone)
        path = clone / mutant.path
        text = path.read_text()
        if text.count(mutant.original) != 1:
            return "stale"  # the line changed: update the mutant
        path.write_text(text.replace(mutant.original, mutant.mutated))
        selection = ["tests"] if full else list(mutant.tests)
        environment = {**os.environ, "TRITON_INTERPRET": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                                cwd=clone, env=environment, capture_output=True, text=True)
        if result.returncode == 0:
            return "SURVIVED"
        return "caught" if result.returncode == 1 else f"error (pytest exit {result.returncode})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the whole suite per mutant")
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.only in m.name]
    outcomes = {}
    for mutant in chosen:
        start = time.perf_counter()
        outcomes[mutant.name] = run_mutant(mutant, args.full)
        print(f"{outcomes[mutant.name]:>8}  {mutant.name}  ({time.perf_counter() - start:.0f} s)", flush=True)
    caught = sum(o == "caught" for o in outcomes.values())
    print(f"{caught}/{len(outcomes)} mutants caught ({'whole suite' if args.full else 'named tests'})")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
