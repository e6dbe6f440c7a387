"""What a newcomer meets in run.py and bench.py: the model's generation_config.json defaults (named on stderr),
token healing only when asked for, mode changes said out loud, Ctrl-C as one line and exit 130, a closed pipe
ending the program quietly."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, random_head

from nanojet.llm import DEFAULT_MODEL
from nanojet.model.config import ModelConfig
from nanojet.tools import run

EMBEDDED = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="embedded model not built")


def run_json(capsys, *argv) -> tuple[dict, str]:
    assert run.main([*argv, "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def model_with_generation_config(hf_model_dir, tmp_path, generation: dict):
    directory = shutil.copytree(hf_model_dir[0], tmp_path / "model")
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return str(directory)


def test_generation_config_defaults_fill_the_flags_left_unset(hf_model_dir, tmp_path, capsys):
    model = model_with_generation_config(hf_model_dir, tmp_path, {"do_sample": True, "temperature": 0.8,
                                                                  "top_k": 5, "max_new_tokens": 7})
    record, err = run_json(capsys, "--model", model, "--prompt", "abc", "--raw", "--ignore-eos")
    assert record["sampling"] == {"temperature": 0.8, "top_p": 1.0, "top_k": 5, "max_new_tokens": 7}
    assert record["new_tokens"] == 7
    assert err.strip() == f"note: from {model}/generation_config.json: temperature=0.8, top_k=5, max_new_tokens=7"
    record, err = run_json(capsys, "--model", model, "--prompt", "abc", "--raw", "--ignore-eos",
                           "--temperature", "0", "--max-new-tokens", "3")
    assert record["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 5, "max_new_tokens": 3}
    assert err.strip().endswith("generation_config.json: top_k=5")


@pytest.mark.parametrize("generation, flags, enabled", [
    ({}, [], False),                                  # off by default, as in transformers
    ({}, ["--token-healing"], True),
    ({"token_healing": True}, [], True),              # the model asks for it
    ({"token_healing": True}, ["--no-token-healing"], False),
])
def test_token_healing_follows_the_model_and_the_flags(hf_model_dir, tmp_path, capsys, generation, flags, enabled):
    model = model_with_generation_config(hf_model_dir, tmp_path, generation)
    record, _ = run_json(capsys, "--model", model, "--prompt", "x = f(a))", "--raw", "--max-new-tokens", "4",
                         "--ignore-eos", *flags)
    # The byte tokenizer has one token per byte: healing takes the last one back (and it always can here).
    assert record["token_healing"] == {"enabled": enabled, "applied": enabled}
    assert record["prompt_tokens"] == len("x = f(a))") - enabled


def test_plain_decoding_without_a_head_is_said(hf_model_dir, tmp_path, capsys):
    record, err = run_json(capsys, "--model", str(hf_model_dir[0]), "--prompt", "abc", "--max-new-tokens", "2",
                           "--budget", "16", "--width", "2")
    assert record["mode"] == "ar"
    assert err.count("\n") == 1 and "note: decoding plainly" in err and "ships no draft head" in err
    assert "--budget --width have no effect" in err
    record, err = run_json(capsys, "--model", str(hf_model_dir[0]), "--prompt", "abc", "--max-new-tokens", "2",
                           "--head", "none", "--depth", "3")
    assert record["mode"] == "ar" and "(--head none), so --depth has no effect" in err


def test_ar_with_a_head_is_refused(hf_model_dir, tmp_path, capsys):
    random_head(ModelConfig.from_dir(hf_model_dir[0])).save(tmp_path / "head")
    assert run.main(["--model", str(hf_model_dir[0]), "--prompt", "abc", "--ar", "--head", str(tmp_path / "head")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ar decodes plainly and would ignore --head" in err


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")])
def test_non_finite_sampling_flags_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(["--prompt", "abc", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a finite number" in err


def start(script: str, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)


def wait_for(stream, text: bytes) -> bytes:
    """Read until `text` has appeared (progress lines end in \\r, so no readline)."""
    seen = b""
    while text not in seen:
        byte = stream.read(1)
        assert byte, f"the program ended before printing {text!r}: {seen[-300:]!r}"
        seen += byte
    return seen


@EMBEDDED
def test_run_ctrl_c_is_one_line_and_exit_130():
    process = start("run.py", "--prompt", "def f(x):", "--max-new-tokens", "2000", "--ignore-eos", "--ar")
    process.stdout.read(1)  # generating
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.decode() == "interrupted\n"


@EMBEDDED
def test_run_into_a_closed_pipe_ends_quietly():
    process = start("run.py", "--prompt", "def f(x):", "--max-new-tokens", "2000", "--ignore-eos", "--ar")
    process.stdout.read(1)
    process.stdout.close()  # what `| head -c 1` does
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and err == b""


def test_bench_ctrl_c_is_one_line_and_exit_130(hf_model_dir, tmp_path):
    process = start("bench.py", *bench_argv(hf_model_dir, tmp_path), "--budgets", "8", "--max-new-tokens", "500",
                    "--ignore-eos")
    wait_for(process.stderr, b"bench: prompt 1/")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.decode().splitlines()[-1] == "interrupted"
    assert b"Traceback" not in err


def bench_argv(hf_model_dir, tmp_path) -> list[str]:
    random_head(ModelConfig.from_dir(hf_model_dir[0])).save(tmp_path / "head")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "abc"}) + "\n")
    return ["--model", str(hf_model_dir[0]), "--head", str(tmp_path / "head"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--device", "cpu"]


@pytest.mark.parametrize("script", ["run.py", "bench.py"])
def test_a_full_disk_is_one_line_and_exit_2(hf_model_dir, tmp_path, script):
    """`run.py ... > /dev/full`: the write fails with ENOSPC, which is one line on stderr and exit status 2, not a
    traceback (nor the interpreter's 'Exception ignored' when the failing write is its last flush)."""
    argv = (["--model", str(hf_model_dir[0]), "--prompt", "abc", "--raw", "--max-new-tokens", "3"] if script == "run.py"
            else bench_argv(hf_model_dir, tmp_path) + ["--budgets", "4", "--samples", "1", "--max-new-tokens", "3"])
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(ROOT / script), *argv], stdout=full, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: cannot write the output: No space left on device"
