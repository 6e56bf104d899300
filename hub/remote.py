"""Push registered adapters to, and pull them from, the Hugging Face Hub.

``push`` uploads a version's folder (its README.md card included) in one commit and tags that
commit ``vN``; ``pull`` downloads a revision into a hidden folder and registers it through
`Store.register`, so a pulled adapter passes every check a local one does.

The endpoint comes from ``HF_ENDPOINT`` (huggingface_hub's own variable) and the token from
``HF_TOKEN``. The token is handed to huggingface_hub and never printed, logged or put in an error
message: errors from the remote are re-raised as `RemoteError` with the status and the remote's
own message only.

Where the job ends: this module moves folders; validation and indexing are `hub.store`'s.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from hub.errors import DraftCard, InvalidName, RemoteError
from hub.manifest import CARD_FILE
from hub.store import AdapterRecord, Store

_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REV_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
DRAFT_KEY = "draft"


@dataclass
class PushResult:
    """What a push did."""

    repo_id: str
    commit: str
    tag: str
    files: list[str]
    url: str


def validate_repo_id(repo_id: str) -> str:
    """Check an ``ORG/NAME`` repo id.

    Raises:
        InvalidName: If it is not two safe path components.
    """
    if not _REPO_RE.fullmatch(repo_id or "") or ".." in repo_id:
        raise InvalidName(
            f"Invalid Hub repo id {repo_id!r}",
            fix="Write it as ORG/NAME with letters, digits, '.', '_' or '-'.",
            param="repo",
        )
    return repo_id


def card_is_draft(readme: Path) -> bool:
    """True unless the model card's YAML metadata says ``draft: false``.

    modelcards/ writes ``draft: true`` plus a "To complete before publishing" list whenever the
    run could not fill every item, and ``draft: false`` when it could. A card without the key
    (PEFT's template full of "[More Information Needed]", a hand-written one) or no card at all
    counts as draft: the hub publishes only what was checked.
    """
    if not readme.is_file():
        return True
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return True
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return True
    return not isinstance(front, dict) or front.get(DRAFT_KEY) is not False


def _api():  # noqa: ANN202 - huggingface_hub is imported lazily
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None,
                 token=os.environ.get("HF_TOKEN") or None)


def _remote_error(action: str, repo_id: str, exc: Exception) -> RemoteError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = f"HTTP {status}" if status else type(exc).__name__
    server_message = getattr(exc, "server_message", None)
    if server_message:
        detail += f": {str(server_message)[:200]}"
    return RemoteError(
        f"Could not {action} {repo_id!r} ({detail})",
        fix="Check HF_TOKEN's permissions, the repo id and HF_ENDPOINT.",
    )


def push(
    store: Store,
    record: AdapterRecord,
    repo_id: str,
    *,
    private: bool = False,
    allow_draft: bool = False,
) -> PushResult:
    """Upload ``record`` to ``repo_id`` and tag the commit ``v<version>``.

    Raises:
        DraftCard: The card is missing or draft and ``allow_draft`` is False.
        StoreCorrupt: The stored files changed since registration.
        RemoteError: The Hub refused or failed.
    """
    validate_repo_id(repo_id)
    store.check(record)
    if card_is_draft(record.path / CARD_FILE) and not allow_draft:
        raise DraftCard(
            f"The model card of {record.name}@{record.version} is missing, marked draft, or not "
            "written by loradock",
            fix="Complete the items listed under 'To complete before publishing' and regenerate "
            "it with `loradock card`, or pass --allow-draft.",
        )
    api = _api()
    tag = f"v{record.version}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(record.path),
            commit_message=f"loradock: {record.name}@{record.version} ({record.digest[:12]})",
            repo_type="model",
        )
        api.create_tag(repo_id, tag=tag, revision=commit.oid, repo_type="model", exist_ok=True)
    except Exception as exc:  # huggingface_hub raises many HTTP error types
        raise _remote_error("push to", repo_id, exc) from exc
    return PushResult(repo_id, commit.oid, tag, sorted(record.files), str(commit.commit_url))


def pull(
    store: Store,
    spec: str,
    *,
    name: str | None = None,
    base: str = "smollm2",
) -> AdapterRecord:
    """Download ``ORG/NAME[@REV]`` and register it (as ``name``, default the repo's name).

    Raises:
        InvalidName: Bad repo id, revision or adapter name.
        RemoteError: The Hub refused or failed.
        (and everything `Store.register` raises)
    """
    repo_id, _, revision = spec.partition("@")
    validate_repo_id(repo_id)
    revision = revision or "main"
    if not _REV_RE.fullmatch(revision) or ".." in revision:
        raise InvalidName(f"Invalid revision {revision!r}", fix="Use a tag, branch or commit.")
    adapter_name = name or repo_id.split("/", 1)[1].lower()
    api = _api()
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=store.home))
    try:
        try:
            folder = api.snapshot_download(
                repo_id=repo_id, revision=revision, local_dir=staging / "snapshot",
                repo_type="model",
            )
        except Exception as exc:
            raise _remote_error("pull", f"{repo_id}@{revision}", exc) from exc
        local = Path(folder)
        shutil.rmtree(local / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
        return store.register(local, adapter_name, base, source=f"hf://{repo_id}@{revision}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
