"""Preference tuning: canonical preference rows -> a TRL ``DPOTrainer`` on the 4-bit base.

The policy is a LoRA over the quantised base: a fresh one, or a parent adapter (e.g. an SFT
adapter from the hub) loaded trainable. TRL then keeps a frozen copy of the starting adapter as
the reference (adapter ``ref``), so the reference model is "base + parent", not the bare base;
for a fresh adapter the copy is a zero update, i.e. the base. Only the ``default`` adapter is
published (`train.run` saves with ``selected_adapters=["default"]``).

Where the job ends: this module builds the trainer; `train.run` runs and publishes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.args import common_args, early_stopping_callbacks
from train.quant import QuantSpec, match_adapter_dtype
from train.recipe import Recipe


def dpo_dataset(rows: Sequence[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of conversational ``prompt``/``chosen``/``rejected`` rows."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in r["prompt"]],
                "chosen": [dict(m) for m in r["chosen"]],
                "rejected": [dict(m) for m in r["rejected"]],
            }
            for r in rows
        ]
    )


def build_dpo_trainer(
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
    """Build a ``DPOTrainer`` for a LoRA-wrapped 4-bit model (arguments as `build_sft_trainer`).

    Returns:
        The trainer, ready for ``train()``.
    """
    from trl import DPOConfig, DPOTrainer

    return preference_trainer(
        DPOTrainer, DPOConfig, recipe, model, tokenizer, dpo_dataset(train_rows),
        dpo_dataset(val_rows) if val_rows else None, spec=spec, checkpoints=checkpoints,
        callbacks=callbacks, progress=progress, precompute_ref_log_probs=False)


def preference_trainer(trainer_cls: Any, config_cls: Any, recipe: Recipe, model: Any,
                       tokenizer: Any, train_dataset: Any, eval_dataset: Any, *,
                       spec: QuantSpec, checkpoints: Path, callbacks: list, progress: bool,
                       **config_extra: Any) -> Any:
    """One TRL preference trainer (DPO, ORPO, KTO) on the recipe's shared settings.

    ``config_extra`` holds what only that method's config takes.
    """
    validate = eval_dataset is not None
    args = common_args(recipe, spec, checkpoints, progress=progress, has_validation=validate)
    config = config_cls(**args, max_length=recipe.max_seq_len, beta=recipe.beta,
                        dataset_num_proc=None, **config_extra)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[*callbacks, *early_stopping_callbacks(recipe, has_validation=validate)],
    )
    match_adapter_dtype(trainer.model, spec)
    return trainer
