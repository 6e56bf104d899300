"""The ``loradock`` command: composes each stage's sub-commands and translates domain errors.

Each stage keeps its commands in its own module (``loradock/cli_<stage>.py``) as a plain
``typer.Typer`` whose functions are thin: parse options, call the library, print. Nothing heavy
is imported at module level, so ``loradock --help`` is fast.

Errors: library code raises `hub.errors.LoradockError`; `main` prints its one line to stderr and
exits with its ``exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from hub.errors import LoradockError
from loradock import cli_card, cli_data, cli_eval, cli_export, cli_hub, cli_serve, cli_train

# Two busy cores: torch threads spin-waiting made work 3-10x slower here (see README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# bitsandbytes warns, when peft first imports it, that the optional `kernels` package (which would
# fetch a fused 4-bit CPU kernel from the Hugging Face Hub at run time) is missing. loradock never
# downloads at run time, so the warning is noise on every command; its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

app = typer.Typer(
    name="loradock",
    help="From a dataset to many QLoRA adapters served from one quantised base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_hub.app, name="hub")
app.add_typer(cli_data.app, name="data")
app.add_typer(cli_export.app, name="export")
app.command("train")(cli_train.train)
app.command("eval")(cli_eval.evaluate)
app.command("card")(cli_card.card)
app.command("serve")(cli_serve.serve)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; domain errors become one line on stderr and a non-zero exit code.

    Typer runs in standalone mode, so usage errors print click's message and exit 2 and
    ``typer.Exit(code)`` exits with its code; only our domain errors are translated here.
    """
    try:
        app(args=argv)
    except LoradockError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
