"""`loradock eval`: evaluate a registered adapter (or an adapter folder) on a test split.

Thin: resolve the adapter and its base through the hub, call `train.eval.run_eval`, print where
the report went and the verdict. Registered folders are read-only, so their results go to
``--out`` (default ``./eval-NAME-vN``); an unregistered ``--dir`` folder gets them in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hub.errors import InvalidInput


def _device(device: str) -> str | None:
    """None for ``auto``: `train.eval.run_eval` then uses the device training recorded."""
    return None if device == "auto" else device


def evaluate(
    model: Annotated[
        str | None,
        typer.Argument(help="Registered adapter: NAME, NAME@V, BASE+NAME or BASE+NAME@V."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Prepared data folder (`loradock data prepare`, holds test.jsonl and "
            "train.jsonl) or a canonical test JSONL file.",
        ),
    ] = None,
    adapter_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Evaluate this unregistered adapter folder instead (in place)."),
    ] = None,
    base: Annotated[str, typer.Option(help="Base of the --dir adapter.")] = "smollm2",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for eval.json and eval_report.md (default ./eval-NAME-vN for a "
            "registered adapter, the folder itself for --dir)."
        ),
    ] = None,
    few_shot: Annotated[
        int, typer.Option(help="Examples from train in the few-shot baseline.")
    ] = 3,
    max_examples: Annotated[
        int | None, typer.Option(help="Evaluate only the first N test rows.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit per answer.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 32,
    device: Annotated[str, typer.Option(
        help="auto (the device training used, cpu when it is absent here), cpu or cuda[:N].")
    ] = "auto",
    forgetting_texts: Annotated[
        int | None,
        typer.Option(help="Score only the first N of the 30 general-text paragraphs (quick runs)."),
    ] = None,
    require_pass: Annotated[
        bool, typer.Option(help="Exit 1 when the adapter does not beat the baseline.")
    ] = False,
) -> None:
    """Evaluate an adapter: base vs few-shot base vs adapter, plus a forgetting check.

    Writes eval.json and eval_report.md and prints the verdict.

    Example: loradock eval json-extract@1 --data prepared/ --out eval-json-extract
    """
    from hub.names import ModelRef
    from hub.store import Store

    if (model is None) == (adapter_dir is None):
        raise InvalidInput(
            "Give either a registered adapter (NAME[@V]) or --dir FOLDER",
            fix="Example: loradock eval json-extract@1 --data prepared/",
            param="model",
        )
    if data is None:
        raise InvalidInput(
            "--data is required", fix="Pass the folder `loradock data prepare` wrote.",
            param="data",
        )
    if few_shot < 0 or max_new_tokens < 1 or batch_size < 1 or (forgetting_texts or 1) < 1:
        raise InvalidInput(
            f"--few-shot {few_shot}, --max-new-tokens {max_new_tokens}, --batch-size {batch_size}"
            f", --forgetting-texts {forgetting_texts}",
            fix="Use --few-shot >= 0 and --max-new-tokens, --batch-size, --forgetting-texts >= 1.",
        )
    store = Store()
    if model is not None:
        record, base_info = store.resolve_adapter(model)
        folder = record.path
        target = out or Path(f"eval-{record.name}-v{record.version}")
        label = str(ModelRef(record.base, record.name, record.version))
    else:
        folder = Path(adapter_dir)
        base_info = store.base(base)
        target = out or folder
        label = str(folder)
    from train.eval import run_eval

    result = run_eval(
        folder,
        base_info,
        data,
        few_shot_k=few_shot,
        max_examples=max_examples,
        max_new_tokens=max_new_tokens,
        device=_device(device),
        out_dir=target,
        batch_size=batch_size,
        forgetting_texts=forgetting_texts,
        log=lambda line: typer.echo(f"[eval] {line}", err=True),
    )
    typer.echo(f"{label}: {result.sentence}")
    typer.echo(f"report: {result.report_path}")
    typer.echo(f"json:   {result.json_path}")
    if require_pass and not result.passed:
        raise typer.Exit(1)
