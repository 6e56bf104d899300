"""Push registered adapters to, and pull them from, the Hugging Face Hub; lazy pulls for replicas.

``push`` uploads a version's folder (its README.md card included) plus ``loradock.digests.json``
(name, version, base and the sha256 of every file) in one commit that also deletes every file an
earlier push left, then tags that commit ``vN``. An existing ``vN`` on another content is refused
(``force_tag`` moves it and says so); ``private`` refuses an existing public repo; the card must
pass `hub.card`'s rule; no file may contain this machine's home, temp or working folder.

``pull`` resolves the revision (default: the newest ``vN`` tag) to its commit sha, reads the
digests file at that commit, downloads only the files it lists that are allowed (no pickle, no
hidden or ``checkpoint-*`` entry, known suffixes), checks each against its digest, and registers
the folder through `Store.register` with those digests as the expected content, so the store's
own copy is verified again. The record's source is ``hf://ORG/NAME@COMMIT``.

`hub.replica.HfRemote` builds on `pull` for ``Store(remote="hf:ORG")``: lazy pulls for replicas.

The endpoint comes from ``HF_ENDPOINT`` (huggingface_hub's own variable) and the token from
``HF_TOKEN``. The token is handed to huggingface_hub and never printed, logged or put in an error
message: errors from the remote are re-raised as `RemoteError` with the status and the remote's
own message only.

Where the job ends: this module moves folders and checks what crosses the wire; validation and
indexing of a folder are `hub.store`'s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hub.card import draft_reasons
from hub.errors import (
    Conflict,
    DigestMismatch,
    DraftCard,
    InvalidInput,
    InvalidName,
    LoradockError,
    NotFound,
    RemoteError,
    UnsafeWeights,
)
from hub.files import TMP_PREFIX, is_pickle_name, sha256_file
from hub.manifest import CARD_FILE
from hub.names import validate_name
from hub.store import AdapterRecord, Store, skipped_on_copy

_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REV_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,7}")
_VERSION_TAG = re.compile(r"v([1-9][0-9]{0,8})")
DIGESTS_FILE = "loradock.digests.json"
DIGESTS_SCHEMA = 1
PULL_SUFFIXES = (".safetensors", ".json", ".jsonl", ".jinja", ".md", ".png", ".txt")
_TEXT_SUFFIXES = (".json", ".jsonl", ".jinja", ".md", ".txt", ".csv", ".yaml", ".yml")


@dataclass
class PushResult:
    """What a push did.

    Attributes:
        moved_from: The commit ``tag`` pointed at before ``--force-tag`` moved it.
        already: The tag already held exactly this content; nothing was uploaded.
    """

    repo_id: str
    commit: str
    tag: str
    files: list[str]
    url: str
    moved_from: str | None = None
    already: bool = False


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
    """True when the card may not be published (`hub.card`'s rule; kept for callers)."""
    return bool(draft_reasons(readme))


def hub_api():  # noqa: ANN202 - huggingface_hub is imported lazily
    """An ``HfApi`` on ``HF_ENDPOINT`` with ``HF_TOKEN`` (progress bars off)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the CLI prints one line per command; servers log no bars

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None,
                 token=os.environ.get("HF_TOKEN") or None)


def _status(exc: Exception) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def remote_error(action: str, repo_id: str, exc: Exception) -> RemoteError:
    """`RemoteError` for a failed Hub call: the status and the Hub's message, never the token."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return RemoteError(f"Could not {action} {repo_id!r}: HF_HUB_OFFLINE is set",
                           fix="Set HF_HUB_OFFLINE=0 (the images set 1) to reach the Hub.")
    status = _status(exc)
    detail = f"HTTP {status}" if status else type(exc).__name__
    server_message = getattr(exc, "server_message", None)
    if server_message:
        detail += f": {str(server_message)[:200]}"
    return RemoteError(
        f"Could not {action} {repo_id!r} ({detail})",
        fix="Check HF_TOKEN's permissions, the repo id and HF_ENDPOINT.",
    )


def is_missing(exc: Exception) -> bool:
    """True for huggingface_hub's "no such repo, revision or file" errors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError | EntryNotFoundError)


# -- what may be published ----------------------------------------------------------------


def local_path_needles(store: Store) -> dict[str, str]:
    """The folders of this machine that no published file may name: home, temp, checkout."""
    needles = {
        "home folder": str(Path.home()),
        "temp folder": tempfile.gettempdir(),
        "working folder": os.getcwd(),
        "store": str(store.home.resolve()),
    }
    return {kind: path.rstrip("/") for kind, path in needles.items() if len(path.rstrip("/")) > 1}


def local_paths_in(folder: Path, files: list[str], needles: dict[str, str]) -> list[str]:
    """``FILE: KIND`` for each text file under ``folder`` that names one of ``needles``."""
    patterns = {kind: re.compile(re.escape(path) + r"(?=[/\\\"'\s,;)]|$)")
                for kind, path in needles.items()}
    found = []
    for rel in files:
        if not rel.endswith(_TEXT_SUFFIXES):
            continue
        text = (Path(folder) / rel).read_text(encoding="utf-8", errors="replace")
        found += [f"{rel}: {kind}" for kind, pattern in patterns.items() if pattern.search(text)]
    return found


def _check_publishable(store: Store, record: AdapterRecord, allow_draft: bool) -> None:
    reasons = draft_reasons(record.path / CARD_FILE)
    if reasons and not allow_draft:
        raise DraftCard(
            f"The model card of {record.name}@{record.version} is missing, marked draft, or not "
            f"checked by loradock ({'; '.join(reasons[:3])})",
            fix="Complete the items listed under 'To complete before publishing' and regenerate "
            "it with `loradock card`, or pass --allow-draft.",
        )
    leaks = local_paths_in(record.path, sorted(record.files), local_path_needles(store))
    if leaks:
        raise InvalidInput(
            f"{record.name}@{record.version} names local folders of this machine in files meant "
            f"for the Hub ({'; '.join(leaks[:5])})",
            fix="Regenerate those files with this loradock (it writes names, not paths), "
            "register again and push the new version.",
        )


def digests_document(record: AdapterRecord) -> dict[str, Any]:
    """The ``loradock.digests.json`` a push uploads beside the files."""
    return {"schema": DIGESTS_SCHEMA, "name": record.name, "version": record.version,
            "base": record.base, "digest": record.digest,
            "files": dict(sorted(record.files.items()))}


@contextmanager
def _staged(store: Store, record: AdapterRecord) -> Iterator[Path]:
    """The folder to upload: the version's files (hard links) plus the digests file."""
    # A hidden .tmp-PID-* folder: the store removes it if this process dies (`verify`).
    stage = store.adapters_dir / f"{TMP_PREFIX}{os.getpid()}-push-{uuid.uuid4().hex[:8]}"
    try:
        for rel in record.files:
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(record.path / rel, target)
            except OSError:
                shutil.copyfile(record.path / rel, target)
        (stage / DIGESTS_FILE).write_text(json.dumps(digests_document(record), indent=2) + "\n")
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- push ---------------------------------------------------------------------------------


def push(
    store: Store,
    record: AdapterRecord,
    repo_id: str,
    *,
    private: bool = False,
    allow_draft: bool = False,
    force_tag: bool = False,
) -> PushResult:
    """Upload ``record`` to ``repo_id`` (stale files deleted) and tag the commit ``v<version>``.

    Raises:
        DraftCard: The card is missing or draft and ``allow_draft`` is False.
        InvalidInput: A file names a local folder of this machine.
        StoreCorrupt: The stored files changed since registration.
        Conflict: ``vN`` exists on other content (without ``force_tag``), was created by
            another push meanwhile, or ``private`` was asked for an existing public repo.
        RemoteError: The Hub refused or failed.
    """
    validate_repo_id(repo_id)
    store.check(record)
    _check_publishable(store, record, allow_draft)
    api = hub_api()
    tag = f"v{record.version}"
    try:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            info = api.repo_info(repo_id, repo_type="model")
        except RepositoryNotFoundError:
            info = None
        if info is None:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        elif private and not info.private:
            raise Conflict(
                f"--private was asked but {repo_id} already exists and is public",
                fix="Make the repo private on the Hub first, or push without --private.",
                param="private",
            )
        old = _tag_target(api, repo_id, tag) if info is not None else None
        if old is not None:
            published = read_digests(api, repo_id, old)
            if published is not None and published.get("digest") == record.digest:
                return PushResult(repo_id, old, tag, sorted(record.files),
                                  f"{api.endpoint}/{repo_id}/commit/{old}", already=True)
            if not force_tag:
                raise Conflict(
                    f"Tag {tag} of {repo_id} already points at commit {old[:12]}, which holds "
                    f"other files than {record.name}@{record.version} ({record.digest[:12]})",
                    fix=f"Push under another version, or pass --force-tag to move {tag} to "
                    "this content.",
                )
        with _staged(store, record) as folder:
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), repo_type="model",
                commit_message=f"loradock: {record.name}@{record.version} "
                f"({record.digest[:12]})",
                delete_patterns="*",
            )
        if old is not None:
            api.delete_tag(repo_id, tag=tag, repo_type="model")
        _create_tag(api, repo_id, tag, commit.oid)
    except LoradockError:
        raise
    except Exception as exc:  # huggingface_hub raises many HTTP error types
        raise remote_error("push to", repo_id, exc) from exc
    return PushResult(repo_id, commit.oid, tag, sorted(record.files), str(commit.commit_url),
                      moved_from=old)


def _tag_target(api: Any, repo_id: str, tag: str) -> str | None:
    refs = api.list_repo_refs(repo_id, repo_type="model")
    return next((t.target_commit for t in refs.tags if t.name == tag), None)


def version_tags(api: Any, repo_id: str) -> dict[int, str]:
    """``{N: commit sha}`` for every ``vN`` tag of ``repo_id``."""
    refs = api.list_repo_refs(repo_id, repo_type="model")
    found = {}
    for ref in refs.tags:
        match = _VERSION_TAG.fullmatch(ref.name)
        if match:
            found[int(match.group(1))] = ref.target_commit
    return found


def _create_tag(api: Any, repo_id: str, tag: str, commit: str) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=tag, revision=commit, repo_type="model", exist_ok=False)
    except HfHubHTTPError as exc:
        if _status(exc) != 409:
            raise
        raise Conflict(
            f"Tag {tag} of {repo_id} was created by another push while this one uploaded; "
            f"this upload is commit {commit[:12]}, left untagged",
            fix=f"Check what {tag} holds (`loradock hub pull {repo_id}@{tag}`), then push "
            "again (with --force-tag if this content should be the one).",
        ) from None


# -- pull ---------------------------------------------------------------------------------


def read_digests(api: Any, repo_id: str, commit: str) -> dict[str, Any] | None:
    """The digests file at ``commit``, or None when the repo was not pushed by loradock."""
    with tempfile.TemporaryDirectory(prefix="loradock-digests-") as tmp:
        try:
            path = api.hf_hub_download(repo_id, DIGESTS_FILE, revision=commit, local_dir=tmp,
                                       repo_type="model")
        except Exception as exc:
            if is_missing(exc):
                return None
            raise
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            data = None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise RemoteError(f"{DIGESTS_FILE} of {repo_id}@{commit[:12]} is not a digests file",
                          fix="Push the version again with `loradock hub push`.")
    return data


def check_pull_name(rel: str, repo_id: str) -> None:
    """Raise unless ``rel`` is a file a pull may fetch (safe path, allowed kind, no pickle).

    Raises:
        UnsafeWeights: A pickle-format file.
        InvalidInput: An unsafe path or a kind of file adapters do not hold.
    """
    parts = PurePosixPath(rel).parts
    if not _FILE_RE.fullmatch(rel) or any(p in (".", "..") for p in parts):
        raise InvalidInput(f"{repo_id} lists an unsafe file name {rel!r}",
                           fix="Only pull adapters pushed by `loradock hub push`.")
    if is_pickle_name(rel):
        raise UnsafeWeights(f"Refusing pickle weights {rel!r} in {repo_id}: pickle can run code "
                            "on load", fix="Ask the publisher for safetensors weights.")
    if any(skipped_on_copy(p) for p in parts) or not rel.endswith(PULL_SUFFIXES):
        raise InvalidInput(f"{repo_id} lists {rel!r}, which is not a file adapters hold",
                           fix="Only pull adapters pushed by `loradock hub push`.")


def _resolve_commit(api: Any, repo_id: str, revision: str | None) -> tuple[str, str]:
    """``(revision shown, commit sha)``; default revision: the newest ``vN`` tag, else main."""
    if revision is None:
        tags = version_tags(api, repo_id)
        if tags:
            newest = max(tags)
            return f"v{newest}", tags[newest]
        revision = "main"
    info = api.repo_info(repo_id, revision=revision, repo_type="model")
    if not info.sha:
        raise NotFound(f"{repo_id}@{revision} has no commit", fix="Push a version first.")
    return revision, info.sha


def pull(
    store: Store,
    spec: str,
    *,
    name: str | None = None,
    base: str | None = None,
    version: int | None = None,
) -> AdapterRecord:
    """Download ``ORG/NAME[@REV]`` pinned to its commit, verify it, and register it.

    Args:
        store: Where to register.
        spec: ``ORG/NAME`` (newest ``vN`` tag, else main) or ``ORG/NAME@REV``.
        name: Local adapter name (default: the repo's name, lower-cased).
        base: Base to register against (default: the one the digests file names, else smollm2).
        version: Register as exactly this version (replicas keep the Hub's ``vN``).

    Raises:
        InvalidName: Bad repo id, revision or adapter name.
        NotFound: No such repo or revision.
        UnsafeWeights, InvalidInput: The repo lists a file a pull may not fetch.
        DigestMismatch: A downloaded file differs from its published digest.
        RemoteError: The Hub refused or failed.
        (and everything `Store.register` raises)
    """
    repo_id, _, asked = spec.partition("@")
    validate_repo_id(repo_id)
    if asked and (not _REV_RE.fullmatch(asked) or ".." in asked):
        raise InvalidName(f"Invalid revision {asked!r}", fix="Use a tag, branch or commit.")
    adapter_name = validate_name(name or repo_id.split("/", 1)[1].lower())
    api = hub_api()
    staging = store.adapters_dir / f"{TMP_PREFIX}{os.getpid()}-pull-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        try:
            revision, commit = _resolve_commit(api, repo_id, asked or None)
            digests = read_digests(api, repo_id, commit)
            if digests is not None:
                files = {str(k): str(v) for k, v in digests["files"].items()}
            else:  # not pushed by loradock: the allowed files, checked as any local folder
                names = api.list_repo_files(repo_id, revision=commit, repo_type="model")
                files = {n: "" for n in names if n.endswith(PULL_SUFFIXES)
                         and not any(skipped_on_copy(p) for p in PurePosixPath(n).parts)}
            for rel in files:
                check_pull_name(rel, repo_id)
            local = staging / "snapshot"
            for rel in sorted(files):
                api.hf_hub_download(repo_id, rel, revision=commit, local_dir=local,
                                    repo_type="model")
        except LoradockError:
            raise
        except Exception as exc:
            shown = f"{repo_id}@{asked or 'newest version'}"
            if is_missing(exc):
                raise NotFound(f"{shown} is not on the Hub",
                               fix="Check the repo id and the version tag.") from None
            raise remote_error("pull", shown, exc) from exc
        shutil.rmtree(local / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
        expect = None
        if digests is not None:
            bad = sorted(rel for rel, digest in files.items()
                         if sha256_file(local / rel) != digest)
            if bad:
                raise DigestMismatch(
                    f"{repo_id}@{revision} (commit {commit[:12]}) sent files that do not match "
                    f"their published digests: {', '.join(bad)}",
                    fix="Do not use this copy; ask the publisher to push the version again.",
                )
            expect = files
        base = base or (digests or {}).get("base") or "smollm2"
        return store.register(local, adapter_name, base, source=f"hf://{repo_id}@{commit}",
                              version=version, expect=expect)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
