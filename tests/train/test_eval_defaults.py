"""Evaluation defaults read from the manifest: the device training used and the recipe's seed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.eval.run import _eval_device, _recorded_seed


def _manifest(device: str | None = None, seed: object = None) -> SimpleNamespace:
    return SimpleNamespace(compute={"device": device} if device else {},
                           hyperparameters={"seed": seed} if seed is not None else {})


@pytest.mark.parametrize(
    ("asked", "trained", "expected"),
    [
        ("cuda:1", "cpu", ("cuda:1", "as asked")),
        (None, "cpu", ("cpu", "as in training")),
        (None, None, ("cpu", "as in training")),
        # No CUDA on this machine: a GPU-trained adapter is evaluated on CPU, and says so.
        (None, "cuda", ("cpu", "training used cuda; no CUDA device here, so cpu")),
    ],
)
def test_eval_device(asked, trained, expected) -> None:
    import torch

    if trained == "cuda" and torch.cuda.is_available():
        expected = ("cuda", "as in training")
    assert _eval_device(asked, _manifest(trained)) == expected
    assert _eval_device(None, None) == ("cpu", "as in training")


@pytest.mark.parametrize(("seed", "expected"), [(7, 7), (0, 0), (None, 0), ("7", 0), (True, 0)])
def test_few_shot_seed_comes_from_the_recipe(seed, expected) -> None:
    assert _recorded_seed(_manifest(seed=seed)) == expected
    assert _recorded_seed(None) == 0
