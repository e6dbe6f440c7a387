"""pyproject.toml builds a wheel whose one top-level import name is `nanojet` (kernels and the embedded model
inside it) and whose commands (nanojet-run, nanojet-bench, nanojet-train) are installed, and README's Python
snippet and the commands run from that install in another directory (not only from the repository root)."""
import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

from nanojet.llm import DEFAULT_MODEL

setuptools = pytest.importorskip("setuptools")
pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="embedded model not built")


# The installed commands, each with a flag its --help names.
COMMANDS = {"nanojet-run": "--max-new-tokens", "nanojet-bench": "--budgets", "nanojet-train": "--resume"}


def readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    snippet = next(block for block in blocks if "from nanojet import" in block)
    assert "weights/" not in snippet  # a relative path would tie it to the repository root
    return snippet


def test_wheel_installs_and_the_readme_snippet_runs_elsewhere(tmp_path):
    if int(setuptools.__version__.split(".")[0]) < 64:
        pytest.skip("building needs setuptools >= 64")
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "train_state", "*.pt", "*.png")
    shutil.copytree(ROOT / "nanojet", source / "nanojet", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("nanojet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"nanojet"}  # no second import name to shadow a package of the user's (`kernels`)
    for expected in ("nanojet/llm.py", "nanojet/kernels/triton_attention.py", "nanojet/weights/build_tiny.py",
                     "nanojet/weights/qwen3-stdlib-tiny/model.safetensors",
                     "nanojet/weights/qwen3-stdlib-tiny/tokenizer.json",
                     "nanojet/weights/qwen3-stdlib-tiny/generation_config.json",
                     "nanojet/weights/qwen3-stdlib-tiny/head-causal/model.safetensors"):
        assert expected in names, expected
    entry_points = configparser.ConfigParser()
    entry_points.read_string(next(zipfile.Path(wheel, name).read_text() for name in names
                                  if name.endswith(".dist-info/entry_points.txt")))
    assert set(entry_points["console_scripts"]) == set(COMMANDS)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    for command, help_word in COMMANDS.items():
        result = subprocess.run([str(site / "bin" / command), "--help"], cwd=elsewhere, capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0 and help_word in result.stdout, (command, result.stderr)
    result = subprocess.run([str(site / "bin" / "nanojet-run"), "--prompt", "def f(x):", "--max-new-tokens", "3",
                             "--ignore-eos", "--json"], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["new_tokens"] == 3, result.stderr
    code = readme_snippet() + "\nimport nanojet\nprint(nanojet.__file__)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(site / "nanojet" / "__init__.py")
    if importlib.util.find_spec("transformers") is not None:  # installed, transformers still loads its models
        result = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS,
                                 str(site / "nanojet" / "weights" / "qwen3-stdlib-tiny")], cwd=elsewhere,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr


LOAD_WITH_TRANSFORMERS = """
import sys
import nanojet, nanojet.kernels, nanojet.llm  # the runtime and its kernels loaded first, as in a user's process
from transformers import AutoModelForCausalLM  # imports Hugging Face's `kernels` when it is installed
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(model).__name__)
"""


def test_transformers_loads_models_beside_nanojet(tmp_path):
    """transformers imports Hugging Face's `kernels` while loading any model; a top-level `kernels` of ours on
    sys.path (as the checkout is for tests, bench.py --peer hf and scripts) would shadow it."""
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(DEFAULT_MODEL)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "Qwen3ForCausalLM"
