"""Log-likelihoods under a causal LM: which tokens are scored, and batched NLL sums over them.

Assistant tokens are found from the chat template itself, not from a second copy of its format:
for each assistant message ``i`` the conversation is rendered up to the generation prompt
(``messages[:i]``, ``add_generation_prompt=True``) and up to the end of the message
(``messages[:i + 1]``); the characters in between, cut after the end-of-turn token (the
special token the template prints right after the content: ``<|im_end|>``, ``<end_of_turn>``,
``<|end|>``...; else the tokenizer's ``eos_token``), are the assistant's. A token is scored when
it starts inside such a span, so the assistant's content and its end-of-turn token are scored,
and the role header, the system prompt, the user's turns and the newline after ``<|im_end|>``
are not. This needs a template that renders earlier turns as a prefix of later ones (ChatML,
Llama 3, Mistral, Gemma, Phi-3 do); others are refused.

Where the job ends: this module turns messages into ``(token ids, scored mask)`` and a model into
NLL sums. Perplexity and the other metrics are `train.eval.metrics`; loading models is
`train.eval.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hub.errors import InvalidInput, Unsupported

Messages = list[dict[str, str]]
_MIN_SHARED = 8  # shorter shared prefixes are not worth a separate forward pass


@dataclass
class Encoded:
    """A token sequence and which of its tokens are scored.

    Attributes:
        ids: Token ids of the rendered text.
        scored: ``scored[t]`` is True when token ``t`` counts in the NLL (never for ``t == 0``).
    """

    ids: list[int]
    scored: list[bool]

    @property
    def scored_count(self) -> int:
        """Number of scored tokens."""
        return sum(self.scored)


@dataclass
class NllSum:
    """Summed negative log-likelihood (nats) over the scored tokens of one sequence."""

    nll: float
    tokens: int


def render(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool) -> str:
    """Render ``messages`` with the tokenizer's (already chosen) chat template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    tokenizer: Any, messages: Messages, *, first: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and locate the assistant messages at index ``>= first``.

    Args:
        tokenizer: A tokenizer whose ``chat_template`` is the one to use.
        messages: The conversation (roles ``system``/``user``/``assistant``).
        first: Only assistant messages from this index on are located (a preference row's
            response after its prompt; few-shot examples before the test conversation).

    Returns:
        ``(text, spans)``: the full rendering and ``[start, end)`` character spans.

    Raises:
        Unsupported: If the template does not render earlier turns as a prefix of later ones.
    """
    text = render(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if i < first or message.get("role") != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise Unsupported(
                "The chat template does not render earlier turns as a prefix of later ones, so "
                "assistant tokens cannot be located",
                fix="Use a ChatML-style template (the base's own, saved as chat_template.jinja).",
            )
        start = len(prefix)
        end = _turn_end(tokenizer, upto, start, str(message.get("content") or ""))
        if end is None:
            cut = upto.rfind(eos, start) if eos else -1
            end = cut + len(eos) if cut >= 0 else len(upto)
        spans.append((start, end))
    return text, spans


def _turn_end(tokenizer: Any, upto: str, start: int, content: str) -> int | None:
    """End of the special token the template prints right after ``content``, if it does.

    That token ends the turn whatever the tokenizer calls ``eos_token`` (Gemma's
    ``<end_of_turn>``, Phi-3's ``<|end|>``, ChatML's ``<|im_end|>``).
    """
    answer = content.strip()
    at = upto.find(answer, start) if answer else -1
    if at < 0:
        return None
    after = at + len(answer)
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
                      key=len, reverse=True)
    token = next((t for t in specials if t and upto.startswith(t, after)), None)
    return after + len(token) if token else None


def encode_conversation(tokenizer: Any, messages: Messages, *, first: int = 0) -> Encoded:
    """Tokenise a conversation, scoring the assistant tokens of messages ``>= first``."""
    text, spans = assistant_spans(tokenizer, messages, first=first)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    scored = []
    for t, (begin, _end) in enumerate(enc["offset_mapping"]):
        scored.append(t > 0 and any(s <= begin < e for s, e in spans))
    return Encoded(list(enc["input_ids"]), scored)


def encode_text(tokenizer: Any, text: str) -> Encoded:
    """Tokenise plain text (no template); every token but the first is scored."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Encoded(ids, [t > 0 for t in range(len(ids))])


def shared_prefix(sequences: Sequence[Encoded]) -> int:
    """Length of the token prefix all sequences share and none of them scores.

    Few-shot conversations share the examples; their keys and values are computed once.
    """
    if len(sequences) < 2:
        return 0
    first = sequences[0].ids
    length = min(len(s.ids) for s in sequences) - 1
    for seq in sequences:
        scored_at = next((t for t, keep in enumerate(seq.scored) if keep), len(seq.ids))
        length = min(length, scored_at - 1)
        common = 0
        while common < length and seq.ids[common] == first[common]:
            common += 1
        length = common
    return max(length, 0)


def nll_sums(
    model: Any, sequences: Sequence[Encoded], *, device: str = "cpu", token_budget: int = 512
) -> list[NllSum]:
    """Summed NLL over each sequence's scored tokens (teacher forcing), batched by length.

    A prefix shared by every sequence and scored in none (`shared_prefix`, e.g. few-shot
    examples) runs once; its KV cache is repeated over each batch. The remaining suffixes are
    sorted by length and packed while ``batch × longest ≤ token_budget`` (a batch's logits take
    ``token_budget × vocab × 4`` bytes; smaller batches measured faster on 2 CPU cores),
    right-padded and masked.

    Args:
        model: A causal LM (transformers or PEFT-wrapped), already on ``device``.
        sequences: What to score.
        device: Torch device string.
        token_budget: Upper bound on padded suffix tokens per forward pass.

    Returns:
        One `NllSum` per sequence, in input order.
    """
    import copy

    import torch
    import torch.nn.functional as F

    for seq in sequences:
        if len(seq.ids) != len(seq.scored):
            raise InvalidInput("Encoded ids and scored mask differ in length")
    prefix = shared_prefix(sequences) if len(sequences) > 1 else 0
    prefix = prefix if prefix >= _MIN_SHARED else 0
    results: list[NllSum | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))
    batches: list[list[int]] = []
    for index in order:
        longest = len(sequences[index].ids) - prefix
        if batches and (len(batches[-1]) + 1) * longest <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    model.eval()
    with torch.inference_mode():
        cache = None
        if prefix:
            head = torch.tensor([sequences[0].ids[:prefix]], device=device)
            cache = model(input_ids=head, use_cache=True).past_key_values
        for batch in batches:
            width = max(len(sequences[i].ids) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, index in enumerate(batch):
                seq = sequences[index]
                n = len(seq.ids)
                ids[row, :n] = torch.tensor(seq.ids)
                attention[row, :n] = 1
                for t, keep in enumerate(seq.scored):
                    if keep:
                        labels[row, t] = seq.ids[t]
            kwargs: dict[str, Any] = {}
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(batch))
                kwargs = {"past_key_values": past, "use_cache": True}
            logits = model(
                input_ids=ids[:, prefix:].to(device), attention_mask=attention.to(device), **kwargs
            ).logits
            # logits[:, j] (position prefix + j) predicts token prefix + j + 1.
            shifted = logits[:, :-1, :].float()
            target = labels[:, prefix + 1 :].to(device)
            nll = F.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(len(batch), -1)
            counts = (target != -100).sum(dim=1)
            for row, index in enumerate(batch):
                results[index] = NllSum(float(nll[row].sum()), int(counts[row]))
    return [r for r in results if r is not None]
