"""The figures of each device-check leg (scripts/device_check.py), read from its JSON report, JUnit XML or log, and
the table the check prints at the end. A leg cut short still reports what it wrote before."""
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

COMPILE_TARGET_S = 60  # seconds per round shape of the 8B round (the GPU-path issue)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(xml: Path) -> dict:
    """passed / failed / errors / skipped of a pytest JUnit XML, and the ids of the tests that did not pass."""
    try:
        root = ElementTree.parse(xml).getroot()
    except (OSError, ElementTree.ParseError) as error:
        return {"error": f"no readable JUnit XML ({error})"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_passed": []}
    for case in root.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "errors"}.get(outcome, outcome)
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["not_passed"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def bench_figures(report: dict) -> dict:
    """AR step against its floor, round cost in AR steps, compile/capture seconds and host syncs of a bench JSON."""
    compiled = report.get("compiled", {})
    figures = {"ar_step_ms": report.get("ar_step_ms"), "floor_step_ms": report.get("roofline_step_ms"),
               "bandwidth_fraction": report.get("bandwidth_fraction"),
               "round_in_ar_steps": {str(r["budget"]): r["round_over_ar_step"] for r in report.get("budgets", [])},
               "speedup": {str(r["budget"]): r["speedup"] for r in report.get("budgets", [])},
               "compile_capture_s": compiled.get("compile_s"),
               "host_syncs_per_round": compiled.get("host_syncs_per_round"),
               "syncs_beyond_outcome_read": compiled.get("syncs_beyond_outcome_read")}
    if figures["ar_step_ms"] and figures["floor_step_ms"]:
        figures["floor_over_ar_step"] = figures["floor_step_ms"] / figures["ar_step_ms"]
    return figures


def lossless_figures(report: dict) -> dict:
    return {name: {key: runner.get(key) for key in ("status", "summary", "batched_equal", "batched_total",
                                                     "first_mismatch", "batched_first_mismatch", "seconds")}
            for name, runner in report.get("runners", {}).items()}


def compile_figures(report: dict) -> dict:
    rounds = report.get("rounds", [])
    worst = max((r["compile_s"] for r in rounds), default=None)
    return {"rounds": rounds, "worst_compile_s": worst, "target_s": COMPILE_TARGET_S,
            "within_target": None if worst is None else worst <= COMPILE_TARGET_S}


def train_figures(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.is_file() else ""
    losses = re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", text)
    return {"steps": int(losses[-1][0]) if losses else 0, "first_loss": float(losses[0][1]) if losses else None,
            "last_loss": float(losses[-1][1]) if losses else None}


def figures(name: str, out: Path, leg: dict) -> dict:
    """What leg `name` measured (possibly partial), from the files it wrote into `out`."""
    if name == "gpu-tests":
        return junit_counts(out / "gpu-tests.xml")
    if name == "train-head":
        return train_figures(Path(leg["log"]))
    report = _json(out / f"{name}.json")
    if report is None:
        return {}
    if name.startswith("bench-"):
        return bench_figures(report)
    if name.startswith("lossless-"):
        return lossless_figures(report)
    if name == "compile-time":
        return compile_figures(report)
    return {key: value for key, value in report.items() if not isinstance(value, (list, dict)) or len(value) <= 16}


def _brief(name: str, found: dict) -> str:
    """One line of a leg's main numbers."""
    if not found:
        return ""
    if name == "gpu-tests":
        return ("; ".join([found["error"]]) if "error" in found else
                f"{found['passed']} passed, {found['failed']} failed, {found['errors']} errors, "
                f"{found['skipped']} skipped")
    if name.startswith("bench-"):
        text = f"AR {found['ar_step_ms']:.2f} ms, floor {found['floor_step_ms']:.2f} ms" if found["ar_step_ms"] else ""
        rounds = ", ".join(f"{b}: {x:.2f}" for b, x in found["round_in_ar_steps"].items())
        syncs = found.get("host_syncs_per_round") or {}
        return text + (f"; round/AR step {rounds}" if rounds else "") + (
            "; syncs/round " + ", ".join(f"{k} {v:.1f}" for k, v in syncs.items()) if syncs else "")
    if name.startswith("lossless-"):
        return "; ".join(f"{runner} {r['summary'] or r['status']}" + (
            f", batched {r['batched_equal']}/{r['batched_total']}" if r.get("batched_total") else "")
            for runner, r in found.items())
    if name == "compile-time":
        return ", ".join(f"budget {r['budget']}: {r['compile_s']:.0f} s" for r in found["rounds"]) + (
            f" (target {found['target_s']} s)" if found["rounds"] else "")
    if name == "train-head":
        return f"{found['steps']} steps, loss {found['first_loss']} -> {found['last_loss']}"
    return json.dumps(found)[:100]


def print_table(legs: list[dict]) -> None:
    for leg in legs:
        try:
            numbers = _brief(leg["name"], leg.get("figures", {}))
        except (KeyError, TypeError, ValueError) as error:  # a partial report: say so, keep printing
            numbers = f"(figures incomplete: {error!r})"
        print(f"  {leg['name']:<23} {leg['status']:<13} {leg['seconds']:>4} s  {numbers}")
