"""ORPO and KTO on the real base (2 steps each), evaluated; trackers, optim fallback, DoRA record.

Each run does double duty to keep the module short: the ORPO run also logs to TensorBoard and
asks for a CUDA-only optimizer on CPU; the KTO run also logs to MLflow (a local file store).
"""

from __future__ import annotations

import math

import pytest

from hub.manifest import AdapterManifest
from tests.train.train_helpers import write_preference_data, write_recipe
from train.eval import run_eval
from train.metrics import read_metrics
from train.recipe import load_recipe
from train.run import run

SMALL = {"max_steps": 2, "eval_steps": 0, "save_steps": 0, "max_seq_len": 64,
         "learning_rate": 5e-4, "few_shot_k": 0}


def _losses(adapter_dir) -> list[dict]:
    return [r for r in read_metrics(adapter_dir / "metrics.jsonl") if "loss" in r]


def _evaluate(result, tmp_path) -> dict:
    doc = run_eval(result.adapter_dir, result.base, result.data_dir, max_examples=3,
                   forgetting_texts=1, out_dir=tmp_path / "eval").doc
    assert doc["kind"] == "preference" and doc["method"] == result.manifest.method
    assert 0.0 <= doc["systems"]["adapter"]["preference_accuracy"] <= 1.0
    assert doc["systems"]["adapter"]["length_normalised_preference_accuracy"] is not None
    return doc


@pytest.mark.slow
def test_orpo_trains_with_tensorboard_and_evaluates(store, tmp_path, monkeypatch):
    data = write_preference_data(tmp_path / "pref.jsonl")
    recipe = load_recipe(write_recipe(
        tmp_path / "recipe.yaml", data, tmp_path / "orpo", method="orpo",
        report_to="tensorboard", optim="paged_adamw_8bit", **SMALL))
    result = run(recipe, store=store, progress=False)

    manifest = AdapterManifest.read(result.adapter_dir)
    assert manifest.method == "orpo"
    rows = _losses(result.adapter_dir)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert any(k.startswith("log_odds") or "odds" in k for k in rows[-1])  # ORPO's own term
    # CPU: the paged 8-bit optimizer falls back to adamw_torch, said and recorded.
    assert manifest.compute["optimizer"]["used"] == "adamw_torch"
    assert "needs CUDA" in manifest.compute["optimizer"]["note"]
    assert any("needs CUDA" in n for n in result.notes)
    # TensorBoard event files beside the adapter folder; the manifest says where (relative).
    tracking = manifest.extra["tracking"]
    assert tracking == {"report_to": "tensorboard", "location": "orpo.tracking/tensorboard"}
    events = list((tmp_path / "orpo.tracking" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    doc = _evaluate(result, tmp_path)
    assert "ORPO" in doc["metric_definitions"]["reward_accuracy"]


@pytest.mark.slow
def test_kto_trains_with_mlflow_and_evaluates(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_preference_data(tmp_path / "pref.jsonl")
    recipe = load_recipe(write_recipe(
        tmp_path / "recipe.yaml", data, tmp_path / "kto", method="kto", report_to="mlflow",
        **SMALL))
    result = run(recipe, store=store, progress=False)

    manifest = AdapterManifest.read(result.adapter_dir)
    assert manifest.method == "kto"
    rows = _losses(result.adapter_dir)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert "kl" in rows[-1]  # KTO's KL estimate of the reference
    # MLflow: a local file store with this run's metrics, located in the manifest.
    tracking = manifest.extra["tracking"]
    assert tracking["report_to"] == "mlflow" and tracking["location"] == "kto.tracking/mlflow"
    assert tracking["run_id"]
    store_dir = tmp_path / "kto.tracking" / "mlflow"
    metric_files = [p for p in store_dir.rglob("metrics/*") if p.is_file()]
    assert any(p.name == "loss" for p in metric_files), sorted(p.name for p in metric_files)
    assert any(tracking["run_id"] in str(p) for p in metric_files)
    doc = _evaluate(result, tmp_path)
    assert "KTO" in doc["metric_definitions"]["reward_accuracy"]


def test_dora_is_recorded_as_merged_export_only(base_info, tmp_path) -> None:
    from train.publish import build_manifest
    from train.quant import QuantSpec, lora_config
    from train.recipe import build_recipe

    assert lora_config(8, 16, 0.0, "all-linear", use_dora=True).use_dora is True
    data = write_preference_data(tmp_path / "pref.jsonl")
    spec = QuantSpec.for_device("cpu")
    for use_dora in (True, False):
        recipe = build_recipe({"data": str(data), "output": "o", "use_dora": use_dora})
        manifest = build_manifest(recipe, base_info, spec, data_report={}, compute={},
                                  parent=None)
        serving = manifest.extra.get("serving")
        if use_dora:
            assert serving["served_by"].startswith("merged exports only")
            assert "refuses" in serving["server"]
        else:
            assert serving is None
