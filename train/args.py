"""Recipe fields -> the trainer arguments every method shares (a plain dict for their configs).

Everything TRL would otherwise default differently by device is set explicitly here: TRL 1.16
turns ``bf16`` and ``gradient_checkpointing`` on by default even on CPU, so both come from the
device and the recipe. Checkpoints go to the run's work folder, never into the adapter folder.

Optimizer (`resolve_optim`): ``adamw_torch`` runs everywhere; ``adamw_8bit``,
``paged_adamw_8bit`` and ``paged_adamw_32bit`` are bitsandbytes optimizers for CUDA (8-bit
states; paged states move to CPU memory under GPU memory pressure). On CPU the nearest one that
runs there is ``adamw_torch`` (the same AdamW update with 32-bit states); the run says so and
the manifest records both names.

Tracking (`tracking`): ``report_to`` goes to transformers' own integrations, configured through
their environment variables for the length of the run, in ``OUTPUT.tracking/<tool>/`` beside the
adapter folder (the work folder is removed after a run, the adapter folder is published):
TensorBoard event files (``TENSORBOARD_LOGGING_DIR``); MLflow in a local file store
(``MLFLOW_TRACKING_URI=file:...``; MLflow 3 keeps that store in maintenance mode, so
``MLFLOW_ALLOW_FILE_STORE=true`` opts in) unless ``MLFLOW_TRACKING_URI`` is already set (e.g.
``sqlite:///mlflow.db`` or a server; the manifest then records it, credentials removed); Weights &
Biases offline (``WANDB_MODE=offline``, ``WANDB_DIR``) unless ``WANDB_MODE`` is already set.

Where the job ends: this module only maps values. The method-specific arguments (``max_length``
and ``assistant_only_loss`` for SFT, ``beta`` for DPO) are added by `train.sft` and `train.dpo`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.quant import QuantSpec
from train.recipe import Recipe

CUDA_OPTIMS = frozenset({"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"})
TRACKING_SUFFIX = ".tracking"


def resolve_optim(optim: str, device: str) -> tuple[str, str | None]:
    """The optimizer to use on ``device`` and a note when it differs from the recipe's.

    Returns:
        ``(optimizer name for TrainingArguments, note or None)``.
    """
    if optim in CUDA_OPTIMS and device != "cuda":
        return "adamw_torch", (
            f"optim {optim!r} needs CUDA (bitsandbytes 8-bit/paged optimizer states); on "
            f"{device} the run uses 'adamw_torch', the same AdamW update with 32-bit states"
        )
    return optim, None


@dataclass
class Tracking:
    """Where a run's experiment tracker writes (`tracking`).

    Attributes:
        tool: ``none``, ``tensorboard``, ``mlflow`` or ``wandb``.
        folder: Local folder of its files (None for none, or a remote MLflow server).
        env: The environment variables set for the run.
        record: What the manifest stores (locations relative to the adapter's parent folder,
            no absolute local paths).
    """

    tool: str
    folder: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


# The package each tracker's transformers integration needs (any one of them), and its install.
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboardX", "tensorboard"), "pip install tensorboardX"),
    "mlflow": (("mlflow",), "pip install mlflow-skinny"),
    "wandb": (("wandb",), "pip install wandb"),
}


def tracking(report_to: str, output: Path) -> Tracking:
    """The tracker settings for a run whose adapter folder is ``output``.

    Raises:
        InvalidInput: The tracker's package is not installed (before any model is loaded).
    """
    if report_to == "none":
        return Tracking("none", record={"report_to": "none"})
    import importlib.util

    packages, install = TRACKER_PACKAGES[report_to]
    if not any(importlib.util.find_spec(name) for name in packages):
        from hub.errors import InvalidInput

        raise InvalidInput(
            f"report_to: {report_to!r} needs the {packages[0]} package, which is not installed",
            fix=f"Run `{install}`, or set report_to: none.", param="report_to",
        )
    output = Path(output)
    folder = output.parent / f"{output.name}{TRACKING_SUFFIX}" / report_to
    relative = f"{output.name}{TRACKING_SUFFIX}/{report_to}"
    record: dict[str, Any] = {"report_to": report_to, "location": relative}
    env: dict[str, str] = {}
    if report_to == "tensorboard":
        env["TENSORBOARD_LOGGING_DIR"] = str(folder.resolve())
    elif report_to == "mlflow":
        if os.environ.get("MLFLOW_TRACKING_URI"):
            folder = None
            record["location"] = _without_credentials(os.environ["MLFLOW_TRACKING_URI"])
        else:
            env["MLFLOW_TRACKING_URI"] = folder.resolve().as_uri()
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked.
            env["MLFLOW_ALLOW_FILE_STORE"] = os.environ.get("MLFLOW_ALLOW_FILE_STORE") or "true"
            record["store"] = "local file store"
        env.setdefault("MLFLOW_EXPERIMENT_NAME", os.environ.get("MLFLOW_EXPERIMENT_NAME")
                       or f"loradock-{output.name}")
        record["experiment"] = env["MLFLOW_EXPERIMENT_NAME"]
    elif report_to == "wandb":
        env["WANDB_MODE"] = os.environ.get("WANDB_MODE") or "offline"
        env["WANDB_DIR"] = str(folder.resolve())
        record["mode"] = env["WANDB_MODE"]
    return Tracking(report_to, folder, env, record)


def _without_credentials(uri: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password or parts.username:
        netloc = parts.hostname or ""
        netloc += f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


@contextlib.contextmanager
def tracking_env(track: Tracking) -> Iterator[None]:
    """Set ``track.env`` for the block (the integrations read it), then restore the old values."""
    old = {k: os.environ.get(k) for k in track.env}
    if track.folder is not None:
        track.folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(track.env)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def common_args(
    recipe: Recipe, spec: QuantSpec, checkpoints: Path, *, progress: bool,
    has_validation: bool = True,
) -> dict:
    """Return keyword arguments for the method's TRL config from the recipe.

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
        "report_to": recipe.report_to,
        "run_name": Path(recipe.output).name or None,
        "optim": resolve_optim(recipe.optim, spec.device)[0],
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
