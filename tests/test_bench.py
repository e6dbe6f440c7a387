"""bench.py: a sweep on a random model reports sane figures, a corrupted run fails the lossless check,
synthetic mode runs in real shapes (cut), and bad input exits 2 with one line."""
import json
import sys
from collections import Counter

import pytest
import torch
from conftest import random_head

from nanojet.engine.engine import Engine
from nanojet.engine.request import GenerationStats
from nanojet.engine.round import StaticRound
from nanojet.model.config import ModelConfig
from nanojet.tools import bench


@pytest.fixture(scope="module")
def bench_inputs(hf_model_dir, tmp_path_factory):
    """The random checkpoint, a random head saved beside it (tmp) and a 2-prompt jsonl in two field styles."""
    directory = tmp_path_factory.mktemp("bench")
    random_head(ModelConfig.from_dir(hf_model_dir[0]), block_size=6).save(directory / "head")
    prompts = directory / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n"}) + "\n\n" +
                       json.dumps({"turns": ["import os\nos.path.", "second turn"]}) + "\n")
    return ["--model", str(hf_model_dir[0]), "--head", str(directory / "head"), "--prompts", str(prompts),
            "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "12"]


def test_sweep_reports_sane_figures(bench_inputs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(bench_inputs + ["--budgets", "1,8", "--json", str(out), "--profile", "--peer", "hf"]) == 0
    result = json.loads(out.read_text())
    config = result["config"]
    assert config["dtype"] == "float32" and config["max_new_tokens"] == 12 and config["samples"] == 2
    assert config["prompts_source"].endswith("prompts.jsonl") and config["torch"]
    assert [r["budget"] for r in result["budgets"]] == [1, 8]
    for row in result["budgets"]:
        assert row["lossless"] is True
        assert row["tau"] >= 1 and row["tokens_per_forward"] >= 1
        assert row["ar_tokens_per_s"] > 0 and row["spec_tokens_per_s"] > 0 and row["speedup"] > 0
        assert row["round_over_ar_step"] > 0
        assert all(0 <= a <= 1 for a in row["accept_rate_by_depth"])
    one, eight = result["budgets"]
    assert one["tau"] == 1 and one["accept_rate_by_depth"] == []  # budget 1 is plain decoding
    assert set(eight["time_split_ms_per_round"]) == set(bench.COMPONENTS)
    assert len(result["per_prompt"]) == 2
    for entry in result["per_prompt"]:
        assert entry["ar"]["new_tokens"] == len(entry["ar"]["token_ids"]) <= 12
        assert entry["ar"]["rounds"] == entry["ar"]["new_tokens"] - 1  # one AR step per token after prefill
        spec = entry["spec"]["8"]
        assert spec["new_tokens"] == entry["ar"]["new_tokens"] and spec["lossless"]
        rounds = sum(spec["accept_hist"].values())
        assert rounds == spec["rounds"] and spec["target_forwards"] == rounds + 1
        assert entry["peer_hf"]["agrees_with_ar"]  # fp32: HF greedy emits the very same ids
    assert result["peer_hf"]["decode_tokens_per_s"] > 0
    table = capsys.readouterr().out
    assert "speedup" in table and "prefill excluded" in table and "acceptance by depth" in table
    assert "per-component latency" in table and "HF transformers" in table
    assert "in AR steps" in table and "roofline" in table
    assert result["matvec_bytes_per_s"] > 0 and result["roofline_step_ms"] > 0


def test_compiled_sweep_reports_compile_time_apart(bench_inputs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(bench_inputs + ["--budgets", "1,8", "--json", str(out), "--compile"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["compile"] is True
    assert all(row["lossless"] for row in result["budgets"])
    compiled = result["compiled"]
    assert compiled["compile_s"]["ar"] > 0 and compiled["compile_s"]["8"] > 0
    assert compiled["compile_s"]["1"] == 0  # budget 1 is plain decoding: the AR graph, built already
    assert compiled["graphs_built_while_measuring"] == 0
    assert "graphs built while measuring: 0" in capsys.readouterr().out


def test_corrupted_speculative_output_fails_loudly(bench_inputs, tmp_path, monkeypatch, capsys):
    generate = Engine.generate

    def corrupted(self, prompt_ids, params, spec=None, *args, **kwargs):
        out = generate(self, prompt_ids, params, spec, *args, **kwargs)
        if spec is not None and spec.budget == 8 and len(out.token_ids) > 3:
            out.token_ids[3] = (out.token_ids[3] + 1) % 256
        return out

    monkeypatch.setattr(Engine, "generate", corrupted)
    out = tmp_path / "bench.json"
    assert bench.main(bench_inputs + ["--budgets", "1,8", "--json", str(out)]) == 1
    error = capsys.readouterr().err
    assert "not lossless: prompt 0, budget 8: token 3 differs" in error
    assert not out.exists()  # checked writable up front, without leaving an empty file behind


def test_synthetic_shape_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "synthetic.json"
    argv = ["--synthetic", "qwen3-0.6b", "--synthetic-layers", "1", "--synthetic-vocab", "2048", "--samples", "1",
            "--max-new-tokens", "4", "--budgets", "1,4", "--device", "cpu", "--dtype", "float32", "--json", str(out),
            "--draft-vocab", "512"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["config"]["synthetic"] == "qwen3-0.6b" and result["config"]["layers"] == 1
    assert result["config"]["draft_vocab"] == 512
    # 0.6B shapes: tied 2048 x 1024 embedding read in full by lm_head, plus one layer, in fp32
    layer = 1024 * (16 + 2 * 8) * 128 + 16 * 128 * 1024 + 3 * 1024 * 3072 + 2 * 1024 + 2 * 128
    assert result["weight_bytes_per_step"] == 4 * (2048 * 1024 + layer + 1024)
    assert result["ar_step_ms"] > 0 and result["achieved_bytes_per_s"] > 0
    assert result["per_prompt"][0]["ar"]["new_tokens"] == 4
    assert "GB/s" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--budgets", "1,x"], "comma-separated integers"),
    (["--budgets", "1,600"], "budgets must lie in 1..512"),
    (["--budget", "0"], "got [0]"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--draft-vocab", "64"], "--synthetic head"),
    (["--max-new-tokens", "abc"], "invalid int value"),
    (["--peer", "hf", "--temperature", "0.7"], "greedy"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--temperature", "nan"], "must be a finite number"),
    (["--top-p", "inf"], "must be a finite number"),
    (["--top-k", "1.5"], "invalid int value"),
    (["--json", "/nonexistent/dir/out.json"], "directory does not exist"),
])
def test_bad_flags_exit_2_with_one_line(args, message, capsys):
    assert bench.main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


@pytest.mark.parametrize("flag, path, message", [
    ("--json", "/proc/nanojet-bench.json", "cannot write /proc/nanojet-bench.json"),
    ("--json", "DIR", "is a directory"),
    ("--plot", "/proc/nanojet-bench.png", "cannot write /proc/nanojet-bench.png"),
    ("--plot", "OUT.txt", "--plot OUT.txt: matplotlib cannot write .txt files"),
])
def test_unwritable_outputs_are_refused_before_measuring(bench_inputs, tmp_path, monkeypatch, capsys, flag, path,
                                                         message):
    if flag == "--plot":
        pytest.importorskip("matplotlib")

    def measure(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output paths were checked")
    monkeypatch.setattr(bench, "measure", measure)
    path = {"DIR": str(tmp_path), "OUT.txt": str(tmp_path / "out.txt")}.get(path, path)
    assert bench.main(bench_inputs + [flag, path]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message.replace("OUT.txt", path) in error, error
    assert not (tmp_path / "out.txt").exists()


def test_top_k_reaches_the_sampler(bench_inputs, tmp_path, monkeypatch):
    """--top-k is recorded and used: with top-k 1 sampling is greedy, so it emits the greedy ids."""
    out = tmp_path / "bench.json"
    common = bench_inputs + ["--budgets", "4", "--samples", "1", "--ignore-eos"]
    assert bench.main(common + ["--temperature", "5", "--top-k", "1", "--json", str(out)]) == 0
    sampled = json.loads(out.read_text())
    assert sampled["config"]["top_k"] == 1 and sampled["budgets"][0]["lossless"]
    assert bench.main(common + ["--json", str(out)]) == 0
    greedy = json.loads(out.read_text())
    assert sampled["per_prompt"][0]["ar"]["token_ids"] == greedy["per_prompt"][0]["ar"]["token_ids"]


def test_bad_inputs_exit_2_with_one_line(bench_inputs, hf_model_dir, tmp_path, capsys, monkeypatch):
    def run(*changes):
        argv = list(bench_inputs)
        for flag, value in changes:
            argv[argv.index(flag) + 1] = value
        assert bench.main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1
        return error

    assert "no draft head" in run(("--head", str(tmp_path / "missing")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"text": "no prompt field"}\n')
    assert "line 2" in run(("--prompts", str(bad))) and "turns[0]" in run(("--prompts", str(bad)))
    bad.write_text('{"prompt": "x"}\nnot json\n')
    assert "line 2 is not valid JSON" in run(("--prompts", str(bad)))
    assert "does not exist" in run(("--prompts", str(tmp_path / "none.jsonl")))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert bench.main(bench_inputs + ["--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_summary_of_acceptance_counts():
    """tau, per-depth acceptance and time per token from hand-made statistics (catches off-by-one depths)."""
    runs = [GenerationStats(new_tokens=9, decode_s=0.4, rounds=4, target_forwards=5,
                            accept_hist=Counter({1: 1, 2: 1, 3: 2}), time_split=Counter(verify=0.2, draft=0.1)),
            GenerationStats(new_tokens=5, decode_s=0.4, rounds=2, target_forwards=3, accept_hist=Counter({4: 1, 1: 1}))]
    summary = bench.summarize(runs, depth=4)
    assert summary["tau"] == (1 + 2 + 3 * 2 + 4 + 1) / 6
    assert summary["accept_rate_by_depth"] == [4 / 6, 3 / 6, 1 / 6, 0.0]  # rounds accepting >= 1, 2, 3, 4 drafts
    assert summary["decode_tokens"] == 12 and summary["decode_tokens_per_s"] == pytest.approx(12 / 0.8)
    assert summary["tokens_per_forward"] == 14 / 8 and summary["round_ms"] == pytest.approx(800 / 6)
    assert summary["time_split_ms_per_round"] == pytest.approx({"draft": 100 / 6, "verify": 200 / 6})


def test_plot_is_written(bench_inputs, tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.main(bench_inputs + ["--budgets", "1,4", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_figures_of_a_perfect_drafter(bench_inputs, tmp_path, monkeypatch):
    """An oracle drafter that proposes the AR continuation is accepted at every depth, so the figures are known:
    tau = block size (5 drafts + the bonus), every depth accepted, 1 + 23 / 6 rounds -> 24 tokens in 5 forwards."""
    reference, generate = {}, Engine.generate

    current = {}

    def recording_generate(self, prompt_ids, params, spec=None, *args, **kwargs):
        current["prompt"] = list(prompt_ids)
        out = generate(self, prompt_ids, params, spec, *args, **kwargs)
        if spec is None:  # bench runs AR before the budgets, for the warmup and for every prompt
            reference[tuple(prompt_ids)] = out.token_ids
        return out

    def oracle_draft(self, pool, anchor, length, block_table, scratch=None):
        emitted = int(length[0]) + 1 - len(current["prompt"])  # the anchor is the last emitted token
        rows = self.head.config.block_size - 1
        logprobs = torch.full((1, rows, self.target.config.vocab_size), -30.0)
        for depth, token in enumerate(reference[tuple(current["prompt"])][emitted:emitted + rows]):
            logprobs[0, depth, token] = 0.0
        return tuple(logprobs.topk(self.spec.width, dim=-1))

    monkeypatch.setattr(Engine, "generate", recording_generate)
    monkeypatch.setattr(StaticRound, "draft_candidates", oracle_draft)
    out = tmp_path / "bench.json"
    argv = bench_inputs + ["--budgets", "1,8", "--max-new-tokens", "24", "--ignore-eos", "--json", str(out)]
    assert bench.main(argv) == 0
    one, eight = json.loads(out.read_text())["budgets"]
    assert eight["lossless"] and eight["tau"] == 6 and eight["accept_rate_by_depth"] == [1.0] * 5
    assert eight["tokens_per_forward"] == 24 / 5 and eight["accept_hist"] == {"6": 8}
    assert one["tau"] == 1 and one["tokens_per_forward"] == 1


def test_serving_mode_reports_every_run(bench_inputs, tmp_path, capsys):
    """--concurrency: AR and a budget at each concurrency, in process and through the HTTP server; the batched ids
    were checked against AR one by one (a mismatch would exit 1)."""
    out = tmp_path / "serving.json"
    assert bench.main(bench_inputs + ["--concurrency", "1,2", "--budgets", "8", "--http", "--ignore-eos",
                                      "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["mode"], r["path"], r["concurrency"]) for r in runs] == [
        (mode, path, c) for mode in ("ar", "budget 8") for path in ("in-process", "http") for c in (1, 2)]
    for run in runs:
        assert run["tokens"] == 2 * 12 and run["tokens_per_s"] > 0
        assert 0 < run["ttft_p50_ms"] <= run["ttft_p90_ms"] and 0 < run["tpot_p50_ms"] <= run["tpot_p90_ms"]
        assert (run["tau"] is None) == (run["path"] == "http")
    assert all(r["tau"] == 1 for r in runs if r["mode"] == "ar" and r["tau"] is not None)
    assert "TTFT p50/p90 ms" in capsys.readouterr().out


def test_serving_mode_rejects_bad_concurrency(bench_inputs):
    with pytest.raises(ValueError, match="concurrency"):
        bench.parse_args(bench_inputs + ["--concurrency", "1,x"])


def test_syncs_are_recorded_with_the_line_that_waited(monkeypatch):
    """The device check names every host wait of a round besides its outcome read; on the CPU the sync debug mode is
    stood in for by the warning it raises, from a function shaped like Engine._round."""
    import warnings

    from nanojet.bench import device_stats
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def sync():
        warnings.warn("called a synchronizing operation")
        return torch.zeros(1)

    def _round():
        sync().tolist()  # the outcome read
        torch.ones(1, out=sync())  # another wait: to be named

    stacks = device_stats.recorded_syncs(_round)
    assert len(stacks) == 2
    assert [device_stats.is_outcome_read(stack) for stack in stacks] == [True, False]
    assert [frame.line for frame in stacks[1][-2:]] == ["torch.ones(1, out=sync())  # another wait: to be named",
                                                         'warnings.warn("called a synchronizing operation")']
