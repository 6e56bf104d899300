"""`write_card`: the adapter's README.md in Hugging Face format, every section from the run.

The YAML metadata is built with huggingface_hub's `ModelCardData` (so the Hub parses it) and the
whole card is parsed back with `ModelCard` before it is written. The body is the Jinja template
``card.md.jinja`` beside this module. Anything the run cannot know is listed under "To complete
before publishing"; the card is then a draft: metadata ``draft: true`` and the tag ``draft``,
which `modelcards.draft.card_is_draft` (and ``hub push``) checks; a complete card says
``draft: false``.

Where the job ends: this module assembles and writes the card; facts come from `facts`, the EU AI
Act notes from `euaiact`, draft detection lives in `draft`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.files import atomic_file
from hub.manifest import CARD_FILE
from modelcards.draft import DRAFT_KEY, DRAFT_TAG, TO_COMPLETE_HEADING
from modelcards.euaiact import build_notes, sci
from modelcards.facts import LOSS_PNG, Facts, gather

TEMPLATE = "card.md.jinja"
# Licence ids the Hub knows (a subset); others are written as `license: other` + license_name.
HUB_LICENSES = {
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0",
    "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc0-1.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0",
    "openrail", "creativeml-openrail-m", "bigscience-openrail-m", "llama2", "llama3", "llama3.1",
    "llama3.2", "gemma", "unlicense", "other",
}
EVAL_METRICS = [  # (eval.json key, model-index metric_type, label)
    ("exact_match", "exact_match", "exact match"),
    ("rouge_l", "rouge", "ROUGE-L F1"),
    ("token_f1", "f1", "token F1"),
    ("json_validity", "json_validity", "JSON validity"),
    ("field_accuracy", "accuracy", "JSON field accuracy"),
    ("field_precision", "precision", "JSON field precision"),
    ("field_recall", "recall", "JSON field recall"),
    ("perplexity", "perplexity", "perplexity (assistant tokens)"),
    ("preference_accuracy", "accuracy", "preference accuracy"),
    ("length_normalised_preference_accuracy", "accuracy", "preference accuracy (per-token)"),
    ("reward_accuracy", "accuracy", "reward accuracy"),
]


@dataclass
class CardResult:
    """What `write_card` wrote.

    Attributes:
        path: The README.md written.
        draft: True when items remain to complete (the card may not be published).
        to_complete: Those items, each naming the field or command that fills it.
        role_sentence: The EU AI Act role verdict in one sentence.
        metadata: The YAML metadata as a dict.
    """

    path: Path
    draft: bool
    to_complete: list[str] = field(default_factory=list)
    role_sentence: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def fmt(value: Any) -> str:
    """How the card prints a manifest value: exact, so it can be checked against the source."""
    if value is None:
        return "not recorded"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def metric(value: Any) -> str:
    """How the card prints an evaluation figure (4 decimals; ``n/a`` when absent)."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cell(value: Any, limit: int = 200) -> str:
    """Flatten text for a Markdown table cell (pipes escaped, long text cut)."""
    flat = " ".join(str(value).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def write_card(
    adapter_dir: Path,
    base: BaseInfo,
    *,
    out: Path | None = None,
    name: str | None = None,
    version: int | None = None,
) -> CardResult:
    """Write README.md for the adapter in ``adapter_dir`` (into ``out`` when given).

    Args:
        adapter_dir: Adapter folder with ``loradock.json`` and ``eval.json`` (both optional:
            what is missing is listed to complete).
        base: The base the adapter belongs to.
        out: Folder to write README.md into (default ``adapter_dir``); ``loss.png`` is copied
            beside it.
        name: Adapter name (default ``card.name``, else the folder's name).
        version: Registered version, if any.

    Returns:
        The `CardResult`.

    Raises:
        NotAnAdapter: Not a PEFT folder. InvalidInput: malformed manifest, eval.json or card
        fields.
    """
    from huggingface_hub import ModelCard

    facts = gather(Path(adapter_dir), base, name=name, version=version)
    notes = build_notes(facts)
    todo: list[str] = []
    metadata = _metadata(facts, todo)
    body_todo: list[str] = []
    context = _context(facts, notes, body_todo)
    items = list(dict.fromkeys(todo + body_todo + notes.to_complete))
    draft = bool(items)
    metadata[DRAFT_KEY] = draft
    metadata["loradock"] = {"to_complete": len(items),
                            "eu_ai_act_provider": notes.role.provider,
                            "compute_ratio": notes.role.ratio}
    if draft:
        metadata["tags"] = [*metadata.get("tags", []), DRAFT_TAG]
    card_data = _card_data(metadata)
    body = _render({**context, "to_complete": items, "draft": draft})
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")  # parses the YAML back
    target_dir = Path(out) if out else Path(adapter_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / CARD_FILE
    if facts.has_loss_png and target_dir.resolve() != Path(adapter_dir).resolve():
        shutil.copyfile(Path(adapter_dir) / LOSS_PNG, target_dir / LOSS_PNG)
    with atomic_file(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return CardResult(path, draft, items, notes.role.sentence, card.data.to_dict())


def _card_data(metadata: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    meta = dict(metadata)
    results = [EvalResult(**r) for r in meta.pop("_eval_results", [])]
    return ModelCardData(eval_results=results or None, **meta)


def _metadata(facts: Facts, todo: list[str]) -> dict[str, Any]:
    m, f = facts.manifest, facts.fields
    meta: dict[str, Any] = {
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "base_model_relation": "adapter",
        "model_name": _title(facts),
    }
    if facts.base.hf_id:
        meta["base_model"] = facts.base.hf_id
    else:
        todo.append(f"base_model: base {facts.base.name!r} has no Hugging Face id; add one "
                    "with `loradock hub add-base` or publish the base first")
    licence = (m.license if m else "").strip().lower()
    if not licence:
        todo.append("Adapter licence: set license in the recipe")
    elif licence in HUB_LICENSES:
        meta["license"] = licence
    else:
        meta.update(license="other", license_name=m.license if m else licence)
        todo.append(f"license_link: licence {licence!r} is not a Hub id; add a link to its text")
    if f.language:
        meta["language"] = f.language
    else:
        todo.append("Language(s) of the data: set card.language")
    if f.datasets:
        meta["datasets"] = f.datasets
    method = m.method if m else "lora"
    tags = ["loradock", "lora", "peft", method]
    if m and (m.quantization or {}).get("load_in_4bit"):
        tags.append("qlora")
    meta["tags"] = list(dict.fromkeys(tags + f.tags))
    meta["_eval_results"] = _eval_results(facts)
    return meta


def _title(facts: Facts) -> str:
    return facts.name or f"LoRA adapter for {facts.base.name}"


def _eval_results(facts: Facts) -> list[dict[str, Any]]:
    doc = facts.eval
    if not doc:
        return []
    adapter = doc["systems"]["adapter"]
    m = facts.manifest
    source = Path(str(m.data.get("source", ""))).name if m and m.data else ""
    sha = str(m.data.get("sha256", ""))[:12] if m and m.data else ""
    dataset_type = facts.fields.datasets[0] if facts.fields.datasets else "local"
    dataset_name = f"{source or 'local data'}" + (f" (sha256 {sha})" if sha else "")
    results = []
    for key, metric_type, label in EVAL_METRICS:
        value = adapter.get(key)
        if value is None:
            continue
        results.append({
            "task_type": "text-generation", "dataset_type": dataset_type,
            "dataset_name": dataset_name, "dataset_split": "test", "metric_type": metric_type,
            "metric_name": label, "metric_value": round(float(value), 4),
        })
    forgetting = doc.get("forgetting") or {}
    if forgetting.get("adapter_perplexity") is not None:
        results.append({
            "task_type": "text-generation", "dataset_type": "loradock-general-text",
            "dataset_name": "loradock general text (forgetting check)", "metric_type": "perplexity",
            "metric_name": "perplexity (general text)",
            "metric_value": round(float(forgetting["adapter_perplexity"]), 4),
        })
    return results


def _context(facts: Facts, notes: Any, todo: list[str]) -> dict[str, Any]:
    m = facts.manifest
    if m is None:
        todo.append("Training record: this folder has no loradock.json; train it with "
                    "`loradock train` to fill the data and procedure sections")
    if not (m and m.intended_use):
        todo.append("Intended use: set intended_use in the recipe")
    if not (m and m.out_of_scope_use):
        todo.append("Out-of-scope use: set out_of_scope_use in the recipe")
    if facts.eval is None:
        todo.append("Evaluation: run `loradock eval` so the folder holds eval.json")
    if not facts.name:
        todo.append("Adapter name: set card.name or register the adapter "
                    "(`loradock hub register DIR --name NAME`)")
    if not facts.fields.known_biases:
        todo.append("Known biases of the data: set card.known_biases")
    return {
        "title": _title(facts),
        "facts": facts,
        "manifest": m,
        "fields": facts.fields,
        "base": facts.base,
        "config": facts.adapter_config,
        "eval": facts.eval,
        "notes": notes,
        "eval_metrics": EVAL_METRICS,
        "systems": [s for s in ("base", "few_shot", "few_shot_original", "parent", "adapter")
                    if facts.eval and s in facts.eval["systems"]],
        "example_prompt": _example_prompt(facts),
    }


def _example_prompt(facts: Facts) -> str:
    for example in (facts.eval or {}).get("examples", []):
        if example.get("prompt"):
            return " ".join(str(example["prompt"]).split())[:300]
    return "Hello!"


def _render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=False,  # Markdown, not HTML; table cells go through `cell`
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=fmt, metric=metric, cell=cell, sci=sci, tojson=json.dumps)
    env.globals["TO_COMPLETE_HEADING"] = TO_COMPLETE_HEADING
    return env.get_template(TEMPLATE).render(**context)
