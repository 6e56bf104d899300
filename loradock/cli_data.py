"""``loradock data ...``: check a dataset file, or prepare it into canonical train/validation/test.

Thin wrappers over `train.data` (imported inside the commands so ``loradock --help`` stays fast).
The tokenizer for the length check is the base model's, found through the hub store. A file
with no usable row prints its report (``check``) and then fails with one line on stderr and a
non-zero exit code (via `loradock.cli.main`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(
    help="Check datasets and prepare train/validation/test splits.", no_args_is_help=True
)

FileArg = Annotated[
    str,
    typer.Argument(help="Dataset: a JSONL, JSON (a list of objects), CSV or Parquet file, or a "
                   "Hub dataset hf://datasets/ORG/NAME, optionally @REV and /FILE (pinned to "
                   "its commit).",
                   show_default=False),
]
MinAnswerOpt = Annotated[
    int,
    typer.Option("--min-answer-tokens", min=1,
                 help="Drop rows whose answer is shorter than this many tokens (1: only empty "
                 "ones); reported with line numbers."),
]
FormatOpt = Annotated[
    Literal["auto", "chat", "alpaca", "completion", "preference"],
    typer.Option(
        "--format",
        help="Row format: chat (messages), alpaca (instruction/input/output), completion "
        "(prompt/completion), preference (prompt/chosen/rejected); auto detects it.",
    ),
]
MaxLenOpt = Annotated[
    int,
    typer.Option("--max-seq-len", min=1, help="Drop rows longer than this many tokens."),
]
BaseOpt = Annotated[
    str,
    typer.Option("--base", help="Base model whose tokenizer and chat template measure rows."),
]
NoLengthOpt = Annotated[
    bool,
    typer.Option("--no-length", help="Skip the token-length check (no tokenizer is loaded)."),
]
PiiOpt = Annotated[
    Literal["drop", "redact", "keep"],
    typer.Option(
        "--pii",
        help="Rows with emails, phone numbers, cards, IBANs or IP addresses: drop the row, "
        "redact the match ([EMAIL] ...), or keep it (still reported).",
    ),
]


def _tokenizer(base: str, skip: bool, min_answer_tokens: int = 1):  # noqa: ANN202
    if skip and min_answer_tokens > 1:
        from hub.errors import InvalidInput

        raise InvalidInput(
            f"--min-answer-tokens {min_answer_tokens} needs the tokenizer, which --no-length "
            "skips", fix="Drop --no-length, or leave --min-answer-tokens at 1.",
            param="min_answer_tokens")
    if skip:
        return None
    from hub.store import Store
    from train.data import load_tokenizer

    return load_tokenizer(Store().base(base).path)


@app.command("check")
def check(
    file: FileArg,
    fmt: FormatOpt = "auto",
    max_seq_len: MaxLenOpt = 1024,
    base: BaseOpt = "smollm2",
    no_length: NoLengthOpt = False,
    pii: PiiOpt = "redact",
    min_answer_tokens: MinAnswerOpt = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Check a dataset: counts, then the first problems with their line numbers.

    Reports malformed rows, empty fields, bad role order, exact and near duplicates, rows over
    --max-seq-len tokens (with the base's chat template) and personal data. Exits 0 when at
    least one row is usable. Line numbers: JSONL and CSV file lines (CSV header = line 1),
    JSON list index + 1.

    Example: loradock data check examples/json-extract/data.jsonl --max-seq-len 512
    """
    from train.data import NoUsableRows, check_dataset
    from train.data.hub_source import resolve_source

    tokenizer = _tokenizer(base, no_length, min_answer_tokens)
    source, _ = resolve_source(file)
    try:
        report = check_dataset(source, fmt=fmt, tokenizer=tokenizer, max_seq_len=max_seq_len,
                               pii=pii, min_answer_tokens=min_answer_tokens)
    except NoUsableRows as exc:
        _show(exc.report, as_json)
        raise
    _show(report, as_json)


@app.command("prepare")
def prepare(
    file: FileArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must not exist).")],
    fmt: FormatOpt = "auto",
    max_seq_len: MaxLenOpt = 1024,
    base: BaseOpt = "smollm2",
    no_length: NoLengthOpt = False,
    pii: PiiOpt = "redact",
    min_answer_tokens: MinAnswerOpt = 1,
    seed: Annotated[int, typer.Option("--seed", help="Split seed.")] = 0,
    split: Annotated[
        tuple[float, float, float],
        typer.Option("--split", help="Train, validation and test fractions."),
    ] = (0.8, 0.1, 0.1),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a dataset and write canonical train/validation/test JSONL plus data_report.json.

    Splits are deterministic for a seed and near-duplicate rows always land in the same split.
    The folder appears only when complete.

    Example: loradock data prepare examples/json-extract/data.jsonl --out out/json-data --pii redact
    """
    from train.data import NoUsableRows, prepare_dataset
    from train.data.hub_source import resolve_source

    tokenizer = _tokenizer(base, no_length, min_answer_tokens)
    source, origin = resolve_source(file)
    try:
        report = prepare_dataset(
            source,
            out,
            fmt=fmt,
            tokenizer=tokenizer,
            max_seq_len=max_seq_len,
            pii=pii,
            seed=seed,
            splits=split,
            overwrite=overwrite,
            min_answer_tokens=min_answer_tokens,
            origin=origin,
        )
    except NoUsableRows as exc:
        _show(exc.report, as_json)
        raise
    _show(report, as_json)
    if not as_json:
        typer.echo(f"wrote {out}/{{train,validation,test}}.jsonl and {out}/data_report.json")


def _show(report, as_json: bool) -> None:  # noqa: ANN001 - DataReport, imported lazily
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(report.render())
