"""The whole engine on the Triton kernels (the CUDA path) against the torch reference path, for plain and
speculative decoding (sampled, so every logit matters): on CPU tensors under the interpreter when
TRITON_INTERPRET=1 was set before triton was imported (CI), natively on CUDA otherwise.

This module never sets TRITON_INTERPRET itself: collected first on a GPU machine, that would switch every later
Triton kernel in the session to the interpreter (and make test_kernels.py skip its CUDA cases)."""
import os

import pytest
import torch
from conftest import make_engine, random_head

from nanojet import kernels
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER else "cuda"
pytestmark = [pytest.mark.skipif(not INTERPRETER and not torch.cuda.is_available(),
                                 reason="Triton needs CUDA or TRITON_INTERPRET=1")]
if not INTERPRETER:
    pytestmark.append(pytest.mark.gpu)


@pytest.fixture
def triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend(None)


def test_engine_on_triton_kernels_matches_reference(hf_model_dir, triton_backend):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), seed=7)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]  # crosses pages of 4
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=2, max_new_tokens=10, ignore_eos=True)
    spec = SpeculativeParams(budget=8, width=2)
    from nanojet.kernels import triton_ops
    assert kernels._impl(torch.zeros(1)) is triton_ops  # the forced backend really is the Triton one
    on_triton = make_engine(directory, page_size=4, head=head.to(DEVICE), device=DEVICE)
    triton_plain = on_triton.generate(prompt, params).token_ids
    triton_spec = on_triton.generate(prompt, params, spec).token_ids
    kernels.set_backend("torch")
    reference = make_engine(directory, page_size=4, head=head, device=DEVICE)
    assert triton_plain == reference.generate(prompt, params).token_ids
    assert triton_spec == triton_plain


def test_triton_round_accepts_full_paths_and_equals_the_dense_reference(hf_model_dir, triton_backend, monkeypatch):
    """With drafts that are right, the round on the Triton kernels commits whole paths (move_kv of real rows,
    head context from the accepted taps) and still emits exactly the dense reference's sampled tokens."""
    from conftest import dense_reference, oracle_drafter

    from nanojet.engine.round import StaticRound
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), seed=7).to(DEVICE)
    engine = make_engine(directory, page_size=4, head=head, device=DEVICE)  # CUDA tensors unless interpreted
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=2, max_new_tokens=17, ignore_eos=True)
    expected = dense_reference(engine.target, prompt, params, params.max_new_tokens)
    monkeypatch.setattr(StaticRound, "draft_candidates", oracle_drafter(prompt + expected, 320))
    out = engine.generate(prompt, params, SpeculativeParams(budget=8, width=2))
    assert out.token_ids == expected and out.stats.accept_hist[8] == 2  # 1 + 8 + 8 tokens
