"""One training run: prepare the data, train QLoRA (SFT, DPO, ORPO or KTO), publish the adapter.

Folders, for ``output: runs/demo``::

    runs/demo/          the adapter folder, published atomically when training is done
    runs/demo.work/     the run in progress: data/ (the prepared splits), checkpoints/
                        (checkpoint-N), metrics.jsonl, run.json (the recipe the run started with)

The work folder sits beside the adapter folder, never inside it. It is removed after a
successful run unless ``keep_checkpoints`` is set. ``resume=True`` continues from its newest
complete checkpoint (optimizer, scheduler, RNG state and data position included), reusing the
prepared splits; the recipe must match the one the run started with, except for fields that do
not change training (`RESUME_MAY_CHANGE`).

Where the job ends: evaluation, the model card and registration are composed by the CLI after
`run` returns (see ``loradock/cli_train.py``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.errors import Conflict, Incompatible, InvalidInput
from hub.manifest import AdapterManifest
from hub.names import parse_adapter_ref
from hub.store import Store
from train.recipe import PREFERENCE_METHODS, Recipe

WORK_SUFFIX = ".work"
RUN_FILE = "run.json"
RESUME_MAY_CHANGE = frozenset({
    "output", "overwrite", "keep_checkpoints", "threads", "few_shot_k", "max_eval_examples",
    "max_new_tokens", "eval_prompts", "intended_use", "out_of_scope_use", "license", "card",
    "report_to",
})


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        adapter_dir: The published adapter folder.
        base: The base it was trained on.
        manifest: The manifest written into it.
        data_dir: ``adapter_dir/data`` (splits + data_report.json; the eval reads it).
        steps: Optimizer steps done (resumed ones included).
        resumed_from: Checkpoint step the run continued from, if any.
        work_dir: The work folder (gone unless ``keep_checkpoints``).
        notes: Things the run wants the user to know (optimizer fallback, resume).
        main_process: False in the other processes of a distributed run, which publish
            nothing (evaluation, card and registration are the main process's).
    """

    adapter_dir: Path
    base: BaseInfo
    manifest: AdapterManifest
    data_dir: Path
    steps: int
    resumed_from: int | None = None
    work_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    main_process: bool = True


def work_dir_for(final: Path) -> Path:
    """The work folder of adapter folder ``final`` (a sibling, never inside it)."""
    final = Path(final)
    return final.parent / f"{final.name}{WORK_SUFFIX}"


def latest_checkpoint(checkpoints: Path) -> tuple[Path, int] | None:
    """The newest complete ``checkpoint-N`` (one whose trainer state was written and parses)."""
    found: list[tuple[int, Path]] = []
    if checkpoints.is_dir():
        for path in checkpoints.glob("checkpoint-*"):
            step = path.name.removeprefix("checkpoint-")
            state = path / "trainer_state.json"
            if not step.isdigit() or not state.is_file():
                continue
            try:
                json.loads(state.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found.append((int(step), path))
    if not found:
        return None
    step, path = max(found)
    return path, step


def _check_same_recipe(work: Path, recipe: Recipe, base: BaseInfo) -> None:
    saved = json.loads((work / RUN_FILE).read_text())
    before, now = saved["recipe"], recipe.to_dict()
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and before.get(k) != now[k])
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise Conflict(
            f"Cannot resume {work}: the recipe changed ({shown})",
            fix="Resume with the recipe the run started with, or remove the work folder to start "
            "over.",
        )
    if saved.get("base_fingerprint") != base.fingerprint:
        raise Conflict(
            f"Cannot resume {work}: base {base.name!r} changed since the run started",
            fix="Remove the work folder to start over.",
        )


def _resolve_parent(store: Store, recipe: Recipe, base: BaseInfo) -> tuple[str | None, Path | None]:
    if not recipe.parent:
        return None, None
    name, version = parse_adapter_ref(recipe.parent)
    record = store.get(name, version)
    if record.base != base.name:
        raise Incompatible(
            f"Parent {record.name}@{record.version} was trained on base {record.base!r}, "
            f"not {base.name!r}",
            fix=f"Set base: {record.base} or choose a parent trained on {base.name}.",
            param="parent",
        )
    return f"{record.name}@{record.version}", record.path


def _prepare_data(recipe: Recipe, tokenizer: Any, data_dir: Path) -> Any:
    """Prepare the splits once per run (a resume reuses them), system prompt added."""
    from train.data import SPLIT_FILES, prepare_dataset, read_report, read_split
    from train.data.hub_source import resolve_source
    from train.sft import with_system_prompt
    from train.template import fold_system_turn

    if (data_dir / "data_report.json").is_file():
        return read_report(data_dir)
    tmp = data_dir.parent / f".{data_dir.name}-prepare"
    shutil.rmtree(tmp, ignore_errors=True)
    source, origin = resolve_source(recipe.data)  # hf://datasets/... -> a pinned local file
    report = prepare_dataset(
        source, tmp, fmt=recipe.format, tokenizer=tokenizer,
        max_seq_len=recipe.max_seq_len, pii=recipe.pii, seed=recipe.seed,
        splits=tuple(recipe.splits), overwrite=True,
        min_answer_tokens=recipe.min_answer_tokens, origin=origin,
    )
    template = getattr(tokenizer, "chat_template", None) or ""
    # In the split files, so that evaluation and serving see the same conversations; a system
    # turn the base's template refuses (Gemma 2) is folded into the first user turn.
    key = "prompt" if report.kind == "preference" else "messages"
    for name in SPLIT_FILES.values():
        path = tmp / name
        rows = read_split(path)
        changed = False
        for row in rows:
            if not isinstance(row.get(key), list):
                continue
            messages = with_system_prompt(row[key], recipe.system_prompt)
            if template and messages and messages[0].get("role") == "system":
                messages = fold_system_turn(template, messages)
            changed |= messages != row[key]
            row[key] = messages
        if changed:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    shutil.rmtree(data_dir, ignore_errors=True)
    tmp.rename(data_dir)
    return report


def _check_kind(recipe: Recipe, kind: str) -> None:
    wanted = "preference" if recipe.method in PREFERENCE_METHODS else "sft"
    if kind != wanted:
        raise InvalidInput(
            f"method {recipe.method!r} needs {wanted} rows but {recipe.data} holds {kind} rows",
            fix="Set method: dpo, orpo or kto for prompt/chosen/rejected data, method: sft for "
            "chats.",
            param="method",
        )


# method -> (module, builder); imported when the run starts (TRL is heavy).
TRAINERS = {
    "sft": ("train.sft", "build_sft_trainer"),
    "dpo": ("train.dpo", "build_dpo_trainer"),
    "orpo": ("train.preference", "build_orpo_trainer"),
    "kto": ("train.preference", "build_kto_trainer"),
}


def _builder(method: str) -> Any:
    import importlib

    module, name = TRAINERS[method]
    return getattr(importlib.import_module(module), name)


def run(
    recipe: Recipe,
    *,
    store: Store | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
) -> TrainResult:
    """Train one adapter as the recipe says and publish its folder at ``recipe.output``.

    A run that fails before its first checkpoint removes the work folder it created, so the
    next attempt needs no ``--resume``; after a checkpoint the folder stays for ``--resume``.

    Args:
        recipe: A validated recipe (`train.recipe.load_recipe`).
        store: The hub store (base and parent lookup); default ``Store()``.
        resume: Continue from the newest checkpoint in the work folder.
        progress: Show progress bars.
        callbacks: Extra ``transformers.TrainerCallback`` objects (progress UIs, tests).

    Returns:
        The result, with the manifest written.

    Raises:
        Conflict: Output exists (and not ``overwrite``), or a work folder exists without
            ``resume``, or the recipe changed since the run began.
        InvalidInput / NotFound / Incompatible: Bad data, base or parent.
    """
    store = store or Store()
    base = store.base(recipe.base)
    parent, parent_dir = _resolve_parent(store, recipe, base)
    final = Path(recipe.output)
    work = work_dir_for(final)
    state = process_state()
    main = state.is_main_process
    # Every process checks the same state of the folders; only then does the main one write.
    if final.exists() and not recipe.overwrite:
        raise Conflict(f"Output {final} already exists",
                       fix="Choose another output, or --set overwrite=true to replace it.")
    if work.exists() and not resume:
        raise Conflict(f"{work} holds an unfinished run",
                       fix="Pass --resume to continue it, or remove that folder to start over.")
    checkpoint = latest_checkpoint(work / "checkpoints") if resume else None
    notes: list[str] = []
    if resume and (work / RUN_FILE).is_file():
        _check_same_recipe(work, recipe, base)
    if resume and checkpoint is None:
        notes.append(f"no checkpoint in {work / 'checkpoints'}; starting from step 0")
    created = not work.exists()
    state.wait_for_everyone()
    if main:
        work.mkdir(parents=True, exist_ok=True)
        (work / RUN_FILE).write_text(json.dumps(
            {"recipe": recipe.to_dict(), "base_fingerprint": base.fingerprint}, indent=2))
    state.wait_for_everyone()
    try:
        result = _train(recipe, base, work, checkpoint, parent, parent_dir, progress,
                        callbacks or [], main=main)
    except BaseException:
        if main and created and latest_checkpoint(work / "checkpoints") is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    result.notes = [*notes, *result.notes]
    state.wait_for_everyone()  # the main process has published the adapter folder
    if main and not recipe.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return result


def process_state() -> Any:
    """This process's place in a distributed run (``accelerate launch``/``torchrun``), or alone.

    Built the way transformers' ``TrainingArguments`` builds it (``cpu=True`` without CUDA, so
    several CPU processes use gloo); accelerate keeps one shared state per process, so the
    trainer later finds this same one.
    """
    from accelerate import PartialState

    from train.quant import pick_device

    return PartialState(cpu=pick_device() == "cpu")


def _train(
    recipe: Recipe,
    base: BaseInfo,
    work: Path,
    checkpoint: tuple[Path, int] | None,
    parent: str | None,
    parent_dir: Path | None,
    progress: bool,
    callbacks: list,
    *,
    main: bool = True,
) -> TrainResult:
    """Prepare data, build the trainer, train, and publish (the body of `run`).

    Under several processes the main one prepares the data first (the others then read it),
    every process trains its share of each batch, and only the main one writes the metrics,
    the plot and the adapter folder.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, set_seed

    from train.args import resolve_optim, tracking, tracking_env
    from train.data import read_split
    from train.dtype_choice import choose_compute_dtype, default_cache_dir
    from train.metrics import LOSS_PNG, METRICS_FILE, MetricsLogger, plot_losses, truncate_after
    from train.publish import FLOPS_FORMULA, build_manifest, estimated_flops, publish_adapter
    from train.quant import (
        QuantSpec,
        attach_lora,
        count_parameters,
        load_quantized_base,
        lora_config,
        pick_device,
    )
    from train.threads import apply_threads

    final = Path(recipe.output)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    with process_state().main_process_first():
        report = _prepare_data(recipe, tokenizer, work / "data")
    _check_kind(recipe, report.kind)
    train_rows = read_split(work / "data" / "train.jsonl")
    val_rows = read_split(work / "data" / "validation.jsonl")

    track = tracking(recipe.report_to, final)  # fails now if the tracker is not installed
    threads = apply_threads(recipe.threads)
    device = pick_device()
    with process_state().main_process_first():  # one measurement; the others read its cache
        choice = choose_compute_dtype(recipe.compute_dtype, device,
                                      AutoConfig.from_pretrained(base.path), threads,
                                      default_cache_dir())
    spec = QuantSpec.for_device(device, choice.dtype, choice.attention)
    set_seed(recipe.seed)
    model = load_quantized_base(base.path, spec,
                                gradient_checkpointing=recipe.gradient_checkpointing)
    model = attach_lora(model, lora_config(recipe.r, recipe.alpha, recipe.dropout,
                                           recipe.target_modules, recipe.use_dora), parent_dir)
    metrics_path = work / METRICS_FILE
    resumed = truncate_after(metrics_path, checkpoint[1]) if checkpoint and main else None
    if not checkpoint and main:
        metrics_path.write_text("")
    logger = MetricsLogger(metrics_path, resumed=resumed)
    optim, optim_note = resolve_optim(recipe.optim, spec.device)
    notes = [optim_note] if optim_note else []
    with tracking_env(track):
        trainer = _builder(recipe.method)(
            recipe, model, tokenizer, train_rows, val_rows, spec=spec,
            checkpoints=work / "checkpoints", callbacks=[logger, *callbacks], progress=progress,
        )
        trainable, total = count_parameters(trainer.model)
        trainer.train(resume_from_checkpoint=str(checkpoint[0]) if checkpoint else None)
        track.record.update(_tracker_ids(trainer))
    state = trainer.state
    if main:
        plot_losses(metrics_path, work / LOSS_PNG, title=f"{final.name} ({recipe.method})")
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    compute = {
        "device": spec.device,
        "device_name": torch.cuda.get_device_name(0) if spec.device == "cuda" else "cpu",
        "wall_time_s": round(logger.elapsed, 2),
        "cpu_time_s": round(logger.cpu, 2),
        "steps": int(state.global_step),
        "epochs": round(float(state.epoch or 0.0), 4),
        "tokens_seen": tokens,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "estimated_flops": estimated_flops(total, tokens),
        "flops_formula": FLOPS_FORMULA,
        "torch_threads": threads,
        "processes": process_state().num_processes,
        "resumed_from_step": checkpoint[1] if checkpoint else None,
        "best_step": _best_step(state),
    }
    compute["optimizer"] = {"asked": recipe.optim, "used": optim, "note": optim_note}
    compute["dtype_choice"] = choice.record()
    manifest = build_manifest(recipe, base, spec, data_report=report.to_dict(), compute=compute,
                              parent=parent, extra={"tracking": track.record})
    if main:
        publish_adapter(final, model=trainer.model, base=base, manifest=manifest,
                        metrics=metrics_path, loss_png=work / LOSS_PNG, data_dir=work / "data",
                        overwrite=recipe.overwrite)
    return TrainResult(
        adapter_dir=final, base=base, manifest=manifest, data_dir=final / "data",
        steps=int(state.global_step), resumed_from=checkpoint[1] if checkpoint else None,
        work_dir=work, notes=notes, main_process=main,
    )


def _tracker_ids(trainer: Any) -> dict[str, Any]:
    """Run ids the tracker integrations assigned (MLflow run id, W&B run id), when any."""
    ids: dict[str, Any] = {}
    for callback in trainer.callback_handler.callbacks:
        name = type(callback).__name__
        try:
            if name == "MLflowCallback":
                run = callback._ml_flow.last_active_run()
                ids["run_id"] = run.info.run_id if run is not None else None
            elif name == "WandbCallback":
                run = callback._wandb.run or getattr(callback._wandb, "last_run", None)
                ids["run_id"] = run.id if run is not None else None
        except Exception:  # noqa: BLE001 - an id is a nicety; the tracker's files are what count
            ids.setdefault("run_id", None)
    return ids


def _best_step(state: Any) -> int | None:
    step = getattr(state, "best_global_step", None)
    return int(step) if step else None
