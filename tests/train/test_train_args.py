"""Recipe fields for optimizers, trackers, packing, NEFTune and methods (pure logic, no model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hub.errors import InvalidInput
from train.args import resolve_optim, tracking, tracking_env
from train.recipe import build_recipe


@pytest.mark.parametrize(
    ("optim", "device", "used", "noted"),
    [
        ("adamw_torch", "cpu", "adamw_torch", False),
        ("adamw_torch", "cuda", "adamw_torch", False),
        ("adamw_8bit", "cuda", "adamw_8bit", False),
        ("paged_adamw_8bit", "cuda", "paged_adamw_8bit", False),
        ("paged_adamw_32bit", "cuda", "paged_adamw_32bit", False),
        ("adamw_8bit", "cpu", "adamw_torch", True),
        ("paged_adamw_8bit", "cpu", "adamw_torch", True),
        ("paged_adamw_32bit", "cpu", "adamw_torch", True),
    ],
)
def test_resolve_optim(optim: str, device: str, used: str, noted: bool) -> None:
    got, note = resolve_optim(optim, device)
    assert got == used
    assert (note is not None) is noted
    if noted:
        assert optim in note and "needs CUDA" in note and "adamw_torch" in note


def test_tracking_locations_are_relative_and_env_is_restored(tmp_path: Path, monkeypatch):
    import train.args

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # wandb is not installed here; its settings are what is tested (json stands in for it).
    monkeypatch.setitem(train.args.TRACKER_PACKAGES, "wandb", (("json",), "pip install wandb"))
    out = tmp_path / "runs" / "demo"
    assert tracking("none", out).record == {"report_to": "none"}
    tb = tracking("tensorboard", out)
    assert tb.record == {"report_to": "tensorboard", "location": "demo.tracking/tensorboard"}
    assert tb.env["TENSORBOARD_LOGGING_DIR"] == str((out.parent / "demo.tracking" /
                                                     "tensorboard").resolve())
    ml = tracking("mlflow", out)
    assert ml.env["MLFLOW_TRACKING_URI"].startswith("file://")
    assert ml.env["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert ml.record["store"] == "local file store" and ml.record["experiment"] == "loradock-demo"
    wb = tracking("wandb", out)
    assert wb.env["WANDB_MODE"] == "offline" and wb.record["mode"] == "offline"
    with tracking_env(ml):
        assert os.environ["MLFLOW_TRACKING_URI"] == ml.env["MLFLOW_TRACKING_URI"]
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert (out.parent / "demo.tracking" / "mlflow").is_dir()
    # A configured server wins, and the manifest never gets its credentials.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example:5000/x")
    remote = tracking("mlflow", out)
    assert remote.record["location"] == "https://mlflow.example:5000/x"
    assert "MLFLOW_TRACKING_URI" not in remote.env and remote.folder is None
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking("wandb", out).env["WANDB_MODE"] == "online"


@pytest.fixture
def pref(tmp_path: Path) -> Path:
    path = tmp_path / "pref.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n')
    return path


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"optim": "sgd"}, "optim: 'sgd' is not one of 'adamw_torch'"),
        ({"report_to": "comet"}, "report_to: 'comet' is not one of 'none'"),
        ({"method": "ppo"}, "method: 'ppo' is not one of 'sft', 'dpo', 'orpo', 'kto'"),
        ({"method": "dpo", "packing": True}, "packing: True applies to method: sft only"),
        ({"method": "kto", "neftune_noise_alpha": 5}, "neftune_noise_alpha: 5.0 applies to"),
        ({"neftune_noise_alpha": 0}, "neftune_noise_alpha: 0.0 must be > 0 or null"),
        ({"min_answer_tokens": 0}, "min_answer_tokens: 0 must be >= 1"),
    ],
)
def test_recipe_refuses(pref: Path, fields: dict, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        build_recipe({"data": str(pref), "output": "o", **fields})
    assert problem in info.value.message


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo", "kto"])
def test_recipe_accepts(pref: Path, method: str) -> None:
    extra = {"packing": True, "neftune_noise_alpha": 5} if method == "sft" else {}
    recipe = build_recipe({"data": str(pref), "output": "o", "method": method,
                           "optim": "paged_adamw_8bit", "report_to": "mlflow",
                           "use_dora": True, **extra})
    assert recipe.method == method and recipe.optim == "paged_adamw_8bit"


def test_a_missing_tracker_package_is_named_with_the_fix(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InvalidInput) as info:
        tracking("wandb", tmp_path / "out")
    assert info.value.param == "report_to" and "pip install wandb" in info.value.fix
