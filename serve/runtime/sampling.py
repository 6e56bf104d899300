"""Choosing the next token of each row of a batch: constraints, bias, penalties, then sampling.

One step, for the ``[rows, width]`` fp32 logits of the batch, in this order (each stage is one
batched tensor operation over the rows that use it; the Python loops run over rows, never over
the vocabulary):

1. **constraint** (``params.constraint``, `serve.grammar.Constraint`): tokens the row's grammar
   matcher does not allow next get ``-inf``. Columns past the tokenizer's vocabulary (padded
   embeddings) are never allowed on a constrained row. Once the grammar is complete only the
   stop tokens remain, so the row ends; ``max_tokens`` still ends it earlier.
2. **logit_bias**: ``logit[t] += bias[t]``.
3. **repetition_penalty** ``r`` (CTRL / transformers / vLLM): for every token seen in the prompt
   or the output so far, ``logit / r`` if the logit is positive, else ``logit * r``.
4. **frequency_penalty** ``f`` and **presence_penalty** ``p`` (OpenAI / vLLM): over the tokens
   generated so far, ``logit[t] -= f * count[t] + p * (count[t] > 0)``.
5. ``temperature == 0``: ``argmax`` of the processed logits (the first index on ties, as
   transformers' greedy search). Otherwise softmax of ``logits / temperature``, keeping the
   tokens that pass all of **top_k** (the ``k`` most likely), **top_p** (the smallest set of most
   likely tokens whose probability reaches ``top_p``) and **min_p** (probability at least
   ``min_p`` times the most likely token's), all judged on that same distribution; then one
   draw with the row's own `torch.Generator`, seeded by ``params.seed`` (random when None), so a
   seeded row gives the same tokens whatever else is in its batch.

logprobs: log-softmax of the raw logits (before every stage above), for the chosen token and
the ``top_logprobs`` most likely ones, as OpenAI and vLLM report them by default.

Where the job ends: this module turns one step's logits into token choices and keeps each row's
state (`RowState`); stopping rules (stop tokens, max_tokens) belong to the scheduler, grammar
compilation to `serve.grammar` (in the server front, which has the tokenizer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hub.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from serve.engine import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
PENALTY_RANGE = (-2.0, 2.0)
MAX_REPETITION_PENALTY = 10.0


@dataclass
class Choice:
    """One row's sampled token."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Refuse sampling parameters no engine can honour.

    Raises:
        InvalidInput: Naming every bad field and its value (``param`` is the first).
    """
    problems: list[tuple[str, str]] = []

    def bad(name: str, text: str) -> None:
        problems.append((name, text))

    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        bad("max_tokens", f"max_tokens must be >= 1, got {params.max_tokens!r}")
    if not 0 <= float(params.temperature) <= 100:
        bad("temperature", f"temperature must be in [0, 100], got {params.temperature!r}")
    if not 0 < float(params.top_p) <= 1:
        bad("top_p", f"top_p must be in (0, 1], got {params.top_p!r}")
    if not 0 <= int(params.top_logprobs) <= MAX_TOP_LOGPROBS:
        bad("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
            f"{params.top_logprobs!r}")
    if not isinstance(params.top_k, int) or params.top_k < -1:
        bad("top_k", f"top_k must be -1 or 0 (off) or a positive integer, got {params.top_k!r}")
    if not 0 <= float(params.min_p) <= 1:
        bad("min_p", f"min_p must be in [0, 1], got {params.min_p!r}")
    low, high = PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        value = float(getattr(params, name))
        if not low <= value <= high:
            bad(name, f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    if not 0 < float(params.repetition_penalty) <= MAX_REPETITION_PENALTY:
        bad("repetition_penalty", f"repetition_penalty must be in (0, "
            f"{MAX_REPETITION_PENALTY:g}], got {params.repetition_penalty!r}")
    bias = params.logit_bias
    if len(bias) > MAX_LOGIT_BIAS:
        bad("logit_bias", f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    outside = [t for t in bias if not isinstance(t, int) or not 0 <= t < vocab_size]
    if outside:
        bad("logit_bias", f"logit_bias keys {outside[:5]} are outside the vocabulary "
            f"(0..{vocab_size - 1})")
    if any(not -100 <= float(v) <= 100 for v in bias.values()):
        bad("logit_bias", "logit_bias values must be in [-100, 100]")
    bad_stop = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab_size]
    if bad_stop:
        bad("stop_token_ids", f"stop_token_ids {bad_stop[:5]} are outside the vocabulary "
            f"(0..{vocab_size - 1})")
    if problems:
        raise InvalidInput("; ".join(text for _, text in problems),
                           fix="Correct the sampling parameters.", param=problems[0][0])


@dataclass
class RowState:
    """Per-sequence sampling state, created once per request by `new_row`.

    The scheduler keeps one per running sequence and passes the batch's states to `sample`,
    which records each chosen token here.

    Attributes:
        params: The request's sampling parameters.
        generator: The request's own generator (None when greedy).
        generated: Token ids chosen so far.
        matcher: The constraint's matcher (`serve.grammar.Matcher`), or None.
        prompt_ids: The prompt (kept only for ``repetition_penalty``).
        counts: Output-token counts ``[width]`` (only with frequency/presence penalties;
            made at the first step, when the logits' width is known).
        seen: Tokens of prompt and output ``[width]`` (only with ``repetition_penalty``).
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    matcher: Any = None
    prompt_ids: list[int] | None = None
    counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None

    @property
    def counts_output(self) -> bool:
        """Whether frequency or presence penalties apply."""
        return bool(self.params.frequency_penalty or self.params.presence_penalty)

    @property
    def repeats(self) -> bool:
        """Whether the repetition penalty applies."""
        return float(self.params.repetition_penalty) != 1.0


def new_row(params: SamplingParams, prompt_ids: list[int]) -> RowState:
    """The sampling state of one new sequence (its prompt is known, nothing generated yet)."""
    row = RowState(params, make_generator(params))
    if row.repeats:
        row.prompt_ids = list(prompt_ids)
    if params.constraint is not None:
        row.matcher = params.constraint.new_matcher()
    return row


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded by ``params.seed`` (random seed when None); None when greedy."""
    import torch

    if float(params.temperature) == 0:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
    return torch.Generator(device="cpu").manual_seed(int(seed) % 2**63)


def sample(logits: torch.Tensor, rows: list[RowState]) -> list[Choice]:
    """Pick one token per row of ``logits`` ``[rows, width]`` (fp32) and record it in its state.

    Args:
        logits: Raw logits of the step (not modified).
        rows: Each row's state from `new_row`.
    """
    import torch

    logits = logits.float().cpu()
    params = [r.params for r in rows]
    want_logprobs = any(p.logprobs or p.top_logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    scores = _processed(logits, rows)

    tokens = scores.argmax(dim=-1)
    drawn = [i for i, r in enumerate(rows) if r.generator is not None]
    if drawn:
        picked = _draw(scores[drawn], [rows[i] for i in drawn])
        tokens[drawn] = picked
    token_list = tokens.tolist()

    choices = []
    for i, (row, token) in enumerate(zip(rows, token_list, strict=True)):
        p = row.params
        choice = Choice(int(token))
        if logprobs is not None and (p.logprobs or p.top_logprobs):
            row_lp = logprobs[i]
            choice.logprob = float(row_lp[token])
            if p.top_logprobs:
                values, indices = row_lp.topk(int(p.top_logprobs))
                choice.top_logprobs = {int(t): float(v) for t, v in
                                       zip(indices.tolist(), values.tolist(), strict=True)}
        choices.append(choice)
        _record(row, int(token))
    return choices


def _record(row: RowState, token: int) -> None:
    row.generated.append(token)
    if row.counts is not None:
        row.counts[token] += 1
    if row.seen is not None:
        row.seen[token] = True
    if row.matcher is not None and not row.matcher.done():
        row.matcher.accept(token)


def _processed(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Stages 1-4 of the module docstring; returns ``logits`` itself when no row uses them."""
    import torch

    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    repeating = [i for i, r in enumerate(rows) if r.repeats]
    counting = [i for i, r in enumerate(rows) if r.counts_output]
    if not (constrained or biased or repeating or counting):
        return logits
    scores = logits.clone()
    width = scores.shape[1]

    if constrained:
        allowed = _allowed(rows, constrained, width)
        sub = scores[constrained].masked_fill_(~allowed, float("-inf"))
        scores[constrained] = sub

    if biased:
        row_idx, col_idx, values = [], [], []
        for i in biased:
            for token, bias in rows[i].params.logit_bias.items():
                if 0 <= int(token) < width:
                    row_idx.append(i)
                    col_idx.append(int(token))
                    values.append(float(bias))
        scores.index_put_((torch.tensor(row_idx, dtype=torch.long),
                           torch.tensor(col_idx, dtype=torch.long)),
                          torch.tensor(values, dtype=scores.dtype), accumulate=True)

    if repeating:
        for i in repeating:
            row = rows[i]
            if row.seen is None:
                row.seen = torch.zeros(width, dtype=torch.bool)
                ids = [t for t in (row.prompt_ids or []) + row.generated if 0 <= t < width]
                if ids:
                    row.seen[torch.tensor(ids, dtype=torch.long)] = True
        seen = torch.stack([rows[i].seen for i in repeating])
        penalty = torch.tensor([float(rows[i].params.repetition_penalty) for i in repeating],
                               dtype=scores.dtype).unsqueeze(1)
        sub = scores[repeating]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        scores[repeating] = sub

    if counting:
        for i in counting:
            row = rows[i]
            if row.counts is None:
                row.counts = torch.zeros(width, dtype=torch.float32)
                ids = [t for t in row.generated if 0 <= t < width]
                if ids:
                    row.counts.index_add_(0, torch.tensor(ids, dtype=torch.long),
                                          torch.ones(len(ids)))
        counts = torch.stack([rows[i].counts for i in counting])
        freq = torch.tensor([float(rows[i].params.frequency_penalty) for i in counting],
                            dtype=scores.dtype).unsqueeze(1)
        pres = torch.tensor([float(rows[i].params.presence_penalty) for i in counting],
                            dtype=scores.dtype).unsqueeze(1)
        scores[counting] = scores[counting] - freq * counts - pres * (counts > 0)
    return scores


def _allowed(rows: list[RowState], constrained: list[int], width: int) -> torch.Tensor:
    """``[len(constrained), width]`` bool: the tokens each constrained row may take next."""
    import torch

    words = max(rows[i].matcher.bitmask_words for i in constrained)
    bitmask = torch.zeros((len(constrained), words), dtype=torch.int32)
    limits = []
    for k, i in enumerate(constrained):
        matcher = rows[i].matcher
        if matcher.done():
            bitmask[k].fill_(0)
        else:
            matcher.fill(bitmask, k)
        limits.append(matcher.vocab_size)
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(constrained), -1)
    allowed = torch.zeros((len(constrained), width), dtype=torch.bool)
    span = min(width, bits.shape[1])
    allowed[:, :span] = bits[:, :span]
    for k, limit in enumerate(limits):
        if limit < width:
            allowed[k, limit:] = False
    stuck = ~allowed.any(dim=1)
    if bool(stuck.any()):  # a finished or broken grammar: only stopping is allowed
        for k in stuck.nonzero().flatten().tolist():
            stops = [t for t in rows[constrained[k]].params.stop_token_ids if 0 <= t < width]
            allowed[k, stops or [0]] = True
    return allowed


def _draw(scores: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Stage 5 for the sampled rows: filtered softmax, one draw per row with its generator."""
    import torch

    temperature = torch.tensor([float(r.params.temperature) for r in rows],
                               dtype=scores.dtype).unsqueeze(1)
    probs = torch.softmax(scores / temperature, dim=-1)
    width = probs.shape[1]
    top_k = [int(r.params.top_k) if int(r.params.top_k) > 0 else width for r in rows]
    top_p = [float(r.params.top_p) for r in rows]
    min_p = [float(r.params.min_p) for r in rows]
    filtered = any(k < width for k in top_k) or any(p < 1 for p in top_p) or any(min_p)
    if not filtered:
        return torch.tensor([int(torch.multinomial(probs[i], 1, generator=r.generator))
                             for i, r in enumerate(rows)], dtype=torch.long)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(width).unsqueeze(0)
    keep = rank < torch.tensor(top_k).unsqueeze(1)
    cumulative = sorted_probs.cumsum(dim=-1)
    keep &= (cumulative - sorted_probs) < torch.tensor(top_p, dtype=probs.dtype).unsqueeze(1)
    floor = torch.tensor(min_p, dtype=probs.dtype).unsqueeze(1) * sorted_probs[:, :1]
    keep &= sorted_probs >= floor
    keep[:, 0] = True
    kept = sorted_probs * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    picks = [int(torch.multinomial(kept[i], 1, generator=r.generator))
             for i, r in enumerate(rows)]
    return order[torch.arange(len(rows)), torch.tensor(picks, dtype=torch.long)]
