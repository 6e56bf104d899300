"""Choosing the next token of each row: greedy, or temperature + top-p with a per-request seed.

- ``temperature == 0``: ``argmax`` of the logits (the first index on ties, as transformers'
  greedy search).
- otherwise: softmax of ``logits / temperature``, restricted to the smallest set of most likely
  tokens whose probability reaches ``top_p``, sampled with the request's own `torch.Generator`
  (seeded by ``params.seed``; without a seed, a random one), so a seeded request gives the same
  tokens whatever else is in its batch.
- logprobs: log-softmax of the raw logits (before temperature and top-p), for the chosen token
  and the ``top_logprobs`` most likely ones, as OpenAI and vLLM report them.

Where the job ends: this module turns one step's logits into token choices; stopping rules
(stop tokens, max_tokens) belong to the scheduler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hub.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from serve.engine import SamplingParams

MAX_TOP_LOGPROBS = 20


@dataclass
class Choice:
    """One row's sampled token."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Refuse sampling parameters no engine can honour.

    Raises:
        InvalidInput: Naming the bad field and its value.
    """
    problems = []
    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        problems.append(("max_tokens", f"max_tokens must be >= 1, got {params.max_tokens!r}"))
    if not 0 <= float(params.temperature) <= 100:
        problems.append(("temperature", f"temperature must be in [0, 100], got "
                         f"{params.temperature!r}"))
    if not 0 < float(params.top_p) <= 1:
        problems.append(("top_p", f"top_p must be in (0, 1], got {params.top_p!r}"))
    if not 0 <= int(params.top_logprobs) <= MAX_TOP_LOGPROBS:
        problems.append(("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                         f"got {params.top_logprobs!r}"))
    bad_stop = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab_size]
    if bad_stop:
        problems.append(("stop_token_ids", f"stop_token_ids {bad_stop[:5]} are outside the "
                         f"vocabulary (0..{vocab_size - 1})"))
    if problems:
        raise InvalidInput("; ".join(text for _, text in problems),
                           fix="Correct the sampling parameters.", param=problems[0][0])


@dataclass
class RowState:
    """Per-sequence sampling state, created once per request by `new_row`.

    The scheduler keeps one per running sequence and passes the batch's states to `sample`,
    which records each chosen token here (what penalties and grammars need).

    Attributes:
        params: The request's sampling parameters.
        generator: The request's own generator (None when greedy).
        generated: Token ids chosen so far.
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)


def new_row(params: SamplingParams, prompt_ids: list[int]) -> RowState:
    """The sampling state of one new sequence (its prompt is known, nothing generated yet)."""
    del prompt_ids  # not needed by the current rules
    return RowState(params, make_generator(params))


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded by ``params.seed`` (random seed when None); None when greedy."""
    import torch

    if float(params.temperature) == 0:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
    return torch.Generator(device="cpu").manual_seed(int(seed) % 2**63)


def sample(logits: torch.Tensor, rows: list[RowState]) -> list[Choice]:
    """Pick one token per row of ``logits`` ``[rows, vocab]`` (fp32) and record it in its state.

    Args:
        logits: Raw logits of the step.
        rows: Each row's state from `new_row`.
    """
    import torch

    params = [r.params for r in rows]
    generators = [r.generator for r in rows]

    greedy = logits.argmax(dim=-1).tolist()
    want_logprobs = any(p.logprobs or p.top_logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    choices = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if float(p.temperature) == 0 or gen is None:
            token = int(greedy[row])
        else:
            token = _sample_row(logits[row], float(p.temperature), float(p.top_p), gen)
        choice = Choice(token)
        if logprobs is not None and (p.logprobs or p.top_logprobs):
            row_lp = logprobs[row]
            choice.logprob = float(row_lp[token])
            if p.top_logprobs:
                values, indices = row_lp.topk(int(p.top_logprobs))
                choice.top_logprobs = {int(i): float(v) for i, v in
                                       zip(indices.tolist(), values.tolist(), strict=True)}
        choices.append(choice)
        rows[row].generated.append(choice.token_id)
    return choices


def _sample_row(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator) -> int:
    import torch

    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        keep = (cumulative - sorted_probs) < top_p  # the token reaching top_p is kept
        keep[0] = True
        sorted_probs = sorted_probs * keep
        pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))
