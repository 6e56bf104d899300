"""Recipe fields -> the trainer arguments SFT and DPO share (a plain dict for their configs).

Everything TRL would otherwise default differently by device is set explicitly here: TRL 1.16
turns ``bf16`` and ``gradient_checkpointing`` on by default even on CPU, so both come from the
device and the recipe. Checkpoints go to the run's work folder, never into the adapter folder.

Where the job ends: this module only maps values. The method-specific arguments (``max_length``
and ``assistant_only_loss`` for SFT, ``beta`` for DPO) are added by `train.sft` and `train.dpo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.quant import QuantSpec
from train.recipe import Recipe


def common_args(
    recipe: Recipe, spec: QuantSpec, checkpoints: Path, *, progress: bool,
    has_validation: bool = True,
) -> dict:
    """Return keyword arguments for ``SFTConfig``/``DPOConfig`` from the recipe.

    Args:
        recipe: The validated recipe.
        spec: Device and compute dtype.
        checkpoints: Folder for ``checkpoint-N`` (the trainer's ``output_dir``).
        progress: Show tqdm progress bars.
        has_validation: False when the validation split is empty: no evaluation, no early
            stopping, no best-model reload.
    """
    evaluate = recipe.eval_steps > 0 and has_validation
    save = recipe.save_steps > 0
    early = recipe.early_stopping_patience > 0 and has_validation
    args: dict[str, Any] = {
        "output_dir": str(checkpoints),
        "per_device_train_batch_size": recipe.batch_size,
        "per_device_eval_batch_size": recipe.batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation,
        "learning_rate": recipe.learning_rate,
        "num_train_epochs": recipe.epochs,
        "max_steps": recipe.max_steps if recipe.max_steps > 0 else -1,
        # transformers 5: a float < 1 is a ratio of the total steps, else a number of steps.
        "warmup_steps": recipe.warmup if recipe.warmup < 1 else int(recipe.warmup),
        "lr_scheduler_type": recipe.lr_schedule,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.max_grad_norm,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "bf16": spec.compute_dtype == "bfloat16",
        "fp16": False,
        "use_cpu": spec.device == "cpu",
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "logging_steps": recipe.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": recipe.eval_steps if evaluate else None,
        "save_strategy": "steps" if save else "no",
        "save_steps": recipe.save_steps if save else 500,
        "save_total_limit": recipe.save_total_limit or None,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "disable_tqdm": not progress,
        "remove_unused_columns": True,
    }
    return args


def early_stopping_callbacks(recipe: Recipe, *, has_validation: bool = True) -> list:
    """The early-stopping callback when the recipe asks for it and there is a validation split."""
    if recipe.early_stopping_patience <= 0 or not has_validation:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience)]
