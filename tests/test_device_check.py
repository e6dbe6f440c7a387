"""scripts/device_check.sh without a GPU: it parses, its dry run writes the summary, and every command it would run
on a GPU passes the argument parsing of the script it calls."""
import json
import shlex
import subprocess
from pathlib import Path

from nanojet.tools import bench, train_head

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_check.sh"


def test_device_check_plan_is_complete_and_parses(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    missing = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert missing.returncode == 2 and "OUT_DIR" in missing.stderr
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    legs = {leg["name"]: leg for leg in summary["legs"]}
    assert summary["dry_run"] and set(legs) == {"gpu-tests", "bench-eager", "bench-graphs", "train-head",
                                                "sampling-memory", "bench-compiled"}
    assert legs["gpu-tests"]["command"].endswith("-m pytest -q -m gpu tests")
    runs = {name: shlex.split(leg["command"])[1:] for name, leg in legs.items() if leg["status"] == "dry-run"}
    for name in ("bench-eager", "bench-compiled") + (("bench-graphs",) if "bench-graphs" in runs else ()):
        args = bench.parse_args(runs[name][1:])
        assert (args.synthetic, args.budgets, args.device) == ("qwen3-8b", [16, 64, 256], "cuda")
        assert args.compile == (name == "bench-compiled") and args.json.endswith(f"{name}.json")
    args = train_head.parse_args(runs["train-head"][1:])
    assert (args.synthetic, args.steps, args.device) == ("qwen3-0.6b", 200, "cuda")
