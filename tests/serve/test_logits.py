"""bf16 logits with their leading tokens recomputed in fp32 (`serve.runtime.logits`), no model."""

from __future__ import annotations

import torch

from serve.runtime.logits import refine_top


def _near_ties(rows: int = 64, vocab: int = 512, width: int = 64, seed: int = 0):
    """bf16 hidden states and a head whose best two tokens differ by less than bf16 resolves."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab, width, generator=gen) * 0.3).to(torch.bfloat16)
    # Token 1 is token 0 with one small change, so both logits land in the same bf16 step.
    weight[1] = weight[0]
    weight[1, 0] = weight[0, 0] + torch.tensor(2.0 ** -8, dtype=torch.bfloat16)
    hidden[:, 0] = hidden[:, 0].abs() * torch.randn(rows, generator=gen).sign().to(hidden.dtype)
    # Both far above every other token, so the tie is the question.
    hidden[:, 1] = 20.0
    weight[:2, 1] = 1.0
    return hidden, weight


def test_the_argmax_is_that_of_fp32_accumulation_even_where_bf16_rounding_ties():
    hidden, weight = _near_ties()
    exact = hidden.float() @ weight.float().T  # bf16 products are exact in fp32
    rounded = torch.nn.functional.linear(hidden, weight)
    assert rounded.dtype == torch.bfloat16
    plain = rounded.float().argmax(-1)
    assert bool((plain != exact.argmax(-1)).any()), "the case must contain rounding flips"
    refined = refine_top(rounded, hidden, weight)
    assert refined.dtype == torch.float32
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))
    top = exact.argmax(-1, keepdim=True)
    assert torch.allclose(refined.gather(1, top), exact.gather(1, top), atol=1e-4)


def test_only_tokens_that_can_hold_the_maximum_are_recomputed():
    hidden, weight = _near_ties()
    rounded = torch.nn.functional.linear(hidden, weight).float()
    refined = refine_top(rounded, hidden, weight)
    changed = (refined != rounded).sum(-1)
    assert int(changed.max()) <= 2  # the two near-tied tokens; the rest keep their values


def test_fp32_logits_pass_through_unchanged():
    hidden, weight = (t.float() for t in _near_ties())
    logits = torch.nn.functional.linear(hidden, weight)
    assert torch.equal(refine_top(logits, hidden, weight), logits)


def test_a_bias_is_added_to_the_recomputed_logits():
    hidden, weight = _near_ties(rows=8)
    bias = torch.linspace(-1, 1, weight.shape[0]).to(torch.bfloat16)
    exact = hidden.float() @ weight.float().T + bias.float()
    refined = refine_top(torch.nn.functional.linear(hidden, weight, bias), hidden, weight, bias)
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))
