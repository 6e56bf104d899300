"""ORPO and KTO: the preference methods beside DPO, on canonical preference rows and the 4-bit base.

- **ORPO** (odds-ratio preference optimisation, TRL's ``trl.experimental.orpo``): the SFT loss
  on the chosen response plus ``beta`` (ORPO's lambda) times a log-odds-ratio penalty that
  favours chosen over rejected. There is no reference model: it can start from the bare base,
  and with a ``parent`` it simply continues training that adapter.
- **KTO** (Kahneman-Tversky optimisation, ``trl.KTOTrainer``): unpaired examples, each a
  response labelled desirable or undesirable. Each preference row gives two: its chosen response
  (desirable) and its rejected one (undesirable), so desirable and undesirable are balanced and
  KTO's class weights stay 1. Like DPO, TRL keeps a frozen copy of the starting adapter as the
  reference (adapter ``ref``): the base for a fresh adapter, base + parent with a parent.

Both read the conversational rows as they are (TRL applies the chat template). Only the
``default`` adapter is published (`train.publish`).

Where the job ends: this module builds the trainers; `train.run` runs and publishes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.dpo import dpo_dataset, preference_trainer
from train.quant import QuantSpec
from train.recipe import Recipe


def kto_dataset(rows: Sequence[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of ``prompt``/``completion``/``label`` rows, two per pair."""
    from datasets import Dataset

    out = []
    for row in rows:
        prompt = [dict(m) for m in row["prompt"]]
        out.append({"prompt": prompt, "completion": [dict(m) for m in row["chosen"]],
                    "label": True})
        out.append({"prompt": prompt, "completion": [dict(m) for m in row["rejected"]],
                    "label": False})
    return Dataset.from_list(out)


def build_orpo_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    *,
    spec: QuantSpec,
    checkpoints: Path,
    callbacks: list,
    progress: bool = True,
) -> Any:
    """Build an ORPO trainer (arguments as `train.sft.build_sft_trainer`)."""
    with warnings.catch_warnings():  # "experimental" notice on import
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return preference_trainer(
        ORPOTrainer, ORPOConfig, recipe, model, tokenizer, dpo_dataset(train_rows),
        dpo_dataset(val_rows) if val_rows else None, spec=spec, checkpoints=checkpoints,
        callbacks=callbacks, progress=progress, max_completion_length=recipe.max_seq_len)


def build_kto_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    *,
    spec: QuantSpec,
    checkpoints: Path,
    callbacks: list,
    progress: bool = True,
) -> Any:
    """Build a KTO trainer (arguments as `train.sft.build_sft_trainer`)."""
    from trl import KTOConfig, KTOTrainer

    return preference_trainer(
        KTOTrainer, KTOConfig, recipe, model, tokenizer, kto_dataset(train_rows),
        kto_dataset(val_rows) if val_rows else None, spec=spec, checkpoints=checkpoints,
        callbacks=callbacks, progress=progress, precompute_ref_log_probs=False)
