"""Issue 4 acceptance: the card parses with huggingface_hub; every figure traces to a source."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hub.files import safetensors_header
from modelcards import write_card
from tests.modelcards.conftest import make_manifest

EVAL_LABELS = {
    "exact match": "exact_match",
    "ROUGE-L F1": "rouge_l",
    "JSON validity": "json_validity",
    "perplexity (assistant tokens)": "perplexity",
    "token F1": "token_f1",
    "JSON field accuracy": "field_accuracy",
    "JSON field precision": "field_precision",
    "JSON field recall": "field_recall",
}
SYSTEM_COLUMNS = {"base": "base", "few-shot base": "few_shot",
                  "few-shot base, original weights": "few_shot_original", "adapter": "adapter"}
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w])")


def _sections(text: str) -> dict[str, str]:
    body = text.split("\n---\n", 1)[1]
    parts = re.split(r"^## (.+)$", body, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _value(cell: str):
    cell = cell.strip("`")
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def _numbers(value) -> set[float]:
    found: set[float] = set()
    if isinstance(value, bool):
        return found
    if isinstance(value, int | float):
        found.add(float(value))
    elif isinstance(value, str):
        found.update(float(n) for n in NUMBER.findall(value))
    elif isinstance(value, dict):
        for item in value.values():
            found |= _numbers(item)
    elif isinstance(value, list):
        for item in value:
            found |= _numbers(item)
    return found


@pytest.fixture
def written(card_folder: Path, base_info):
    manifest = make_manifest(base_info)
    manifest.write(card_folder)
    result = write_card(card_folder, base_info)
    eval_doc = json.loads((card_folder / "eval.json").read_text())
    return result, manifest, eval_doc


def test_hyperparameters_table_leaves_out_empty_values(card_folder: Path, base_info) -> None:
    manifest = make_manifest(base_info)
    manifest.hyperparameters.update(license="", eval_prompts=[], card={}, max_grad_norm=None)
    manifest.write(card_folder)
    text = write_card(card_folder, base_info).path.read_text()
    table = _sections(text)["Training procedure"].split("### ")[1]
    hyper = {r[0]: r[1] for r in _rows(table)[1:]}
    assert {"license", "eval_prompts", "card"}.isdisjoint(hyper)
    assert hyper["max_grad_norm"] == "not recorded" and hyper["r"] == "8"
    assert "| Licence | Apache-2.0" in text  # the licence is the Licence row's


def test_card_loads_with_huggingface_hub_and_metadata_validates(written, base_info) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    result, manifest, eval_doc = written
    card = ModelCard.load(result.path)
    data = card.data
    assert data.base_model == base_info.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.get("base_model_relation") == "adapter"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0" and data.language == ["en"]
    assert {"loradock", "lora", "peft", "sft", "qlora", "json-extraction"} <= set(data.tags)
    assert data.get("draft") is False and "draft" not in data.tags
    # model-index parsed into EvalResult objects: the adapter's figures, rounded to 4 places.
    assert data.model_name == "json-extract"
    by_type = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    adapter = eval_doc["systems"]["adapter"]
    assert by_type[("local", "exact_match")] == round(adapter["exact_match"], 4)
    assert by_type[("local", "rouge")] == round(adapter["rouge_l"], 4)
    assert by_type[("local", "perplexity")] == round(adapter["perplexity"], 4)
    assert by_type[("loradock-general-text", "perplexity")] == round(
        eval_doc["forgetting"]["adapter_perplexity"], 4
    )
    # The metadata round-trips through ModelCardData without errors.
    again = ModelCardData(**data.to_dict())
    assert again.to_dict() == data.to_dict()
    assert manifest.intended_use in card.text


def test_every_figure_in_the_card_equals_the_manifest_and_eval_json(written, card_folder) -> None:
    result, manifest, eval_doc = written
    text = result.path.read_text()
    sections = _sections(text)

    data_rows = {r[0]: _value(r[1]) for r in _rows(sections["Training data"])}
    d = manifest.data
    assert data_rows["Source"] == d["source"] and data_rows["sha256"] == d["sha256"]
    assert data_rows["Format"] == d["format"]
    assert data_rows["Rows in"] == d["rows_in"] and data_rows["Rows kept"] == d["rows_kept"]
    for split, count in d["splits"].items():
        assert data_rows[f"Split {split}"] == count
    for reason, count in d["dropped"].items():
        assert data_rows[reason] == count
    for key, value in d["pii"].items():
        assert data_rows[key] == value

    procedure = sections["Training procedure"]
    tables = procedure.split("### ")
    hyper = {r[0]: _value(r[1]) for r in _rows(tables[1])[1:]}
    quant = {r[0]: _value(r[1]) for r in _rows(tables[2])[1:]}
    compute = {r[0]: _value(r[1]) for r in _rows(tables[3])[1:]}
    assert hyper == {k: v for k, v in manifest.hyperparameters.items() if v not in ("", [], {})}
    assert quant == manifest.quantization
    assert compute == manifest.compute

    evaluation = sections["Evaluation"]
    metric_table, sample_table = evaluation.split("Sample prompts")
    sample_rows = _rows(sample_table)[1:]
    flat = [[" ".join(s[k].split()) for k in ("prompt", "base", "adapter")]
            for s in eval_doc["samples"]]
    assert sample_rows == flat  # table cells hold the text with whitespace collapsed
    rows = _rows(metric_table)
    columns = [SYSTEM_COLUMNS[c] for c in rows[0][1:]]
    assert columns == ["base", "few_shot", "adapter"]
    seen = set()
    for label, *cells in rows[1:]:
        key = EVAL_LABELS[label]
        seen.add(key)
        for system, cell in zip(columns, cells, strict=True):
            expected = eval_doc["systems"][system][key]
            if expected is None:
                assert cell == "n/a"
            else:
                assert float(cell) == pytest.approx(expected, abs=5e-5)
    assert seen == set(EVAL_LABELS.values())
    assert eval_doc["verdict"]["sentence"] in evaluation
    assert eval_doc["forgetting"]["sentence"] in evaluation

    # Reverse direction: no number in these sections comes from anywhere else. The verdict and
    # forgetting sentences are eval.json strings (checked above); "4-bit" is the quantisation.
    scanned = "\n".join(sections[s] for s in ("Training data", "Training procedure", "Evaluation"))
    for sentence in (eval_doc["verdict"]["sentence"], eval_doc["verdict"]["rule"],
                     eval_doc["forgetting"]["sentence"]):
        scanned = scanned.replace(sentence, "")
    scanned = re.sub(r"`[0-9a-f]{64}`", "", scanned).replace("4-bit", "")
    allowed = _numbers(manifest.to_dict()) | _numbers(eval_doc)
    allowed |= {round(v, 4) for v in allowed}
    tokens = NUMBER.findall(scanned)
    assert len(tokens) > 30  # the scan really covers the tables
    for token in tokens:
        assert float(token) in allowed, f"card figure {token} is not in the manifest or eval.json"

    details = {r[0]: r[1] for r in _rows(sections["Model details"])}
    config = json.loads((card_folder / "adapter_config.json").read_text())
    header = safetensors_header(card_folder / "adapter_model.safetensors")
    lora_params = sum(math.prod(m["shape"]) for k, m in header.items() if "lora_" in k)
    assert details["LoRA rank r"] == str(config["r"])
    assert details["LoRA alpha"] == str(config["lora_alpha"])
    assert details["LoRA parameters"].startswith(f"{lora_params} ")


def test_eu_ai_act_figures_are_computed_from_the_run(written, base_info) -> None:
    result, manifest, _ = written
    text = result.path.read_text()
    base_flops = 6 * base_info.num_parameters * base_info.training_tokens
    ratio = manifest.compute["estimated_flops"] / base_flops
    assert f"{manifest.compute['estimated_flops']:.2e} FLOP" in result.role_sentence
    assert f"{base_flops:.2e} FLOP" in result.role_sentence
    assert f"{ratio:.2e} times" in result.role_sentence
    assert "not presumed to be the provider" in result.role_sentence
    assert result.role_sentence in text
    assert f"N = {base_info.num_parameters:,} parameters" in text  # the 6ND assumption, stated
    kwh = manifest.compute["wall_time_s"] * 65.0 / 3.6e6
    assert f"= {kwh:.2e} kWh" in text and "65 W" in text
    sections = _sections(text)["EU AI Act notes"]
    for heading in ("1.1 Provider identification", "2.1 Publicly available datasets",
                    "2.3 Data crawled and scraped from online sources",
                    "3.1 Respect of reservation of rights", "3.2 Removal of illegal content"):
        assert heading in sections
    assert "Art. 50(1)" in sections and "smollm2+json-extract" in sections
    assert "Only data written by our team" in sections  # card.copyright_policy
