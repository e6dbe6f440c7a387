"""What the train_head tests share: a small data file, the flags of a short CPU run, and running main()."""
import json
import random
from pathlib import Path

from nanojet.tools import train_head


def write_data(path):
    rng = random.Random(0)
    rows = [{"text": "".join(rng.choice("abcdef (){}:\n") for _ in range(300))} for _ in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def train_argv(directory, out, data, **extra) -> list[str]:
    args = ["--model", str(directory), "--out", str(out), "--data", str(data), "--mask-token", "<|im_end|>",
            "--target-layer-ids", "0,1", "--steps", "4", "--batch", "2", "--seq", "64", "--anchors", "4",
            "--checkpoint-every", "2", "--eval-prompts", "0", "--device", "cpu"]
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        if flag in args and value is not True:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag] + ([] if value is True else [str(value)])
    return args


def train_args(directory, out, data, **extra):
    return train_head.parse_args(train_argv(directory, out, data, **extra))


def run_main(capsys, argv) -> tuple[int, str]:
    try:
        code = train_head.main(argv)
    except SystemExit as stop:  # argparse errors
        code = stop.code
    return code, capsys.readouterr().err


def base_argv(directory, out, data):
    return ["--model", str(directory), "--out", str(out), "--data", str(data), "--mask-token", "<|im_end|>",
            "--target-layer-ids", "0,1", "--steps", "2", "--batch", "1", "--seq", "64", "--anchors", "2",
            "--eval-prompts", "0", "--device", "cpu"]


def leftovers(out: Path) -> list[str]:
    """Temporary files of a save (a half-written checkpoint) left in a head folder."""
    return [str(path) for path in out.rglob("*") if "tmp" in path.name]
