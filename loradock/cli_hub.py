"""``loradock hub ...``: the adapter store and the Hugging Face Hub from the command line.

Every command is a thin wrapper over `hub.store.Store` / `hub.remote`; ``--json`` output is for
scripts and carries at least ``name``, ``version``, ``base`` and ``path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hub.errors import InvalidInput, NotFound
from hub.names import parse_adapter_ref

app = typer.Typer(help="Register, list, verify, push and pull adapters.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _store():  # noqa: ANN202 - imported lazily to keep `--help` fast
    from hub.store import Store

    return Store()


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _base_json(info) -> dict:  # noqa: ANN001
    data = info.to_dict()
    data.update(kind="base", version=None, base=info.name)
    return data


@app.command("register")
def register(
    folder: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder.")],
    name: Annotated[str, typer.Option("--name", help="Adapter name, e.g. support-bot.")],
    base: Annotated[str, typer.Option("--base", help="Registered base model.")] = "smollm2",
    as_json: JsonOpt = False,
) -> None:
    """Copy an adapter folder into the store as the next version of NAME.

    Example: loradock hub register out/json-extract --name json-extract
    """
    record = _store().register(folder, name, base)
    if as_json:
        _print_json(record.to_dict())
    else:
        typer.echo(f"registered {record.model} ({len(record.files)} files, rank "
                   f"{record.capabilities.rank}) at {record.path}")


@app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this adapter.")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Only the latest version.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List bases and adapter versions.

    Example: loradock hub list --json
    """
    store = _store()
    records = store.list(name, all_versions=not latest)
    bases = [] if name else store.bases()
    if as_json:
        _print_json([_base_json(b) for b in bases] + [r.to_dict() for r in records])
        return
    for info in bases:
        typer.echo(f"base     {info.name:<24} {info.num_parameters / 1e6:.0f}M params  "
                   f"{info.fingerprint[:12]}  {info.path}")
    for r in records:
        typer.echo(f"adapter  {r.name + '@' + str(r.version):<24} base={r.base}  "
                   f"rank={r.capabilities.rank}  {r.created_at}  {r.path}")
    if not bases and not records:
        typer.echo("(empty store: `loradock hub register DIR --name NAME` adds an adapter)")


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@V (adapter) or a base name.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one adapter version (latest by default) or one base.

    Example: loradock hub show json-extract@1 --json
    """
    store = _store()
    name, version = parse_adapter_ref(ref)
    try:
        data = store.get(name, version).to_dict()
    except NotFound:
        if version is not None:
            raise
        data = _base_json(store.base(name))
    if as_json:
        _print_json(data)
        return
    for key, value in data.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True)
            value = value if len(value) < 160 else value[:157] + "..."
        typer.echo(f"{key:<14} {value}")


@app.command("rm")
def rm(ref: Annotated[str, typer.Argument(help="NAME@V to remove.")]) -> None:
    """Remove one adapter version (the version number is never reused).

    Example: loradock hub rm json-extract@1
    """
    name, version = parse_adapter_ref(ref)
    if version is None:
        raise InvalidInput(f"Refusing to remove {ref!r} without a version",
                           fix=f"Name the version, e.g. {name}@1.")
    record = _store().remove(name, version)
    typer.echo(f"removed {record.name}@{record.version}")


@app.command("verify")
def verify(as_json: JsonOpt = False) -> None:
    """Re-hash every registered file; name corrupt files; clean leftovers of killed writers.

    Example: loradock hub verify
    """
    report = _store().verify()
    if as_json:
        _print_json({"ok": report.ok, "checked": report.checked, "corrupt": report.corrupt,
                     "leftovers_removed": report.leftovers_removed})
    else:
        for ref, files in report.corrupt.items():
            typer.echo(f"CORRUPT  {ref}: {', '.join(files)}")
        for path in report.leftovers_removed:
            typer.echo(f"removed unindexed leftover {path}")
        typer.echo(f"{report.checked} versions checked, {len(report.corrupt)} corrupt")
    if not report.ok:
        raise typer.Exit(4)


def _peft_engine_rule(config: dict) -> None:
    """The peft engine's family rule (serve's, called from the composition root)."""
    from serve.runtime.families import family_for

    family_for(config)


@app.command("add-base")
def add_base(
    name: Annotated[str, typer.Argument(help="Name for the base, e.g. qwen2.5-1.5b.")],
    source: Annotated[str, typer.Argument(
        help="Local HF model folder (safetensors), or a Hub id ORG/NAME or "
        "ORG/NAME@REVISION.")],
    hf_id: Annotated[str, typer.Option("--hf-id", help="Hub id a local folder came from.")] = "",
    max_gb: Annotated[float, typer.Option(
        "--max-gb", help="Refuse a Hub download larger than this many GB.")] = 20.0,
    no_size_cap: Annotated[bool, typer.Option(
        "--no-size-cap", help="Download whatever the size.")] = False,
    any_architecture: Annotated[bool, typer.Option(
        "--any-architecture",
        help="Accept an architecture the peft engine does not serve (vllm/llama.cpp).",
    )] = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a base: a local HF folder (referenced in place) or a Hub repo (downloaded).

    A Hub id is resolved to its commit (recorded); only safetensors, config, tokenizer, chat
    template, generation config and card are fetched, into $LORADOCK_HOME/bases (a rerun
    resumes). Gated repos need HF_TOKEN. Needs network access for a Hub id.

    Example: loradock hub add-base qwen2.5-1.5b Qwen/Qwen2.5-1.5B-Instruct
    """
    import sys

    from hub import hf_bases

    check = None if any_architecture else _peft_engine_rule
    store = _store()
    folder = Path(source).expanduser()
    if folder.is_dir() or not hf_bases.looks_like_hub_id(source):
        if not folder.is_dir():
            hf_bases.parse_spec(source)  # raises: neither a folder nor a Hub id
        config = folder / "config.json"
        if check is not None and config.is_file():
            check(json.loads(config.read_text()))
        info = store.add_base(name, folder, hf_id=hf_id)
    else:
        def shown(plan: hf_bases.BasePlan) -> None:
            skipped = f", {len(plan.skipped)} other files skipped" if plan.skipped else ""
            typer.echo(f"{plan.repo_id}@{plan.revision} = commit {plan.sha[:12]}: "
                       f"{len(plan.files)} files, {plan.total_bytes / 1e9:.2f} GB{skipped}",
                       err=True)

        info = hf_bases.add_base_from_hub(
            store, name, source, max_bytes=None if no_size_cap else int(max_gb * 1e9),
            check_config=check, on_plan=shown, progress=sys.stderr.isatty())
    if as_json:
        _print_json(_base_json(info))
    else:
        origin = f", {info.hf_id}@{info.revision[:12]}" if info.revision else ""
        typer.echo(f"base {info.name}: {info.architecture}, {info.num_parameters / 1e6:.0f}M "
                   f"params, fingerprint {info.fingerprint[:12]}{origin}")


@app.command("push")
def push(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo id ORG/NAME.")],
    private: Annotated[bool, typer.Option(
        "--private", help="Create the repo private; refuse an existing public one.")] = False,
    allow_draft: Annotated[bool, typer.Option("--allow-draft",
                                              help="Push even if the card is draft.")] = False,
    force_tag: Annotated[bool, typer.Option(
        "--force-tag", help="Move an existing vN tag that points at other content.")] = False,
) -> None:
    """Upload an adapter version to the Hugging Face Hub and tag it vN (token from HF_TOKEN).

    Files an earlier push left in the repo are deleted in the same commit; an existing vN on
    other content is refused unless --force-tag.

    Example: HF_TOKEN=... loradock hub push json-extract@1 --repo my-org/json-extract
    """
    from hub import remote

    store = _store()
    name, version = parse_adapter_ref(ref)
    result = remote.push(store, store.get(name, version), repo, private=private,
                         allow_draft=allow_draft, force_tag=force_tag)
    if result.already:
        typer.echo(f"{result.repo_id} tag {result.tag} already holds {ref} "
                   f"(commit {result.commit[:12]}); nothing uploaded")
    elif result.moved_from:
        typer.echo(f"pushed {ref} to {result.repo_id} at {result.commit[:12]}, moved tag "
                   f"{result.tag} from {result.moved_from[:12]}")
    else:
        typer.echo(f"pushed {ref} to {result.repo_id} at {result.commit[:12]}, "
                   f"tagged {result.tag}")


@app.command("pull")
def pull(
    spec: Annotated[str, typer.Argument(
        help="ORG/NAME (newest vN tag) or ORG/NAME@REV (tag, branch, commit).")],
    name: Annotated[str | None, typer.Option("--name", help="Local adapter name.")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="Registered base model (default: the one the push recorded).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an adapter from the Hugging Face Hub, pinned and digest-checked, and register it.

    The revision is resolved to its commit (recorded as the source); only the files the push
    listed are fetched, and each must match its published sha256.

    Example: loradock hub pull my-org/json-extract@v1 --name json-extract
    """
    from hub import remote

    record = remote.pull(_store(), spec, name=name, base=base)
    if as_json:
        _print_json(record.to_dict())
    else:
        typer.echo(f"pulled {spec} ({record.source}) as {record.model}")
