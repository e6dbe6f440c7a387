"""train_head.py's resume state: tensors in safetensors, everything else in JSON, never pickle.

`torch.load` of a pickled checkpoint can run any code the file carries, so a shared checkpoint would be a
program. Here the head's fp32 master weights, the optimizer's moment tensors and the torch RNG state go to
`<head>/train_state/tensors.safetensors`; the step, the optimizer's hyperparameters, the Python RNG state and the
arguments go to `<head>/train_state/state.json`. A folder of its own, because loaders (nanojet's, vLLM's) read
every *.safetensors beside a head's config.json.

Every file of a checkpoint (these two and the published head's, `save_head`) is written under a temporary name
and renamed into place, and the temporary files are removed on every way out, so a save cut short (an error, a
signal) leaves the previous checkpoint whole and no half-written file behind."""
import json
import os
import random
import shutil
from pathlib import Path

import torch

STATE_DIR = "train_state"
TENSORS_NAME = f"{STATE_DIR}/tensors.safetensors"
META_NAME = f"{STATE_DIR}/state.json"
FORMAT = "nanojet-train-state/1"
LEGACY_NAME = "train_state.pt"  # the pickled format of earlier versions: never loaded


def state_exists(out: Path) -> bool:
    return (out / META_NAME).is_file() or (out / TENSORS_NAME).is_file()


def save_train_state(out: Path, step: int, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     rng: random.Random, args: dict) -> None:
    from safetensors.torch import save_file
    tensors = {f"head.{name}": value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    extra_state = {}  # non-tensor entries of the per-parameter optimizer state (none for AdamW)
    for index, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                extra_state.setdefault(str(index), {})[name] = value
    tensors["torch_rng"] = torch.get_rng_state()
    version, internal, gauss = rng.getstate()
    meta = {"format": FORMAT, "step": step, "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_extra_state": extra_state, "python_rng": [version, list(internal), gauss],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}}
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    staged_tensors, staged_meta = out / f"{TENSORS_NAME}.tmp", out / f"{META_NAME}.tmp"
    try:
        save_file(tensors, str(staged_tensors), metadata={"format": FORMAT, "step": str(step)})
        staged_meta.write_text(json.dumps(meta) + "\n")
        os.replace(staged_tensors, out / TENSORS_NAME)
        os.replace(staged_meta, out / META_NAME)
    finally:
        staged_tensors.unlink(missing_ok=True)
        staged_meta.unlink(missing_ok=True)


def save_head(head: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    """Publish the head in `out` (config.json, model.safetensors, ...): written whole into `out/checkpoint.tmp/`,
    then each file renamed into place, so a loader never reads a half-written head."""
    staging = out / "checkpoint.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed (SIGKILL) while saving
    try:
        head.save(staging, dtype)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_train_state(out: Path, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     rng: random.Random) -> int:
    """Restore the head's weights, the optimizer and both RNGs from `out`; returns the step. A missing, corrupt
    or mismatched state is a ValueError / FileNotFoundError naming the file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    tensor_path, meta_path = out / TENSORS_NAME, out / META_NAME
    if not (tensor_path.is_file() and meta_path.is_file()):
        legacy = (f"; {out / LEGACY_NAME} is the old pickled format, which is not loaded (unpickling can run "
                  f"code)") if (out / LEGACY_NAME).is_file() else ""
        raise FileNotFoundError(f"--resume: {tensor_path} and {meta_path} are needed{legacy}; train without "
                                f"--resume to start over")
    unreadable = "is not a readable resume state; delete it and train without --resume"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        tensors = load_file(str(tensor_path))
        with safe_open(str(tensor_path), "pt") as handle:  # both files are saved together, at one step
            saved_step = (handle.metadata() or {}).get("step")
        step = meta["step"]
        if saved_step != str(step):
            raise ValueError(f"the two files are from different steps ({saved_step} and {step})")
        head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, entries in meta["optimizer_extra_state"].items():
            state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
        version, internal, gauss = meta["python_rng"]
        rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["torch_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{out / STATE_DIR} {unreadable} ({reason})") from None
    return step
