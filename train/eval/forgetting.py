"""The forgetting check: perplexity on general text the task never saw, base vs adapter.

``general_text.jsonl`` (package data, beside this module) holds 30 short English paragraphs on
everyday topics that the loradock team wrote for this check, so no third-party text is
redistributed and no base model has memorised them. Each paragraph is scored as plain text (no
chat template): every token after the first. A fine-tune that damaged the base's general
language ability raises this perplexity.

Rule: the adapter shows forgetting when its perplexity exceeds the base's by more than
`FORGETTING_THRESHOLD` (10 %), i.e. ``adapter / base - 1 > 0.10``.

Where the job ends: this module reads the texts and compares two NLL sums; models come from
`train.eval.generate`, scoring from `train.eval.scoring`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from train.eval.metrics import perplexity
from train.eval.scoring import encode_text, nll_sums

GENERAL_TEXT_FILE = Path(__file__).with_name("general_text.jsonl")
FORGETTING_THRESHOLD = 0.10


@dataclass
class ForgettingResult:
    """Perplexity of base and adapter on the bundled general text.

    Attributes:
        texts: Paragraphs scored.
        tokens: Tokens scored per model.
        base_perplexity: The base's perplexity.
        adapter_perplexity: The adapter's perplexity.
        relative_change: ``adapter / base - 1`` (positive = worse with the adapter).
        threshold: `FORGETTING_THRESHOLD`.
        forgetting: True when ``relative_change > threshold``.
        rule: The rule in words.
        sentence: The finding in one sentence.
    """

    texts: int
    tokens: int
    base_perplexity: float
    adapter_perplexity: float
    relative_change: float
    threshold: float
    forgetting: bool
    rule: str
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


def general_texts(path: Path = GENERAL_TEXT_FILE) -> list[str]:
    """The bundled paragraphs, in file order."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def forgetting_check(
    loaded: Any, *, limit: int | None = None, token_budget: int = 512
) -> ForgettingResult:
    """Score the general text with the adapter disabled and enabled.

    Args:
        loaded: A `train.eval.generate.Loaded` (base with the adapter attached).
        limit: Score only the first N paragraphs (quick runs; the report states the count).
        token_budget: Passed to `nll_sums`.
    """
    texts = general_texts()[:limit] if limit else general_texts()
    encoded = [encode_text(loaded.tokenizer, text) for text in texts]
    figures = {}
    for system in ("base", "adapter"):
        with loaded.system(system) as model:
            sums = nll_sums(model, encoded, device=loaded.device, token_budget=token_budget)
        tokens = sum(s.tokens for s in sums)
        figures[system] = (perplexity(sum(s.nll for s in sums), tokens), tokens)
    base_ppl, tokens = figures["base"]
    adapter_ppl, _ = figures["adapter"]
    change = adapter_ppl / base_ppl - 1
    forgetting = change > FORGETTING_THRESHOLD
    direction = "higher" if change >= 0 else "lower"
    sentence = (
        f"On {len(texts)} general-text paragraphs ({tokens} tokens) the adapter's perplexity is "
        f"{adapter_ppl:.2f} against the base's {base_ppl:.2f} ({abs(change):.1%} {direction}): "
        + ("forgetting detected." if forgetting else "no forgetting detected.")
    )
    return ForgettingResult(
        texts=len(texts),
        tokens=tokens,
        base_perplexity=base_ppl,
        adapter_perplexity=adapter_ppl,
        relative_change=change,
        threshold=FORGETTING_THRESHOLD,
        forgetting=forgetting,
        rule=(
            "forgetting = adapter perplexity exceeds the base's by more than "
            f"{FORGETTING_THRESHOLD:.0%} on the bundled general text"
        ),
        sentence=sentence,
    )
