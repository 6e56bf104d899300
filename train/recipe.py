"""The training recipe: every field, its type, default and help text, in one place.

A recipe is a YAML file whose first line is a comment with the command that runs it::

    # loradock train examples/json-extract/recipe.yaml
    data: data.jsonl
    r: 16
    ...

`load_recipe` reads it, applies ``--set key=value`` overrides (values parsed as YAML, so
``--set r=8``, ``--set target_modules=[q_proj,v_proj]``) and validates the result. Validation
collects every problem and raises one `hub.errors.InvalidInput` listing them all, each naming the
field (which is also the ``--set`` key) and the bad value.

A mapping field (``card``) takes ``--set card.KEY=VALUE`` for one key.

Paths: ``data`` is relative to the recipe file's folder, ``output`` to the current directory.

Where the job ends: this module parses and checks values. It reads no dataset and loads no model;
turning fields into TRL/PEFT arguments is `train.sft`, `train.dpo` and `train.quant`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hub.errors import InvalidInput, InvalidName
from hub.names import parse_adapter_ref, validate_name
from train.data import FormatChoice, PiiPolicy
from train.data.hub_source import is_hub_dataset, parse_hub_dataset

Method = Literal["sft", "dpo", "orpo", "kto"]
Optim = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
Tracker = Literal["none", "tensorboard", "mlflow", "wandb"]
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
Schedule = Literal["cosine", "linear", "constant"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]


def _f(default: Any, help_: str) -> Any:
    """A dataclass field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


@dataclass
class Recipe:
    """One training run. Field help is in each field's metadata (see `field_help`)."""

    # -- what to train --------------------------------------------------------------------
    data: str = _f(
        "",
        "Dataset file (JSONL, JSON, CSV or Parquet), relative to the recipe's folder, or a Hub "
        "dataset hf://datasets/ORG/NAME[@REV][/FILE] (its commit sha is recorded).",
    )
    base: str = _f("smollm2", "Base model name in the hub.")
    method: Method = _f(
        "sft",
        "sft: supervised fine-tuning; dpo: preference pairs (DPO, a frozen reference); orpo: "
        "preference pairs, SFT loss plus an odds-ratio penalty, no reference model; kto: "
        "preference pairs unpaired into desirable/undesirable examples (KTO).",
    )
    format: FormatChoice = _f("auto", "Dataset format; auto detects it from the keys.")
    parent: str | None = _f(
        None, "Adapter NAME[@V] in the hub to start from (e.g. DPO on an SFT adapter)."
    )
    output: str = _f("", "Adapter folder to write (relative to the current directory).")
    overwrite: bool = _f(False, "Replace an existing output folder.")
    # -- data preparation -----------------------------------------------------------------
    pii: PiiPolicy = _f("redact", "Rows with personal data: drop, redact or keep.")
    splits: list[float] = _f([0.8, 0.1, 0.1], "Train/validation/test fractions.")
    min_answer_tokens: int = _f(
        1, "Rows with an answer shorter than this many tokens are dropped (1: only empty ones)."
    )
    system_prompt: str = _f(
        "", "System message added to conversations that have none (recorded on the card)."
    )
    # -- LoRA -----------------------------------------------------------------------------
    r: int = _f(16, "LoRA rank.")
    alpha: float = _f(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = _f(0.05, "LoRA dropout.")
    target_modules: list[str] | str = _f(
        "all-linear", "Modules that get LoRA: a list (q_proj, v_proj, ...) or all-linear."
    )
    use_dora: bool = _f(
        False,
        "Train DoRA (weight-decomposed LoRA). The server refuses DoRA adapters; only merged "
        "exports (loradock export merged/gguf) can serve them, and the manifest says so.",
    )
    # -- optimisation ---------------------------------------------------------------------
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    optim: Optim = _f(
        "adamw_torch",
        "Optimizer: adamw_torch, adamw_8bit, paged_adamw_8bit or paged_adamw_32bit "
        "(bitsandbytes; 8-bit and paged need CUDA; on CPU the run uses adamw_torch and says so).",
    )
    epochs: float = _f(1.0, "Passes over the train split (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run; 0 means use epochs.")
    batch_size: int = _f(4, "Rows per device step.")
    gradient_accumulation: int = _f(1, "Device steps per optimizer step.")
    max_seq_len: int = _f(512, "Token limit per row; longer rows are dropped by the data check.")
    warmup: float = _f(0.05, "Warm-up: a ratio of all steps if < 1, else a number of steps.")
    lr_schedule: Schedule = _f("cosine", "Learning-rate schedule after warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    gradient_checkpointing: bool = _f(False, "Recompute activations to save memory (slower).")
    assistant_only_loss: bool = _f(True, "SFT loss on assistant tokens only.")
    packing: bool = _f(
        False,
        "SFT: pack rows into max_seq_len sequences without padding (TRL's padding-free "
        "best-fit packing; attention stays within each row).",
    )
    neftune_noise_alpha: float | None = _f(
        None, "NEFTune: noise added to embeddings during SFT (e.g. 5); null disables it."
    )
    beta: float = _f(
        0.1,
        "Preference strength: DPO/KTO beta (pull towards the reference model); ORPO's lambda "
        "(weight of the odds-ratio term).",
    )
    seed: int = _f(0, "Seed for the split, LoRA init and data order.")
    threads: int = _f(0, "Torch CPU threads; 0 picks the default (see train.threads).")
    compute_dtype: ComputeDtype = _f(
        "auto",
        "Compute dtype of the 4-bit base: auto (CUDA: bfloat16; CPU: the faster of float32 and "
        "bfloat16, measured once per machine and recorded), float32 or bfloat16.",
    )
    report_to: Tracker = _f(
        "none",
        "Experiment tracker: tensorboard (event files in OUTPUT.tracking/tensorboard), mlflow "
        "(a local file store in OUTPUT.tracking/mlflow unless MLFLOW_TRACKING_URI is set) or "
        "wandb (offline in OUTPUT.tracking/wandb unless WANDB_MODE is set); the manifest "
        "records where.",
    )
    # -- validation, early stopping, checkpoints ------------------------------------------
    logging_steps: int = _f(5, "Log train loss every N optimizer steps.")
    eval_steps: int = _f(25, "Validation loss every N optimizer steps; 0 disables it.")
    early_stopping_patience: int = _f(
        0,
        "Stop after N validations without a lower validation loss, keeping the best checkpoint; "
        "0 disables it.",
    )
    save_steps: int = _f(25, "Checkpoint every N optimizer steps (for --resume); 0 disables it.")
    save_total_limit: int = _f(2, "Checkpoints kept (the best one is kept as well).")
    keep_checkpoints: bool = _f(False, "Keep the checkpoints folder after a successful run.")
    # -- evaluation after training --------------------------------------------------------
    few_shot_k: int = _f(3, "Examples from train given to the few-shot baseline.")
    max_eval_examples: int | None = _f(None, "Test rows evaluated; null means all.")
    max_new_tokens: int = _f(128, "Generation limit during evaluation.")
    eval_prompts: list[str] = _f([], "Prompts whose base/adapter outputs the model card shows.")
    # -- model card (manifest top level; the rest of the card under ``card``) --------------
    intended_use: str = _f("", "What the adapter is for (model card).")
    out_of_scope_use: str = _f("", "What it must not be used for (model card).")
    license: str = _f("", "SPDX licence id of the adapter; empty: the base's licence (its "
                      "terms bind the adapter), apache-2.0 when the base records none.")
    card: dict[str, Any] = _f(
        {},
        "More model-card fields, copied verbatim into the manifest (language, provider, "
        "release, copyright_policy, data_sources, ...; modelcards/fields.py documents them). "
        "Override one with --set card.KEY=VALUE.",
    )

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (what the manifest records as hyperparameters)."""
        return dataclasses.asdict(self)

    def card_fields(self) -> dict[str, Any]:
        """The ``card`` mapping as the manifest stores it (``extra["card"]``)."""
        return dict(self.card)

    @property
    def warmup_steps(self) -> int:
        """Warm-up as a number of steps (0 when ``warmup`` is a ratio)."""
        return int(self.warmup) if self.warmup >= 1 else 0

    @property
    def warmup_ratio(self) -> float:
        """Warm-up as a ratio (0 when ``warmup`` is a number of steps)."""
        return float(self.warmup) if self.warmup < 1 else 0.0


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Recipe)}
# Names other tools use for the same thing, suggested when a recipe uses them.
ALIASES = {
    "lr": "learning_rate", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "max_seq_length": "max_seq_len", "max_length": "max_seq_len",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps":
    "gradient_accumulation", "warmup_ratio": "warmup", "warmup_steps": "warmup",
    "lr_scheduler_type": "lr_schedule", "output_dir": "output", "dataset": "data",
    "model": "base", "base_model": "base",
}
_HINTS = typing.get_type_hints(Recipe)


def field_help() -> dict[str, str]:
    """Return ``{field: help}`` for every recipe field (for docs and ``--help``)."""
    return {name: f.metadata["help"] for name, f in FIELDS.items()}


# -- type checking ----------------------------------------------------------------------------


def _check_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, coerced value) for ``value`` against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, coerced = _check_type(value, option)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return ok, dict(value) if ok else value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, coerced = _check_type(v, item)
            if not ok:
                return False, value
            out.append(coerced)
        return True, out
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as text
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping of field: value"
    if hint is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "text"}.get(
        hint, str(hint)
    )


# -- loading ----------------------------------------------------------------------------------


def _yaml(text: str) -> Any:
    """Parse YAML safely, keeping dates as text (``release: 2025-12-01`` stays a string)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Parse ``key=value`` strings (values as YAML) into a dict; return it and the problems."""
    import yaml

    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"--set {item!r}: expected key=value (e.g. --set r=8)")
            continue
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        head, dot, sub = key.partition(".")
        if dot and typing.get_origin(_HINTS.get(head)) is dict and sub:
            values.setdefault(head, {})[sub] = value  # --set card.provider=ACME
            continue
        hint = _HINTS.get(key)
        if hint is not None and not _check_type(value, hint)[0] and _check_type(raw, hint)[0]:
            value = raw  # e.g. --set intended_use=JSON: extraction is text, not a mapping
        values[key] = value
    return values, problems


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply ``--set`` overrides and validate it.

    Args:
        path: The recipe file.
        overrides: ``key=value`` strings; they win over the file.

    Returns:
        The recipe, with ``data`` made absolute (relative to the recipe's folder).

    Raises:
        InvalidInput: Unreadable file, or every problem found, one per line.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        raw = _yaml(text) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(
            f"Cannot read recipe {path}: {exc}", fix="Pass a YAML file of `key: value` lines."
        ) from exc
    if not isinstance(raw, dict):
        raise InvalidInput(
            f"Recipe {path} is not a mapping of fields", fix="Write one `field: value` per line."
        )
    values, problems = parse_overrides(overrides or [])
    merged = {**raw, **values}
    for key, value in values.items():  # --set card.KEY=V adds to the file's mapping
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            merged[key] = {**raw[key], **value}
    return build_recipe(merged, base_dir=path.resolve().parent, source=str(path), problems=problems)


def build_recipe(
    values: dict[str, Any],
    *,
    base_dir: Path | None = None,
    source: str = "recipe",
    problems: list[str] | None = None,
) -> Recipe:
    """Build and validate a recipe from a dict (see `load_recipe`).

    Raises:
        InvalidInput: Listing every problem, each naming its field.
    """
    problems = list(problems or [])
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key not in FIELDS:
            close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, FIELDS)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown field{hint}")
            continue
        ok, coerced = _check_type(value, _HINTS[key])
        if not ok:
            problems.append(f"{key}: {value!r} is not {_describe(_HINTS[key])}")
            continue
        kwargs[key] = coerced
    recipe = Recipe(**kwargs)
    if (recipe.data and base_dir is not None and not Path(recipe.data).is_absolute()
            and not is_hub_dataset(recipe.data)):
        recipe.data = str((base_dir / recipe.data).resolve())
    bad = {str(k) for k in values} - set(kwargs)
    problems += validate(recipe, skip=bad)
    if problems:
        raise InvalidInput(
            f"Recipe {source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems),
            fix="Fix these fields in the file or with --set FIELD=VALUE.",
        )
    return recipe


def validate(recipe: Recipe, skip: set[str] | None = None) -> list[str]:
    """Return every problem with field values and their combinations (empty when fine).

    Args:
        recipe: The recipe to check.
        skip: Fields already reported (wrong type), not to be reported again.
    """
    p: list[str] = []
    skip = skip or set()

    def need(ok: bool, name: str, what: str) -> None:
        if not ok and name not in skip:
            p.append(f"{name}: {getattr(recipe, name)!r} {what}")

    need(bool(recipe.data), "data", "is missing; give the dataset file")
    if recipe.data and is_hub_dataset(recipe.data) and "data" not in skip:
        try:
            parse_hub_dataset(recipe.data)
        except InvalidInput as exc:
            p.append(f"data: {exc.one_line()}")
    elif recipe.data:
        need(Path(recipe.data).is_file(), "data", "is not a file")
    need(bool(recipe.output), "output", "is missing; give the adapter folder to write")
    for name, what in (("base", "base name"), ("parent", "adapter name")):
        value = getattr(recipe, name)
        if value is None or name in skip:
            continue
        try:
            validate_name(value, what) if name == "base" else parse_adapter_ref(value)
        except InvalidName as exc:
            p.append(f"{name}: {exc.one_line()}")
    positive = ("r", "alpha", "learning_rate", "batch_size", "gradient_accumulation", "beta",
                "logging_steps")
    for name in positive:
        need(getattr(recipe, name) > 0, name, "must be > 0")
    non_negative = ("max_steps", "warmup", "weight_decay", "max_grad_norm", "eval_steps",
                    "save_steps", "early_stopping_patience", "few_shot_k", "threads",
                    "save_total_limit")
    for name in non_negative:
        need(getattr(recipe, name) >= 0, name, "must be >= 0")
    need(0 <= recipe.dropout < 1, "dropout", "must be in [0, 1)")
    need(recipe.max_steps > 0 or recipe.epochs > 0, "epochs", "must be > 0 when max_steps is 0")
    need(recipe.warmup < 1 or float(recipe.warmup).is_integer(), "warmup",
         "must be a ratio < 1 or a whole number of steps")
    need(16 <= recipe.max_seq_len <= 32768, "max_seq_len", "must be in [16, 32768]")
    need(recipe.max_new_tokens > 0, "max_new_tokens", "must be > 0")
    need(recipe.min_answer_tokens >= 1, "min_answer_tokens", "must be >= 1")
    if recipe.neftune_noise_alpha is not None:
        need(recipe.neftune_noise_alpha > 0, "neftune_noise_alpha", "must be > 0 or null")
        need(recipe.method == "sft", "neftune_noise_alpha", "applies to method: sft only")
    need(not recipe.packing or recipe.method == "sft", "packing", "applies to method: sft only")
    if recipe.max_eval_examples is not None:
        need(recipe.max_eval_examples > 0, "max_eval_examples", "must be > 0 or null")
    if isinstance(recipe.target_modules, str):
        need(recipe.target_modules == "all-linear", "target_modules",
             "must be 'all-linear' or a list of module names")
    else:
        need(bool(recipe.target_modules), "target_modules", "must not be empty")
    need(len(recipe.splits) == 3 and all(0 <= s < 1 for s in recipe.splits)
         and abs(sum(recipe.splits) - 1) < 1e-6 and recipe.splits[0] > 0,
         "splits", "must be three fractions in [0, 1) summing to 1, train > 0")
    if recipe.early_stopping_patience:
        need(recipe.eval_steps > 0, "eval_steps", "must be > 0 when early_stopping_patience is set")
        need(recipe.save_steps > 0 and recipe.eval_steps > 0
             and recipe.save_steps % recipe.eval_steps == 0, "save_steps",
             f"must be a multiple of eval_steps ({recipe.eval_steps}) for early stopping "
             "to keep the best checkpoint")
    return p
