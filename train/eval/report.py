"""The verdict and the two output files: ``eval.json`` (for machines) and ``eval_report.md``.

Verdict rule (the seeds ask for 5–10 % over the few-shot baseline):

- The task metric is exact match when at least half of the test references are JSON, else
  ROUGE-L; for preference data it is preference accuracy.
- The baseline is the base model prompted with k examples from train (few-shot). Without
  examples (no train split, ``k = 0``, preference data) the baseline is the plain base.
- Gain rule: ``(adapter - baseline) / baseline >= 5 %`` on the task metric; when the baseline
  scores 0 the relative figure is undefined and the absolute gain must reach 0.05. Reaching 10 %
  is reported as meeting the top of the seeds' band.
- Significance: the paired bootstrap 95 % interval of ``adapter - baseline`` over the test
  examples (`train.eval.metrics.paired_bootstrap_ci`). When it includes 0 (or there are fewer
  than two examples, so there is no interval) the difference is reported as **not
  significant**.
- The adapter **passes** only when the gain rule holds **and** the interval lies above 0. Four
  examples at 3/4 vs 2/4 are +50 % relative, but their interval is [0, +0.75]: not significant,
  so no pass.

Where the job ends: this module decides and writes; the figures come from `train.eval.run`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hub.files import atomic_file
from hub.manifest import EVAL_JSON_FILE, EVAL_REPORT_FILE
from train.eval.metrics import beats, paired_bootstrap_ci, relative_improvement

THRESHOLD = 0.05
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
STRONG_THRESHOLD = 0.10
LOSS_PNG = "loss.png"
METRIC_LABELS = {
    "exact_match": "exact match",
    "rouge_l": "ROUGE-L F1",
    "preference_accuracy": "preference accuracy",
}
METRIC_ROWS = {
    "sft": [
        ("perplexity", "perplexity (assistant tokens)"),
        ("scored_tokens", "scored tokens"),
        ("exact_match", "exact match"),
        ("rouge_l", "ROUGE-L F1"),
        ("token_f1", "token F1"),
        ("json_validity", "JSON validity"),
        ("field_accuracy", "JSON field accuracy"),
        ("field_precision", "JSON field precision"),
        ("field_recall", "JSON field recall"),
    ],
    "preference": [
        ("preference_accuracy", "preference accuracy"),
        ("length_normalised_preference_accuracy", "preference accuracy (per-token)"),
        ("reward_accuracy", "reward accuracy (vs base)"),
        ("mean_margin", "mean log-likelihood margin"),
        ("perplexity", "perplexity (chosen responses)"),
        ("scored_tokens", "scored tokens"),
    ],
}
SYSTEM_LABELS = {
    "base": "base",
    "parent": "parent adapter",
    "few_shot": "few-shot base",
    "few_shot_original": "few-shot base, original weights",
    "adapter": "adapter",
}
SYSTEM_ORDER = ("base", "few_shot", "few_shot_original", "parent", "adapter")


def significance(ci: tuple[float, float] | None) -> str:
    """``higher`` / ``lower`` when the 95 % interval excludes 0, else ``not significant``.

    An interval touching 0 (``low == 0``) includes it; no interval (fewer than two examples) is
    not significant either.
    """
    if ci is None or ci[0] <= 0 <= ci[1]:
        return "not significant"
    return "higher" if ci[0] > 0 else "lower"


def verdict(
    primary: str, per_example: dict[str, list[float]], *, baseline: str, shots: int
) -> dict[str, Any]:
    """Decide whether the adapter beats ``baseline`` on ``primary`` (rule: module docstring).

    Args:
        primary: The task metric's key.
        per_example: ``{system: [score per test example]}`` for ``adapter``, ``baseline``
            and ``base``.
        baseline: ``few_shot``, ``few_shot_original`` (few-shot on the unquantised weights of
            a QLoRA adapter's base) or ``base``.
        shots: Number of few-shot examples (for the sentence).
    """
    score = {name: sum(v) / len(v) for name, v in per_example.items() if v}
    adapter, reference = score["adapter"], score[baseline]
    rel = relative_improvement(adapter, reference)
    gain = beats(adapter, reference, THRESHOLD)
    ci = paired_bootstrap_ci(
        per_example["adapter"], per_example[baseline],
        resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
    )
    significant = significance(ci)
    passed = gain and significant == "higher"
    strong = passed and beats(adapter, reference, STRONG_THRESHOLD)
    label = METRIC_LABELS[primary]
    base_label = {
        "few_shot": f"{shots}-shot base",
        "few_shot_original": f"{shots}-shot base on its original (unquantised) weights",
        "parent": "parent adapter it was trained from",
    }.get(baseline, "base model")
    if rel is None:
        change = f"an absolute gain of {adapter - reference:+.3f} (the {base_label} scores 0)"
    else:
        change = f"{rel:+.1%} relative"
    if passed:
        outcome = "beats" + (" (≥ 10 %, the top of the 5–10 % band)" if strong else " (≥ 5 %)")
    elif gain:
        outcome = "does NOT beat (the gain is not significant)"
    else:
        outcome = "does NOT beat (needs ≥ 5 % and a significant difference)"
    n = len(per_example["adapter"])
    sentence = (
        f"The adapter {outcome} the {base_label} on {label}: {adapter:.3f} vs {reference:.3f}, "
        f"{change}, over {n} test examples."
    )
    if ci is not None:
        sentence += f" 95 % bootstrap interval of the difference: [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        sentence += {
            "higher": " (above 0: significant).",
            "lower": " (below 0: significantly worse).",
            "not significant": " (includes 0: not significant).",
        }[significant]
    else:
        sentence += " Too few examples for a bootstrap interval: not significant."
    result = {
        "primary_metric": primary,
        "baseline": baseline,
        "adapter": adapter,
        "baseline_score": reference,
        "base": score.get("base"),
        "few_shot": score.get("few_shot"),
        "few_shot_original": score.get("few_shot_original"),
        "parent": score.get("parent"),
        "relative_improvement": rel,
        "absolute_improvement": adapter - reference,
        "relative_improvement_vs_base": relative_improvement(adapter, score["base"]),
        "beats_base": beats(adapter, score["base"], THRESHOLD),
        "threshold": THRESHOLD,
        "strong_threshold": STRONG_THRESHOLD,
        "gain_rule_met": gain,
        "significance": significant,
        "passed": passed,
        "strong": strong,
        "ci95_difference": list(ci) if ci else None,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "paired": True},
        "rule": (
            f"pass when (adapter - {baseline}) / {baseline} >= {THRESHOLD:.0%} on {label} "
            f"(absolute gain >= {THRESHOLD} when the {baseline} score is 0) AND the paired "
            f"bootstrap 95 % interval of the difference ({BOOTSTRAP_RESAMPLES} resamples of the "
            f"{n} test examples) lies above 0; an interval that includes 0 is reported as not "
            f"significant; >= {STRONG_THRESHOLD:.0%} meets the top of the seeds' 5-10 % band"
        ),
        "sentence": sentence,
    }
    return result


def write_outputs(doc: dict[str, Any], out_dir: Path, adapter_dir: Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval_report.md`` into ``out_dir`` (atomically, each).

    ``loss.png`` from the adapter folder is copied beside the report when ``out_dir`` differs.

    Returns:
        ``(json_path, report_path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss = Path(adapter_dir) / LOSS_PNG
    has_loss = loss.is_file()
    if has_loss and loss.resolve() != (out_dir / LOSS_PNG).resolve():
        shutil.copyfile(loss, out_dir / LOSS_PNG)
    json_path, report_path = out_dir / EVAL_JSON_FILE, out_dir / EVAL_REPORT_FILE
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    with atomic_file(report_path) as tmp:
        tmp.write_text(render_markdown(doc, loss_png=LOSS_PNG if has_loss else None))
    return json_path, report_path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: str, limit: int = 160) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def render_markdown(doc: dict[str, Any], *, loss_png: str | None = None) -> str:
    """The human report of an ``eval.json`` document."""
    systems = doc["systems"]
    names = [s for s in SYSTEM_ORDER if s in systems]
    data, verdict_ = doc["data"], doc["verdict"]
    shots = data.get("few_shot_k", 0)
    header = [SYSTEM_LABELS[s] + (f" ({shots}-shot)" if s.startswith("few_shot") else "")
              for s in names]
    lines = [
        "# Evaluation report",
        "",
        f"- Adapter: `{doc['adapter']['dir']}` (chat template: {doc['adapter']['chat_template']})",
        f"- Base: `{doc['base']['name']}`, weights "
        f"{doc['base'].get('weights', 'unquantised ' + doc['base']['precision'])}, on "
        f"{doc['device']}"
        + (f" ({doc['device_note']})" if doc.get("device_note") else "")
        + "; base, few-shot and adapter share them"
        + ("; the few-shot base also runs on the original weights (its own column)"
           if "few_shot_original" in systems else ""),
        f"- Data: {data['evaluated']} of {data['test_rows']} rows of the test split "
        f"(`{data['dir']}`), kind: {doc['kind']}",
    ]
    if doc.get("decoding"):
        dec = doc["decoding"]
        lines.append(
            f"- Decoding: greedy, at most {dec['max_new_tokens']} new tokens, batches of "
            f"{dec['batch_size']} with left padding"
        )
    lines += ["", "## Verdict", "", verdict_["sentence"], "", f"Rule: {verdict_['rule']}.", ""]
    lines += ["## Results on the test split", "", "| metric | " + " | ".join(header) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for key, label in METRIC_ROWS[doc["kind"]]:
        values = [_fmt(systems[s].get(key)) for s in names]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    forgetting = doc["forgetting"]
    lines += ["", "## Forgetting check", "", forgetting["sentence"], ""]
    lines.append(f"Rule: {forgetting['rule']}.")
    if doc.get("samples"):
        lines += ["", "## Sample prompts", "", "| prompt | base | adapter |", "|---|---|---|"]
        for sample in doc["samples"]:
            lines.append(
                f"| {_cell(sample['prompt'])} | {_cell(sample['base'])} | "
                f"{_cell(sample['adapter'])} |"
            )
    if loss_png:
        lines += ["", "## Training curves", "", f"![train and validation loss]({loss_png})"]
    if doc.get("worst_examples"):
        lines += ["", "## Worst adapter examples", "", "| line | prompt | reference | adapter |"]
        lines.append("|---|---|---|---|")
        for ex in doc["worst_examples"]:
            lines.append(
                f"| {ex['line']} | {_cell(ex['prompt'])} | {_cell(ex['reference'])} | "
                f"{_cell(ex['adapter'])} |"
            )
    lines += ["", "## Definitions", ""]
    lines += [f"- **{name}**: {text}" for name, text in doc["metric_definitions"].items()]
    if data.get("few_shot_lines"):
        lines.append(f"- Few-shot examples: train lines {data['few_shot_lines']} (seeded choice).")
    lines += ["", f"Evaluation took {doc['wall_time_s']:.1f} s.", ""]
    return "\n".join(lines)
