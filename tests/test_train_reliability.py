"""train_head.py under stress: stop signals save a checkpoint, a second Ctrl-C never leaves a half-written file, a
closed stdout does not stop training, a diverging run keeps the finite checkpoint, and resume states are safe to
load and keep the saved head's shape."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from train_helpers import base_argv, leftovers, run_main, train_args, train_argv, write_data

from nanojet.model.config import ModelConfig
from nanojet.model.head import load_head
from nanojet.tools import train_head


def test_resume_state_is_safetensors_and_json_never_pickle(tmp_path, hf_model_dir, monkeypatch, capsys):
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    out = train_head.train(train_args(directory, tmp_path / "head", data, stop_at=2))
    state = out / "train_state"
    assert sorted(p.name for p in state.iterdir()) == ["state.json", "tensors.safetensors"]
    assert not list(out.glob("*.pt"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", no_unpickling)
    assert train_head.train(train_args(directory, out, data, resume=True)) == out
    assert json.loads((state / "state.json").read_text())["step"] == 4
    argv = base_argv(directory, out, data) + ["--resume", "--steps", "9"]
    (state / "tensors.safetensors").write_bytes(b"\x00garbage")
    code, err = run_main(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and "is not a readable resume state" in err
    shutil.rmtree(state)
    (out / "train_state.pt").write_bytes(b"pickle")
    code, err = run_main(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and "old pickled format, which is not loaded" in err


@pytest.mark.parametrize("signal_number, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                         (signal.SIGTERM, 143, "terminated")])
def test_a_stop_signal_saves_a_checkpoint_that_resume_continues(tmp_path, hf_model_dir, signal_number, status, word):
    """Ctrl-C, or SIGTERM (what `kill`, a job scheduler or a container stop sends), ends the run after the step in
    flight with a checkpoint, one line on stderr, and exit status 128 + the signal's number."""
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "head"
    argv = base_argv(directory, out, data)
    argv[argv.index("--steps") + 1] = "100000"
    process = subprocess.Popen([sys.executable, str(ROOT / "train_head.py"), *argv, "--checkpoint-every", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen = b""
    while b"step 2/" not in seen:
        byte = process.stdout.read(1)
        assert byte, seen
        seen += byte
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert process.returncode == status and len(lines) == 1 and b"Traceback" not in err, err
    step = json.loads((out / "train_state" / "state.json").read_text())["step"]
    assert step >= 2 and leftovers(out) == []
    assert lines[0] == f"{word}: checkpoint saved at step {step}; continue with --resume --out {out}"
    train_head.train(train_args(directory, out, data, resume=True, steps=step + 1, anchors=2, batch=1))
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == step + 1


TWO_CTRL_C = """
import signal, sys
import safetensors.torch
sys.path.insert(0, sys.argv.pop(1))
from nanojet.tools import train_head
where = sys.argv.pop(1)

def ctrl_c_twice():
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)

write = safetensors.torch.save_file
def save_file(tensors, path, metadata=None):
    write(tensors, path, metadata=metadata)
    if where == "saving" and path.endswith(".tmp"):  # the resume state is written, not yet renamed into place
        ctrl_c_twice()

loss, steps = train_head.head_loss, []
def head_loss(*args):
    steps.append(None)
    if where == "stepping" and len(steps) == 3:  # inside step 3; step 2 was saved
        ctrl_c_twice()
    return loss(*args)

safetensors.torch.save_file, train_head.head_loss = save_file, head_loss
sys.exit(train_head.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where, line, step", [
    ("saving", "interrupted: checkpoint saved at step 2; continue with --resume --out {out}", 2),
    ("stepping", "interrupted: stopped at once, without saving the steps since the last checkpoint", 2),
])
def test_a_second_ctrl_c(tmp_path, hf_model_dir, where, line, step):
    """Ctrl-C twice in a row. The second one while a checkpoint is being written lets the save complete (no
    temporary file survives, the state resumes) and then stops; during a step it stops at once, losing that step
    only. Either way: one line, exit status 130, no traceback."""
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "head"
    result = subprocess.run([sys.executable, "-c", TWO_CTRL_C, str(ROOT), where, *train_argv(directory, out, data)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 130 and result.stderr.strip().splitlines() == [line.format(out=out)], result.stderr
    assert leftovers(out) == []
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == step
    train_head.train(train_args(directory, out, data, resume=True, steps=step + 1))
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == step + 1


@pytest.mark.parametrize("reader", ["gone", "full disk"])
def test_training_outlives_its_stdout(tmp_path, hf_model_dir, reader):
    """`train_head.py ... | head -1` (here: the reader gone before the first line) or `> /dev/full`: every step
    still runs and the head is the one a run with a reader writes; only the progress lines are lost (a full disk
    says so on stderr, once)."""
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    if reader == "gone":
        read_end, stdout = os.pipe()
        os.close(read_end)
    else:
        stdout = os.open("/dev/full", os.O_WRONLY)
    try:
        result = subprocess.run([sys.executable, str(ROOT / "train_head.py"),
                                 *train_argv(directory, tmp_path / "piped", data)], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the tests' own torch
    finally:
        os.close(stdout)
    assert result.returncode == 0, result.stderr
    if reader == "gone":
        assert result.stderr == ""
    else:
        assert result.stderr.startswith("note: ") and result.stderr.count("\n") == 1, result.stderr
    assert json.loads((tmp_path / "piped" / "train_state" / "state.json").read_text())["step"] == 4
    expected = train_head.train(train_args(directory, tmp_path / "read", data))
    target = ModelConfig.from_dir(directory)
    piped = load_head(tmp_path / "piped", target, torch.float32, torch.device("cpu")).state_dict()
    for name, value in load_head(expected, target, torch.float32, torch.device("cpu")).state_dict().items():
        assert torch.equal(piped[name], value), name


def test_a_diverging_run_stops_and_keeps_the_finite_checkpoint(tmp_path, hf_model_dir, capsys):
    """--lr 1e30 turns the loss into NaN a step after the first update: the run stops with one line and exit
    status 1 (the run failed; the flags parsed fine) and the checkpoint saved before stays as it was."""
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "head"
    train_head.train(train_args(directory, out, data, stop_at=2))
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    code, err = run_main(capsys, train_argv(directory, out, data, resume=True, steps=8, lr="1e30"))
    assert code == 1 and err.count("\n") == 1, err
    assert "loss is not finite" in err and "checkpoint of step 2" in err and "--lr" in err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_resume_keeps_the_saved_head_shape_and_refuses_conflicting_flags(tmp_path, hf_model_dir, capsys):
    """A resumed run continues the saved head's shape (block size, layers, mask, taps) when the flags say
    nothing, and refuses a flag that contradicts it with one line (exit 2) instead of training another shape."""
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "head"
    train_head.train(train_args(directory, out, data, stop_at=2, block_size=4, head_layers=1))
    resumed = train_args(directory, out, data, resume=True)  # no shape flags: the saved head's
    assert (resumed.block_size, resumed.head_layers, resumed.bidirectional) == (4, 1, False)
    train_head.train(resumed)
    assert json.loads((out / "config.json").read_text())["block_size"] == 4
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 4
    common = ["--model", str(directory), "--out", str(out), "--data", str(data), "--resume", "--steps", "6",
              "--batch", "2", "--seq", "64", "--anchors", "4", "--eval-prompts", "0", "--device", "cpu"]
    for flags, word in ((["--block-size", "8"], "--block-size 8"), (["--head-layers", "2"], "--head-layers 2"),
                        (["--bidirectional"], "--bidirectional"), (["--mask-token", "<|endoftext|>"], "--mask-token"),
                        (["--target-layer-ids", "1"], "--target-layer-ids")):
        with pytest.raises(SystemExit) as stop:  # flag errors exit from the argument parser
            train_head.main(common + flags)
        assert stop.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and "conflicts with the resumed head" in lines[0], lines
