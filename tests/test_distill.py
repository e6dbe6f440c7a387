"""nanojet/train/distill.py: the head's training loss runs on any device (no host tensors, no host reads) and with the
Triton backend selected (the CUDA configuration: Triton teacher, autograd-capable head)."""
import os
import random

import pytest
import torch
from conftest import make_engine, random_head
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nanojet import kernels
from nanojet.bench.synthetic import synthetic_models
from nanojet.model.config import ModelConfig
from nanojet.train.distill import head_loss, training_mask


class HostTensorRecorder(TorchDispatchMode):
    """Records every op that reads or produces a CPU tensor (on a `meta` model, each one is a stray)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_flatten((args, kwargs, out))[0]):
            self.ops.append(str(func))
        return out


def test_training_step_on_meta_touches_no_host_tensor():
    """Target and head on `meta`: a tensor built on the CPU shows up as a CPU operand, and a host read (.item(),
    .tolist(), a Python int of a tensor) raises, since meta tensors hold no data."""
    target, head = synthetic_models("qwen3-0.6b", torch.float32, torch.device("meta"), layers=2, vocab=1000)
    target.requires_grad_(False)
    tokens = torch.empty(2, 64, dtype=torch.long, device="meta")
    with HostTensorRecorder() as recorder:
        for loss_kind, causal in (("kl", True), ("ce", False)):
            head.config.causal = causal
            loss, info = head_loss(target, head, tokens, 4, loss_kind, 1.0, 4.0, random.Random(0))
            loss.backward()
    assert recorder.ops == []
    assert loss.device.type == "meta" and info["per_depth_accuracy"].shape == (15,)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in head.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_training_mask_is_block_sparse():
    """Row of anchor a in sequence s: s's context positions < a, and its own block (causally or fully)."""
    anchors = torch.tensor([[3, 9], [1, 5]])
    for causal in (True, False):
        mask = training_mask(anchors, 12, 4, causal)
        expected = torch.zeros(16, 24 + 16, dtype=torch.bool)
        for block, (sequence, anchor) in enumerate((s, int(a)) for s in range(2) for a in anchors[s]):
            rows = slice(4 * block, 4 * block + 4)
            expected[rows, 12 * sequence:12 * sequence + anchor] = True
            inner = torch.ones(4, 4, dtype=torch.bool)
            expected[rows, 24 + 4 * block:24 + 4 * block + 4] = inner.tril() if causal else inner
        assert torch.equal(mask, expected)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (CI sets it)")
def test_training_with_the_triton_backend(hf_model_dir, monkeypatch):
    """With Triton selected (as on CUDA), the frozen teacher runs the Triton kernels and the head falls back to
    the autograd-capable reference: the loss and every gradient equal the torch backend's."""
    from nanojet.kernels import triton_ops
    calls = []
    for name in ("rms_norm", "qk_norm_rope", "silu_and_mul"):
        original = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    directory, _ = hf_model_dir
    target = make_engine(directory).target.requires_grad_(False)
    head = random_head(ModelConfig.from_dir(directory), seed=4)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("triton", "torch"):
        kernels.set_backend(backend)
        try:
            head.zero_grad(set_to_none=True)
            loss, _ = head_loss(target, head, tokens, 3, "kl", 1.0, None, random.Random(1))
            loss.backward()
        finally:
            kernels.set_backend(None)
        results.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    assert {"rms_norm", "qk_norm_rope", "silu_and_mul"} <= set(calls)  # the teacher ran on Triton
    (triton_loss, triton_grads), (torch_loss, torch_grads) = results
    assert torch.isfinite(triton_loss)
    torch.testing.assert_close(triton_loss, torch_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(triton_grads, torch_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_train_head_on_a_synthetic_target_evaluates_with_that_target(tmp_path, monkeypatch, capsys):
    """--synthetic trains against a random target of a published shape (here a tiny one added for the test) and
    the tau eval at a checkpoint reuses it: no second model is loaded."""
    import json

    from nanojet.bench import synthetic
    from nanojet.tools import train_head
    monkeypatch.setitem(synthetic.SHAPES, "tiny-test", dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=8300, tie_word_embeddings=True))

    def no_second_model(*args, **kwargs):
        raise AssertionError("a second model was loaded")
    monkeypatch.setattr(train_head, "load_target", no_second_model)
    from nanojet.train import data as train_data
    monkeypatch.setattr(train_data, "LLM", no_second_model)
    data = tmp_path / "data.jsonl"
    rng = random.Random(0)
    data.write_text("\n".join(json.dumps({"text": "".join(rng.choice("def (x):\n  return") for _ in range(400))})
                              for _ in range(3)))
    args = train_head.parse_args(["--synthetic", "tiny-test", "--out", str(tmp_path / "head"), "--data", str(data),
                                  "--steps", "2", "--checkpoint-every", "2", "--batch", "2", "--seq", "64",
                                  "--anchors", "4", "--eval-prompts", "1", "--device", "cpu"])
    train_head.train(args)
    evals = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"step"')]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["tau_chain"] >= 1.0 and evals[0]["tau_budget64"] >= 1.0
