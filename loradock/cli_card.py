"""`loradock card`: (re)generate an adapter's model card from its manifest and eval.json.

Thin: resolve the adapter through the hub, call `modelcards.write_card`, print the path and
what remains to complete. Registered folders are read-only, so a hub adapter's card goes to
``--out`` (default ``./card-NAME-vN``); ``--dir`` rewrites README.md inside an unregistered folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hub.errors import InvalidInput


def card(
    model: Annotated[
        str | None,
        typer.Argument(help="Registered adapter: NAME, NAME@V, BASE+NAME or BASE+NAME@V."),
    ] = None,
    adapter_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Regenerate README.md inside this unregistered adapter folder."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder to write README.md into (hub adapters; default ./card-NAME-vN)."),
    ] = None,
    base: Annotated[str, typer.Option(help="Base of the --dir adapter.")] = "smollm2",
    name: Annotated[
        str | None, typer.Option(help="Adapter name on the card (--dir; default card.name).")
    ] = None,
) -> None:
    """Write an adapter's model card (README.md) and list what must be completed to publish it.

    Example: loradock card json-extract@1 --out card-json-extract
    """
    from hub.store import Store
    from modelcards import write_card

    if (model is None) == (adapter_dir is None):
        raise InvalidInput(
            "Give either a registered adapter (NAME[@V]) or --dir FOLDER",
            fix="Example: loradock card json-extract@1 --out card-json-extract",
            param="model",
        )
    store = Store()
    if model is not None:
        record, base_info = store.resolve_adapter(model)
        target = out or Path(f"card-{record.name}-v{record.version}")
        if target.resolve() == record.path.resolve():
            raise InvalidInput(
                f"{record.path} is a registered (read-only) folder",
                fix="Choose another --out folder.",
                param="out",
            )
        result = write_card(
            record.path, base_info, out=target, name=record.name, version=record.version
        )
    else:
        result = write_card(Path(adapter_dir), store.base(base), out=out, name=name)
    typer.echo(f"card: {result.path}")
    typer.echo(result.role_sentence)
    if result.draft:
        typer.echo(f"draft: {len(result.to_complete)} item(s) to complete before publishing:")
        for item in result.to_complete:
            typer.echo(f"  - {item}")
    else:
        typer.echo("complete: ready to publish")
