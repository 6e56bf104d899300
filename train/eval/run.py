"""`run_eval`: base vs few-shot base vs adapter on the test split, plus the forgetting check.

Input is a prepared data folder (``loradock data prepare``) holding ``test.jsonl`` and, for the
few-shot baseline, ``train.jsonl``, in canonical rows:

- SFT: ``{"messages": [{"role", "content"}, ...], "line": int}``; the last assistant turn is the
  reference, the turns before it the prompt.
  Systems: ``base``, ``few_shot`` (the base prompted with k training examples) and ``adapter``,
  all on the base weights the adapter trained on (`train.eval.generate`); for a QLoRA adapter
  also ``few_shot_original``, the few-shot base on the original full-precision weights. The
  verdict is against the stronger few-shot system.
- Preference: ``{"prompt": [...], "chosen": [...], "rejected": [...], "line": int}``; systems
  ``base``, ``adapter`` and, when the adapter was trained from a registered ``parent`` (DPO,
  ORPO or KTO after SFT), ``parent``, which is then the verdict's baseline. Scored by
  log-likelihood (no generation): preference accuracy = share of rows where the model gives the
  chosen response a higher summed log-likelihood than the rejected one; reward accuracy = share
  where the adapter raises the chosen response's log-likelihood (relative to the base) more than
  the rejected one's, DPO's implicit reward. There is no few-shot baseline for preference data.

Where the job ends: this module orchestrates and assembles ``eval.json``; the pieces live in
`generate` (models, prompts), `scoring` (token NLL), `metrics`, `forgetting` and `report`.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.errors import InvalidInput, NotFound
from hub.manifest import AdapterManifest
from hub.names import public_name
from train.eval import metrics
from train.eval.forgetting import forgetting_check
from train.eval.generate import (
    Dtype,
    Loaded,
    System,
    greedy_generate,
    load,
    pick_shots,
    split_conversation,
    with_shots,
)
from train.eval.report import verdict, write_outputs
from train.eval.scoring import encode_conversation, nll_sums

EVAL_SCHEMA = 1
_FIELD_KEYS = ("field_accuracy", "field_precision", "field_recall")
WORST_EXAMPLES = 3
METRIC_DEFINITIONS = {
    "perplexity": "exp(summed NLL / scored tokens) over all test rows together; scored tokens are "
    "the assistant turns' content and end-of-turn token, located with the chat template (few-shot: "
    "the test conversation's turns only, with the examples as context)",
    "exact_match": "prediction equals the reference after collapsing whitespace; JSON references "
    "must parse to an equal value",
    "rouge_l": "F1 of the longest common subsequence of word tokens (NFKC, case-folded; a Han, "
    "Hiragana or Katakana character is one token, any other run of Unicode letters, marks and "
    "digits is one token)",
    "token_f1": "F1 of the multiset overlap of the same word tokens (order ignored)",
    "field_precision": "JSON leaf fields (dotted paths) with the reference's value / fields in "
    "the prediction, averaged over rows whose reference is JSON (0 for a non-JSON prediction)",
    "field_recall": "JSON leaf fields with the reference's value / fields in the reference",
    "field_accuracy": "JSON leaf fields with the reference's value / fields in either the "
    "prediction or the reference",
    "json_validity": "share of predictions that are one JSON object/array, over rows whose "
    "reference is JSON (n/a when none is)",
    "preference_accuracy": "share of rows where summed log p(chosen) > log p(rejected)",
    "length_normalised_preference_accuracy": "share of rows where the mean log p per token of "
    "the chosen response > that of the rejected one (longer answers are not penalised)",
    "reward_accuracy": "share of rows where the adapter's gain over the base in log p(chosen) "
    "exceeds its gain in log p(rejected) (DPO's implicit reward)",
}
# What reward accuracy means for each preference method (the eval report and card print it).
REWARD_ACCURACY_BY_METHOD = {
    "dpo": METRIC_DEFINITIONS["reward_accuracy"],
    "kto": "share of rows where the adapter's gain over the base in log p(chosen) exceeds its "
    "gain in log p(rejected): KTO's implicit reward log(policy / reference) with the base as "
    "the reference, compared across the pair",
    "orpo": "share of rows where the adapter's gain over the base in log p(chosen) exceeds its "
    "gain in log p(rejected); ORPO trains without a reference model (its penalty is the odds "
    "ratio of chosen to rejected), so this is a diagnostic against the base, not ORPO's "
    "objective",
}


@dataclass
class EvalResult:
    """What `run_eval` produced.

    Attributes:
        doc: The ``eval.json`` document.
        json_path: Where ``eval.json`` was written.
        report_path: Where ``eval_report.md`` was written.
    """

    doc: dict[str, Any]
    json_path: Path
    report_path: Path

    @property
    def passed(self) -> bool:
        """True when the adapter beats the baseline by the verdict rule."""
        return bool(self.doc["verdict"]["passed"])

    @property
    def sentence(self) -> str:
        """The verdict in one sentence."""
        return str(self.doc["verdict"]["sentence"])

    @property
    def verdict(self) -> str:
        """Alias of `sentence` (what the train CLI prints)."""
        return self.sentence


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read canonical JSONL rows, checking each is an SFT or a preference row.

    Raises:
        InvalidInput: Naming the first bad line.
    """
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path}:{number} is not JSON: {exc.msg}") from exc
            sft = isinstance(row, dict) and isinstance(row.get("messages"), list)
            pref = isinstance(row, dict) and all(
                isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")
            )
            if not (sft or pref):
                raise InvalidInput(
                    f"{path}:{number} is not a canonical row (messages, or prompt/chosen/rejected)",
                    fix="Prepare the data first: `loradock data prepare FILE --out DIR`.",
                    param="data",
                )
            row.setdefault("line", number)
            rows.append(row)
    return rows


def run_eval(
    adapter_dir: Path,
    base: BaseInfo,
    data_dir: Path,
    *,
    few_shot_k: int = 3,
    max_examples: int | None = None,
    max_new_tokens: int = 128,
    device: str | None = None,
    out_dir: Path | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    dtype: Dtype = "auto",
    forgetting_texts: int | None = None,
    sample_prompts: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate an adapter on ``data_dir/test.jsonl`` and write ``eval.json`` + ``eval_report.md``.

    Args:
        adapter_dir: PEFT LoRA folder (``chat_template.jinja`` used when present).
        base: The base it was trained on, loaded from ``base.path`` as training saw it: NF4
            values (dequantised) when the manifest says ``load_in_4bit``, else unquantised.
        data_dir: Prepared data folder with ``test.jsonl`` (and ``train.jsonl`` for shots), or
            a canonical test JSONL file (shots from a ``train.jsonl`` beside it, if any).
        few_shot_k: Examples from train in the few-shot baseline (0 disables it).
        max_examples: Evaluate only the first N test rows.
        max_new_tokens: Generation limit per answer.
        device: ``cpu`` or ``cuda[:N]``; default: the device training used (the manifest's
            ``compute.device``), or ``cpu`` with a note in ``eval.json`` when that device is
            not available here.
        out_dir: Where to write the outputs (default ``adapter_dir``; registered folders are
            read-only).
        batch_size: Generation batch size.
        seed: Seed of the few-shot choice; default: the recipe's ``seed`` (manifest), else 0.
        dtype: Base precision; ``auto`` = float32 on CPU, bfloat16 on CUDA.
        forgetting_texts: Use only the first N bundled general-text paragraphs (default all 30).
        sample_prompts: User prompts whose base and adapter answers are shown side by side
            (default: the recipe's ``eval_prompts`` recorded in the manifest).
        log: Called with one line per stage (progress), if given.

    Raises:
        NotFound: No ``test.jsonl``.
        InvalidInput: Empty or mixed (SFT and preference) test split, or a bad row.
    """
    started = time.monotonic()
    say = log or (lambda _line: None)
    adapter_dir, data_dir = Path(adapter_dir), Path(data_dir)
    if data_dir.is_file():  # a test JSONL file; shots from a train.jsonl beside it
        test_path, train_path = data_dir, data_dir.parent / "train.jsonl"
    else:
        test_path, train_path = data_dir / "test.jsonl", data_dir / "train.jsonl"
    if not test_path.is_file():
        raise NotFound(
            f"{test_path} does not exist",
            fix="Pass the folder written by `loradock data prepare` (it holds test.jsonl) or a "
            "test JSONL file.",
            param="data",
        )
    all_test = read_rows(test_path)
    test = all_test[:max_examples] if max_examples else all_test
    if not test:
        raise InvalidInput(f"{test_path} has no rows", fix="Prepare more data.", param="data")
    kinds = {"sft" if "messages" in row else "preference" for row in test}
    if len(kinds) != 1:
        raise InvalidInput(f"{test_path} mixes SFT and preference rows", param="data")
    kind = kinds.pop()
    same = train_path.resolve() == test_path.resolve()
    train = read_rows(train_path) if train_path.is_file() and kind == "sft" and not same else []
    manifest = AdapterManifest.read(adapter_dir)
    quantization = dict(manifest.quantization) if manifest else {}
    device, device_note = _eval_device(device, manifest)
    seed = _recorded_seed(manifest) if seed is None else seed
    say(f"loading {base.name} and {adapter_dir}")
    loaded = load(adapter_dir, base, device=device, dtype=dtype, quantization=quantization)
    doc: dict[str, Any] = {
        "schema": EVAL_SCHEMA,
        "kind": kind,
        "created_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "adapter": {"dir": public_name(adapter_dir), "chat_template": loaded.template_source},
        "base": {
            "name": base.name,
            "fingerprint": base.fingerprint,
            "hf_id": base.hf_id,
            "precision": loaded.dtype,
            "quantized": loaded.quantized,
            "weights": loaded.weights,
        },
        "method": manifest.method if manifest else None,
        "device": device,
        "device_note": device_note,
        "metric_definitions": {},
    }
    if kind == "sft":
        shots = pick_shots(train, few_shot_k, seed)
        original = None
        if loaded.quantized and shots:  # the strongest prompt-only baseline: full precision
            say(f"loading {base.name} unquantised for the few-shot baseline on its own weights")
            original = load(adapter_dir, base, device=device, dtype=dtype)
        doc.update(_eval_sft(loaded, test, shots, max_new_tokens, batch_size, say, original))
        del original
        doc["data"] = {
            "few_shot_k": len(shots),
            "few_shot_seed": seed,
            "few_shot_lines": [s["line"] for s in shots],
        }
    else:
        parent_dir, doc["parent"] = _parent(manifest)
        if parent_dir is not None:
            say(f"loading the parent adapter {doc['parent']} for comparison")
            loaded.add_parent(parent_dir)
        doc.update(_eval_preference(loaded, test, say, method=doc["method"] or "dpo",
                                    parent=parent_dir is not None))
        doc["data"] = {"few_shot_k": 0, "few_shot_seed": None, "few_shot_lines": []}
    doc["data"].update(
        {"dir": public_name(data_dir), "split": "test", "test_rows": len(all_test),
         "evaluated": len(test)}
    )
    doc["data"]["json_references"] = doc.pop("_json_references", 0)
    baseline = "parent" if "parent" in doc["systems"] else _baseline(
        doc["systems"], doc["primary_metric"])
    doc["verdict"] = verdict(
        doc["primary_metric"],
        doc.pop("_per_example"),
        baseline=baseline,
        shots=doc["data"]["few_shot_k"],
    )
    if sample_prompts is None:
        recorded = manifest.hyperparameters.get("eval_prompts") if manifest else None
        sample_prompts = [str(p) for p in recorded or []]
    doc["samples"] = _samples(loaded, sample_prompts, max_new_tokens, batch_size, say)
    say("forgetting check on the bundled general text")
    doc["forgetting"] = forgetting_check(loaded, limit=forgetting_texts).to_dict()
    doc["wall_time_s"] = round(time.monotonic() - started, 3)
    json_path, report_path = write_outputs(doc, Path(out_dir or adapter_dir), adapter_dir)
    say(f"wrote {report_path.name} and {json_path.name} ({doc['wall_time_s']:.0f} s)")
    return EvalResult(doc, json_path, report_path)


def _parent(manifest: AdapterManifest | None) -> tuple[Path | None, str | None]:
    """The folder of the adapter this one was trained from (the hub's copy), when registered."""
    ref = manifest.parent if manifest else None
    if not ref:
        return None, None
    from hub.names import parse_adapter_ref
    from hub.store import Store

    name, version = parse_adapter_ref(ref)
    try:
        return Path(Store().get(name, version).path), ref
    except NotFound:
        return None, ref


def _recorded_seed(manifest: AdapterManifest | None) -> int:
    """The recipe's ``seed`` (the few-shot choice reuses it), else 0."""
    value = manifest.hyperparameters.get("seed") if manifest else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _eval_device(device: str | None, manifest: AdapterManifest | None) -> tuple[str, str]:
    """The device to evaluate on and how it was chosen (recorded in ``eval.json``)."""
    if device:
        return device, "as asked"
    trained = str((manifest.compute if manifest else {}).get("device") or "cpu")
    if trained.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "cpu", f"training used {trained}; no CUDA device here, so cpu"
    return trained, "as in training"


def _baseline(systems: dict[str, dict[str, Any]], primary: str) -> str:
    """The strongest baseline: the better few-shot system (ties: the adapter's weights), else base.

    For a QLoRA adapter the few-shot base runs on the 4-bit values the adapter trained on and,
    as ``few_shot_original``, on the original full-precision weights; 4-bit rounding can cost a
    small base more than the examples gain it (SmolLM2-135M: 0.30 vs 0.73 exact match on the
    demo), so the verdict is against whichever scores higher.
    """
    candidates = [s for s in ("few_shot", "few_shot_original") if s in systems]
    if not candidates:
        return "base"
    return max(candidates, key=lambda s: (systems[s].get(primary) or 0.0, s == "few_shot"))


def _samples(
    loaded: Loaded, prompts: list[str], max_new_tokens: int, batch_size: int,
    say: Callable[[str], None],
) -> list[dict[str, str]]:
    if not prompts:
        return []
    say(f"answering {len(prompts)} sample prompts")
    messages = [[{"role": "user", "content": p}] for p in prompts]
    outputs = {
        system: greedy_generate(
            loaded, system, messages, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        for system in ("base", "adapter")
    }
    return [
        {"prompt": p, "base": outputs["base"][i], "adapter": outputs["adapter"][i]}
        for i, p in enumerate(prompts)
    ]


Runners = dict[str, tuple[Loaded, System]]


def _perplexities(runners: Runners, encoded: dict[str, list]) -> dict[str, dict[str, Any]]:
    out = {}
    for system, sequences in encoded.items():
        loaded, mode = runners[system]
        with loaded.system(mode) as model:
            sums = nll_sums(model, sequences, device=loaded.device)
        tokens = sum(s.tokens for s in sums)
        out[system] = {
            "perplexity": metrics.perplexity(sum(s.nll for s in sums), tokens),
            "scored_tokens": tokens,
        }
    return out


def _eval_sft(
    loaded: Loaded,
    test: list[dict],
    shots: list[dict],
    max_new_tokens: int,
    batch_size: int,
    say: Callable[[str], None],
    original: Loaded | None = None,
) -> dict[str, Any]:
    """Score base, few-shot and adapter (and few-shot on ``original`` weights, when given)."""
    tokenizer = loaded.tokenizer
    runners: Runners = {s: (loaded, s) for s in ("base", "few_shot", "adapter")}
    if original is not None:
        runners["few_shot_original"] = (original, "few_shot")
    split = [split_conversation(row["messages"]) for row in test]
    prompts = [p for p, _ in split]
    references = [r for _, r in split]
    plain = [encode_conversation(tokenizer, row["messages"]) for row in test]
    encoded: dict[str, list] = {"base": plain, "adapter": plain}
    prompt_sets = {"base": prompts, "adapter": prompts}
    if shots:
        fs = [with_shots(shots, row["messages"]) for row in test]
        encoded["few_shot"] = [encode_conversation(tokenizer, m, first=f) for m, f in fs]
        prompt_sets["few_shot"] = [with_shots(shots, p)[0] for p in prompts]
        if original is not None:
            encoded["few_shot_original"] = encoded["few_shot"]
            prompt_sets["few_shot_original"] = prompt_sets["few_shot"]
    say(f"perplexity on {len(test)} test rows")
    systems = _perplexities(runners, encoded)
    outputs = {}
    for system, system_prompts in prompt_sets.items():
        say(f"generating {len(test)} answers: {system}")
        model, mode = runners[system]
        outputs[system] = greedy_generate(
            model, mode, system_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    primary = metrics.primary_metric(references)
    per_example: dict[str, list[float]] = {}
    for system, preds in outputs.items():
        em = [metrics.exact_match(p, r) for p, r in zip(preds, references, strict=True)]
        rl = [metrics.rouge_l(p, r) for p, r in zip(preds, references, strict=True)]
        f1 = [metrics.token_f1(p, r) for p, r in zip(preds, references, strict=True)]
        systems[system].update(
            exact_match=metrics.mean(em),
            rouge_l=metrics.mean(rl),
            token_f1=metrics.mean(f1),
            json_validity=metrics.json_validity(preds, references),
            **metrics.field_metrics(preds, references),
        )
        per_example[system] = em if primary == "exact_match" else rl
    examples = []
    for i, row in enumerate(test):
        last_user = next((m["content"] for m in reversed(prompts[i]) if m["role"] == "user"), "")
        examples.append(
            {
                "line": row["line"],
                "prompt": last_user,
                "reference": references[i],
                "outputs": {s: outputs[s][i] for s in outputs},
                "exact_match": {
                    s: metrics.exact_match(outputs[s][i], references[i]) for s in outputs
                },
                "rouge_l": {
                    s: round(metrics.rouge_l(outputs[s][i], references[i]), 4) for s in outputs
                },
                "token_f1": {
                    s: round(metrics.token_f1(outputs[s][i], references[i]), 4) for s in outputs
                },
            }
        )
    worst = sorted(
        range(len(test)),
        key=lambda i: (per_example["adapter"][i], examples[i]["rouge_l"]["adapter"], i),
    )
    return {
        "primary_metric": primary,
        "decoding": {
            "strategy": "greedy",
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "padding": "left",
        },
        "systems": systems,
        "metric_definitions": {
            k: METRIC_DEFINITIONS[k]
            for k in ("perplexity", "exact_match", "rouge_l", "token_f1", "json_validity")
            + (_FIELD_KEYS if any(metrics.is_json_output(r) for r in references) else ())
        },
        "worst_examples": [
            {
                "line": examples[i]["line"],
                "prompt": examples[i]["prompt"],
                "reference": examples[i]["reference"],
                "adapter": outputs["adapter"][i],
                "score": per_example["adapter"][i],
            }
            for i in worst[:WORST_EXAMPLES]
        ],
        "examples": examples,
        "_per_example": per_example,
        "_json_references": sum(metrics.is_json_output(r) for r in references),
    }


def _eval_preference(
    loaded: Loaded, test: list[dict], say: Callable[[str], None], *, method: str = "dpo",
    parent: bool = False,
) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    chosen = [
        encode_conversation(tokenizer, r["prompt"] + r["chosen"], first=len(r["prompt"]))
        for r in test
    ]
    rejected = [
        encode_conversation(tokenizer, r["prompt"] + r["rejected"], first=len(r["prompt"]))
        for r in test
    ]
    say(f"log-likelihood of {len(test)} preference pairs")
    logp: dict[str, dict[str, list[float]]] = {}
    systems: dict[str, dict[str, Any]] = {}
    for system in ("base", *(("parent",) if parent else ()), "adapter"):
        with loaded.system(system) as model:
            c = nll_sums(model, chosen, device=loaded.device)
            r = nll_sums(model, rejected, device=loaded.device)
        logp[system] = {"chosen": [-s.nll for s in c], "rejected": [-s.nll for s in r]}
        per_token = [
            float(-a.nll / max(a.tokens, 1) > -b.nll / max(b.tokens, 1))
            for a, b in zip(c, r, strict=True)
        ]
        tokens = sum(s.tokens for s in c)
        wins = [
            float(a > b)
            for a, b in zip(logp[system]["chosen"], logp[system]["rejected"], strict=True)
        ]
        margins = [
            a - b for a, b in zip(logp[system]["chosen"], logp[system]["rejected"], strict=True)
        ]
        systems[system] = {
            "preference_accuracy": metrics.mean(wins),
            "length_normalised_preference_accuracy": metrics.mean(per_token),
            "mean_margin": metrics.mean(margins),
            "perplexity": metrics.perplexity(sum(s.nll for s in c), tokens),
            "scored_tokens": tokens,
            "_wins": wins,
        }
    gains = [
        float((ca - cb) > (ra - rb))
        for ca, cb, ra, rb in zip(
            logp["adapter"]["chosen"],
            logp["base"]["chosen"],
            logp["adapter"]["rejected"],
            logp["base"]["rejected"],
            strict=True,
        )
    ]
    systems["adapter"]["reward_accuracy"] = metrics.mean(gains)
    systems["base"]["reward_accuracy"] = None
    if parent:  # the parent's own gain over the base, for comparison
        systems["parent"]["reward_accuracy"] = metrics.mean([
            float((pc - bc) > (pr - br))
            for pc, bc, pr, br in zip(logp["parent"]["chosen"], logp["base"]["chosen"],
                                      logp["parent"]["rejected"], logp["base"]["rejected"],
                                      strict=True)
        ])
    per_example = {s: systems[s].pop("_wins") for s in systems}
    order = sorted(range(len(test)), key=lambda i: (per_example["adapter"][i], i))
    return {
        "primary_metric": "preference_accuracy",
        "decoding": None,
        "systems": systems,
        "metric_definitions": {
            **{k: METRIC_DEFINITIONS[k] for k in (
                "perplexity", "preference_accuracy", "length_normalised_preference_accuracy")},
            "reward_accuracy": REWARD_ACCURACY_BY_METHOD.get(
                method, METRIC_DEFINITIONS["reward_accuracy"]),
        },
        "worst_examples": [
            {
                "line": test[i]["line"],
                "prompt": next(
                    (m["content"] for m in reversed(test[i]["prompt"]) if m.get("role") == "user"),
                    "",
                ),
                "reference": test[i]["chosen"][-1].get("content", ""),
                "adapter": "(prefers the rejected response)"
                if not per_example["adapter"][i]
                else "(prefers the chosen response)",
                "score": per_example["adapter"][i],
            }
            for i in order[:WORST_EXAMPLES]
        ],
        "examples": [
            {
                "line": test[i]["line"],
                "logp": {
                    s: {"chosen": logp[s]["chosen"][i], "rejected": logp[s]["rejected"][i]}
                    for s in logp
                },
            }
            for i in range(len(test))
        ],
        "_per_example": per_example,
    }
