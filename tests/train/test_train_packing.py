"""Packing (TRL's padding-free BFD) gives the loss unpacked batches give; NEFTune adds noise.

All eight train rows fit one optimizer step either way: unpacked as a padded batch of 8, packed
as one sequence whose ``position_ids`` restart at each row. With the rows' attention kept
apart, the first step's loss (before any update) is the same mean over the same assistant
tokens. Were rows attending to each other, the packed loss would differ by far more than the
tolerance.
"""

from __future__ import annotations

import math

import pytest

from hub.manifest import AdapterManifest
from tests.train.train_helpers import write_chat_data, write_recipe
from train.metrics import read_metrics
from train.recipe import load_recipe
from train.run import run

ONE_STEP = {"max_steps": 1, "batch_size": 8, "max_seq_len": 1024, "eval_steps": 0,
            "save_steps": 0, "logging_steps": 1}


def _first_loss(store, tmp_path, name: str, **fields) -> tuple[float, AdapterManifest]:
    data = write_chat_data(tmp_path / "chat.jsonl", rows=10)
    recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", data, tmp_path / name,
                                      **{**ONE_STEP, **fields}))
    result = run(recipe, store=store, progress=False)
    rows = [r for r in read_metrics(result.adapter_dir / "metrics.jsonl") if "loss" in r]
    return rows[0]["loss"], AdapterManifest.read(result.adapter_dir)


@pytest.mark.slow
def test_packed_loss_equals_unpacked_and_neftune_perturbs_it(store, tmp_path):
    unpacked, _ = _first_loss(store, tmp_path, "unpacked")
    packed, manifest = _first_loss(store, tmp_path, "packed", packing=True)
    assert math.isfinite(unpacked) and unpacked > 0
    assert packed == pytest.approx(unpacked, rel=2e-3)
    assert manifest.hyperparameters["packing"] is True
    noisy, manifest = _first_loss(store, tmp_path, "neftune", neftune_noise_alpha=5.0)
    assert math.isfinite(noisy) and noisy != pytest.approx(unpacked, rel=1e-6)
    assert manifest.hyperparameters["neftune_noise_alpha"] == 5.0
