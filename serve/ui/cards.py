"""A version's model card and evaluation as the adapter page shows them.

The card (``README.md``) is split into its YAML header, shown as a table, and its Markdown body,
rendered by markdown-it-py with raw HTML off (a card's text is escaped, and links with unsafe
schemes are not made links) and GitHub-style tables on. Headings get ``id`` anchors so the page
can link to sections (``#card-eu-ai-act-notes``). The evaluation comes from ``eval.json`` (verdict,
results per system, forgetting check, worst examples), not from ``eval_report.md``: the report
names the folder it was run in, a local path the console does not show.

Both are cached per version: a registered version's files never change.

Where the job ends: turning files into HTML fragments and plain data; the page is the template's.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hub.manifest import CARD_FILE
from serve.ui.catalog import read_eval

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)
SYSTEM_LABELS = {"base": "base", "few_shot": "few-shot base",
                 "few_shot_original": "few-shot base, original weights", "adapter": "adapter"}
METRIC_LABELS = {  # eval.json key -> label, in the card's order
    "exact_match": "exact match", "rouge_l": "ROUGE-L F1", "json_validity": "JSON validity",
    "perplexity": "perplexity (assistant tokens)", "preference_accuracy": "preference accuracy",
    "reward_accuracy": "reward accuracy", "mean_margin": "mean log-prob margin",
}


@dataclass
class RenderedCard:
    """A model card ready for the page.

    Attributes:
        header: ``(key, text)`` rows of the YAML header (nested values as YAML text).
        body_html: The Markdown body as safe HTML.
        sections: ``(anchor, title)`` of the body's second-level headings.
        error: Why the header could not be read, if it could not.
    """

    header: list[tuple[str, str]] = field(default_factory=list)
    body_html: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


@dataclass
class EvalView:
    """An ``eval.json`` as the page shows it."""

    passed: bool
    sentence: str
    rule: str
    systems: list[tuple[str, str]]
    rows: list[tuple[str, list[str]]]
    forgetting: str
    worst: list[dict[str, Any]]
    evaluated: int | None
    primary: str


def _slug(text: str) -> str:
    """The anchor of a card heading (prefixed, so it never clashes with the page's own ids)."""
    return "card-" + (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section")


@functools.lru_cache(maxsize=1)
def _markdown() -> Any:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "typographer": False}).enable("table")

    def anchors(state: Any) -> None:
        tokens = state.tokens
        for i, token in enumerate(tokens):
            if token.type == "heading_open" and i + 1 < len(tokens):
                token.attrSet("id", _slug(tokens[i + 1].content))

    md.core.ruler.push("heading_anchors", anchors)
    return md


def _cell(value: Any) -> str:
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, sort_keys=False, allow_unicode=True).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_card_text(text: str) -> RenderedCard:
    """Render a README.md text (YAML header + Markdown body)."""
    card = RenderedCard()
    body = text
    match = _FRONT_MATTER.match(text)
    if match:
        body = text[match.end():]
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            meta = None
            card.error = f"the YAML header does not parse ({type(exc).__name__})"
        if isinstance(meta, dict):
            card.header = [(str(k), _cell(v)) for k, v in meta.items()]
        elif meta is not None and not card.error:
            card.error = "the YAML header is not a mapping"
    md = _markdown()
    tokens = md.parse(body)
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag == "h2" and i + 1 < len(tokens):
            title = tokens[i + 1].content
            card.sections.append((_slug(title), title))
    card.body_html = md.renderer.render(tokens, md.options, {})
    return card


@functools.lru_cache(maxsize=256)
def _card_cached(path: str, _digest: str) -> RenderedCard | None:
    readme = Path(path) / CARD_FILE
    if not readme.is_file():
        return None
    return render_card_text(readme.read_text(encoding="utf-8", errors="replace"))


def rendered_card(folder: Path, digest: str) -> RenderedCard | None:
    """The version's rendered card (None when it has no README.md); cached by ``digest``."""
    return _card_cached(str(folder), digest)


def _metric(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@functools.lru_cache(maxsize=256)
def _eval_cached(path: str, _digest: str) -> EvalView | None:
    doc = read_eval(Path(path))
    if doc is None or not isinstance(doc.get("systems"), dict):
        return None
    systems = doc["systems"]
    names = [s for s in SYSTEM_LABELS if s in systems]
    adapter = systems.get("adapter") or {}
    rows = [(label, [_metric((systems[s] or {}).get(key)) for s in names])
            for key, label in METRIC_LABELS.items() if key in adapter]
    verdict = doc.get("verdict") or {}
    worst = [ex for ex in doc.get("worst_examples") or [] if isinstance(ex, dict)]
    return EvalView(
        passed=bool(verdict.get("passed")), sentence=str(verdict.get("sentence") or ""),
        rule=str(verdict.get("rule") or ""),
        systems=[(s, SYSTEM_LABELS[s]) for s in names], rows=rows,
        forgetting=str((doc.get("forgetting") or {}).get("sentence") or ""),
        worst=worst, evaluated=(doc.get("data") or {}).get("evaluated"),
        primary=METRIC_LABELS.get(str(doc.get("primary_metric")), str(doc.get("primary_metric"))),
    )


def eval_view(folder: Path, digest: str) -> EvalView | None:
    """The version's evaluation (None without a readable eval.json); cached by ``digest``."""
    return _eval_cached(str(folder), digest)
