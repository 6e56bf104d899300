"""``loradock train``: recipe -> QLoRA adapter folder -> evaluation -> model card -> hub.

The composition root of the training stages: `train.run` prepares the data, trains and
publishes the adapter folder; then `train.eval.run_eval` writes ``eval.json`` and
``eval_report.md`` into it, `modelcards.write_card` writes ``README.md``, and ``--register``
puts it in the store. Only typer and hub are imported at module level.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from hub.errors import InvalidInput


def _optional(module: str, attr: str, stage: str) -> Any | None:
    """Return ``module.attr``, or None with a note when that module or name does not exist yet.

    Any other import error (a bug inside the module) propagates.
    """
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        found = None
    if found is None or not hasattr(found, attr):
        typer.echo(f"note: {stage} skipped ({module}.{attr} is not available yet)", err=True)
        return None
    return getattr(found, attr)


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (first line: how to run it).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: --set r=8 (repeatable)."),
    ] = None,
    register: Annotated[
        str | None, typer.Option("--register", help="Register the adapter in the hub as NAME.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint of this output.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Adapter folder (overrides the recipe's output).")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate on the test split after training.")
    ] = True,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
    ] = True,
) -> None:
    """Train a QLoRA adapter (SFT or DPO) as RECIPE says, evaluate it, write its card.

    The adapter folder holds the LoRA weights (safetensors), the base's chat template,
    loradock.json (manifest), metrics.jsonl, loss.png, data/, eval.json, eval_report.md and
    README.md. Checkpoints live beside it in OUTPUT.work/ until the run succeeds.

    Several GPUs (DDP, QLoRA per process; batch_size is per process):
    accelerate launch --multi_gpu --num_processes 4 $(which loradock) train RECIPE

    Example: loradock train examples/json-extract/recipe.yaml --set max_steps=20 --register demo
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hub.names import validate_name
    from hub.store import Store
    from train.recipe import load_recipe
    from train.run import run

    if register is not None:
        validate_name(register)
    overrides = list(set_ or [])
    if out is not None:
        overrides.append(f"output={out}")
    spec = load_recipe(recipe, overrides)
    card_fields = _optional("modelcards.fields", "CardFields", "card field check")
    if card_fields is not None:
        card_fields.from_dict(spec.card)  # fail now, not after training
    store = Store()
    typer.echo(f"training {spec.method} on {spec.data} -> {spec.output}", err=True)
    result = run(spec, store=store, resume=resume, progress=progress)
    if not result.main_process:
        return  # a distributed run's other processes: the main one evaluates and registers
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    compute = result.manifest.compute
    typer.echo(
        f"adapter: {result.adapter_dir} ({result.steps} steps, {compute['wall_time_s']:.0f} s, "
        f"{compute['tokens_seen']} tokens, compute {result.manifest.quantization['compute_dtype']})"
    )
    if evaluate:
        run_eval = _optional("train.eval", "run_eval", "evaluation")
        if run_eval is not None:
            result_eval = run_eval(
                result.adapter_dir, result.base, result.data_dir,
                few_shot_k=spec.few_shot_k, max_examples=spec.max_eval_examples,
                max_new_tokens=spec.max_new_tokens,
                log=lambda line: typer.echo(f"eval: {line}", err=True),
            )
            verdict = getattr(result_eval, "verdict", None)
            if verdict:
                typer.echo(f"eval: {verdict}")
    write_card = _optional("modelcards", "write_card", "model card")
    if write_card is not None:
        card = write_card(result.adapter_dir, result.base, name=register)
        if getattr(card, "draft", False):
            typer.echo(f"card: draft, {len(card.to_complete)} item(s) to complete before "
                       "publishing (see README.md)", err=True)
    if register is not None:
        if not (result.adapter_dir / "loradock.json").is_file():
            raise InvalidInput(f"{result.adapter_dir} has no manifest", fix="Train again.")
        record = store.register(result.adapter_dir, register, base=result.base.name)
        typer.echo(f"registered {record.model} at {record.path}")
