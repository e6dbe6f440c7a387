"""The CPU reference's per-forward attention plan (nanojet/kernels/reference.py `plan_attention`): the shortcuts a decode
step and a lone sequence's round take give the same attention as the general path."""
import pytest
import torch
from test_kernels import attention_case, causal_mask, tree_mask, tree_parents

from nanojet.kernels import reference


@pytest.mark.parametrize("new_tokens", [1, 9])
def test_reference_attention_reads_consecutive_pages_in_place(new_tokens):
    """A lone sequence whose pages are consecutive (how the pool usually lays one out) is read as one run of rows,
    no gather: the same attention as the same keys on scattered pages."""
    generator = torch.Generator().manual_seed(new_tokens)
    mask = tree_mask(tree_parents("random", new_tokens, generator))
    scattered = attention_case([(37, mask)], 8, 2, 64, 16, torch.float32, "cpu", seed=new_tokens)
    count = -(-(37 + new_tokens) // 16)
    pages = scattered["block_tables"][0, :count].long()
    consecutive = dict(scattered, block_tables=torch.zeros_like(scattered["block_tables"]))
    consecutive["block_tables"][0, :count] = torch.arange(2, 2 + count)
    for name in ("k_cache", "v_cache"):
        consecutive[name] = torch.zeros_like(scattered[name])
        consecutive[name][2:2 + count] = scattered[name][pages]
    plans = [reference.plan_attention(case["block_tables"], case["prefix_lens"], case["query_starts"],
                                      case["visibility"], 16, 8) for case in (scattered, consecutive)]
    assert isinstance(plans[0].key_slots, torch.Tensor) and plans[1].key_slots == slice(32, 32 + 37 + new_tokens)
    torch.testing.assert_close(reference.paged_attention(**consecutive), reference.paged_attention(**scattered),
                               atol=1e-6, rtol=1e-6)


def test_a_query_that_sees_nothing_gets_zeros_on_the_batched_path():
    """Two sequences without a prefix, one new token each, the second seeing nothing (its bit cleared): the batched
    pass (torch's attention over a mask) returns zeros for it, as the per-sequence loop does, not NaN."""
    sees_nothing = torch.zeros(1, 1, dtype=torch.bool)
    case = attention_case([(0, causal_mask(1)), (0, sees_nothing)], 4, 2, 64, 8, torch.float32, "cpu")
    plan = reference.plan_attention(case["block_tables"], case["prefix_lens"], case["query_starts"],
                                    case["visibility"], 8, 4)
    assert plan is not None and plan.visible is not None  # the batched path, with a mask
    out = reference.paged_attention(**case)
    assert not out.isnan().any() and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0], case["v_cache"].flatten(0, 1)[case["block_tables"][0, 0].long() * 8]
                       .repeat_interleave(2, dim=0))  # the first token sees only itself: its own value row
