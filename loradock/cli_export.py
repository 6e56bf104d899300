"""``loradock export ...``: merged HF folders, GGUF files, GGUF LoRAs and Ollama builds.

Thin wrappers over `export.pipeline` and `export.ollama` (imported inside the commands so
``loradock --help`` stays fast; `export.config` is plain dataclasses and holds every flag's help
text). Each command shows a progress bar over its steps, prints the parity figures it measured and
where the output went. A failed parity check is a `export.config.ParityFailed` error: one line on
stderr and exit code 7 (via `loradock.cli.main`); ``--no-verify`` keeps the output anyway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from export.config import (
    BASE_WEIGHTS_HELP,
    BaseWeights,
    GgufOptions,
    LoraDtype,
    LoraGgufOptions,
    MergeDtype,
    MergeOptions,
    OllamaOptions,
    ParityOptions,
    Quant,
    help_for,
)
from hub.names import parse_adapter_ref

app = typer.Typer(
    help="Export adapters: merged HF folder, GGUF (f16/q8_0/q4_k_m), GGUF LoRA, Ollama.",
    no_args_is_help=True,
)

RefArg = Annotated[str, typer.Argument(help="Registered adapter: NAME or NAME@VERSION.",
                                       show_default=False)]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.", show_default=False)]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify",
                                           help=help_for(ParityOptions, "verify"))]
PromptsOpt = Annotated[int, typer.Option("--prompts", min=1,
                                         help=help_for(ParityOptions, "prompts"))]
TokensOpt = Annotated[int, typer.Option("--max-tokens", min=1,
                                        help=help_for(ParityOptions, "max_tokens"))]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", min=0.0, max=1.0,
                                                    help=help_for(ParityOptions, "threshold"))]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0,
                                         help=help_for(ParityOptions, "threads"))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
WeightsOpt = Annotated[BaseWeights, typer.Option("--base-weights", help=BASE_WEIGHTS_HELP)]


def _parity(no_verify: bool, prompts: int, max_tokens: int, threshold: float | None,
            threads: int) -> ParityOptions:
    return ParityOptions(verify=not no_verify, prompts=prompts, max_tokens=max_tokens,
                         threshold=threshold, threads=threads).validate()


def _run(job: Callable[..., Any], as_json: bool, **kwargs: Any) -> Any:
    """Run an export under a progress bar, then print its figures (or JSON)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hub.store import Store

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn(),
                  transient=as_json, disable=as_json) as progress:
        task = progress.add_task("starting", total=None)

        def on_step(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total)

        result = job(Store(), on_step=on_step, **kwargs)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return result
    for report in result.parity:
        typer.echo(report.line())
        if report.sample:
            typer.echo(f"  answer to prompt 1: {report.sample[:200]!r}")
    if result.drift is not None and result.drift.top1_agreement is not None:
        drift = result.drift
        typer.echo(f"drift vs {drift.reference}: top-1 agreement {drift.top1_agreement:.1%}, "
                   f"mean |dlogit| {drift.mean_abs_dlogit:.4f} ({drift.note})")
    for note in result.notes:
        typer.echo(f"note: {note}")
    for path in result.paths:
        typer.echo(f"wrote {path}")
    for command in result.commands:
        typer.echo(f"run: {command}")
    return result


@app.command("merged")
def merged(
    ref: RefArg,
    out: OutOpt,
    dtype: Annotated[MergeDtype, typer.Option("--dtype", help=help_for(MergeOptions, "dtype"))]
    = "fp32",
    no_drift: Annotated[bool, typer.Option(
        "--no-drift", help="Skip: " + help_for(MergeOptions, "measure_quantised"))] = False,
    base_weights: WeightsOpt = "auto",
    no_verify: NoVerifyOpt = False,
    prompts: PromptsOpt = 8,
    max_tokens: TokensOpt = 32,
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Merge an adapter into its base in fp32 and save an HF folder (never into 4-bit weights).

    A QLoRA adapter merges into the 4-bit values it trained on, dequantised (--base-weights).
    Reports parity with the adapter on the unmerged base and the drift from the adapter on its
    4-bit training base. Example: loradock export merged support-bot@2 --out merged/support-bot
    """
    from export.pipeline import export_merged

    name, version = parse_adapter_ref(ref)
    _run(export_merged, as_json, name=name, version=version, out=out,
         options=MergeOptions(dtype=dtype, measure_quantised=not no_drift,
                              base_weights=base_weights).validate(),
         parity=_parity(no_verify, prompts, max_tokens, threshold, threads))


@app.command("gguf")
def gguf(
    ref: RefArg,
    out: OutOpt,
    quant: Annotated[Quant, typer.Option("--quant", help=help_for(GgufOptions, "quant"))] = "f16",
    pre_tokenizer: Annotated[str | None, typer.Option(
        "--pre-tokenizer", help=help_for(GgufOptions, "pre_tokenizer"))] = None,
    base_weights: WeightsOpt = "auto",
    no_verify: NoVerifyOpt = False,
    prompts: PromptsOpt = 8,
    max_tokens: TokensOpt = 32,
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write the merged model as one GGUF file (f16, q8_0 or q4_k_m) checked with llama.cpp.

    The file appears as OUT/NAME-vV.QUANT.gguf only after it passed the parity gate.
    Example: loradock export gguf support-bot --quant q8_0 --out exports/
    """
    from export.pipeline import export_gguf

    name, version = parse_adapter_ref(ref)
    _run(export_gguf, as_json, name=name, version=version, out_dir=out,
         options=GgufOptions(quant=quant, pre_tokenizer=pre_tokenizer,
                             base_weights=base_weights).validate(),
         parity=_parity(no_verify, prompts, max_tokens, threshold, threads))


@app.command("lora-gguf")
def lora_gguf(
    ref: RefArg,
    out: OutOpt,
    dtype: Annotated[LoraDtype, typer.Option("--dtype", help=help_for(LoraGgufOptions, "dtype"))]
    = "f32",
    no_verify: NoVerifyOpt = False,
    prompts: PromptsOpt = 8,
    max_tokens: TokensOpt = 32,
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write the adapter as a llama.cpp GGUF LoRA, checked on the base GGUF against PEFT.

    Example: loradock export lora-gguf support-bot@2 --out exports/
    """
    from export.pipeline import export_lora_gguf

    name, version = parse_adapter_ref(ref)
    _run(export_lora_gguf, as_json, name=name, version=version, out_dir=out,
         options=LoraGgufOptions(dtype=dtype).validate(),
         parity=_parity(no_verify, prompts, max_tokens, threshold, threads))


@app.command("ollama")
def ollama(
    ref: RefArg,
    out: OutOpt,
    quant: Annotated[Quant, typer.Option("--quant", help=help_for(OllamaOptions, "quant"))]
    = "q8_0",
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help=help_for(OllamaOptions, "adapter_only"))] = False,
    model_name: Annotated[str | None, typer.Option(
        "--name", help=help_for(OllamaOptions, "model_name"))] = None,
    no_create: Annotated[bool, typer.Option(
        "--no-create", help="Do not run `ollama create` even if ollama is installed.")] = False,
    base_weights: Annotated[BaseWeights, typer.Option(
        "--base-weights", help=help_for(OllamaOptions, "base_weights"))] = "auto",
    no_verify: NoVerifyOpt = False,
    prompts: PromptsOpt = 8,
    max_tokens: TokensOpt = 32,
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Build an Ollama model folder: GGUF + Modelfile (verified TEMPLATE, stops, LICENSE).

    Runs `ollama create` when ollama is on PATH, else prints the exact commands.
    Example: loradock export ollama support-bot --out ollama/support-bot --quant q8_0
    """
    from export.ollama import export_ollama

    name, version = parse_adapter_ref(ref)
    _run(export_ollama, as_json, name=name, version=version, out=out,
         options=OllamaOptions(quant=quant, adapter_only=adapter_only, create=not no_create,
                               model_name=model_name, base_weights=base_weights).validate(),
         parity=_parity(no_verify, prompts, max_tokens, threshold, threads))
