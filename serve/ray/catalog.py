"""What the ingress resolves model strings against: content ids, and the remote's catalogue.

A request's adapter becomes one immutable content id, ``NAME@V:DIGEST`` (`content_id`), the
multiplexed model id Ray Serve routes by: a new version, or the same tag moved to other content,
is a new id, so a replica can never answer it from an older copy.

`RemoteCatalog` is the ingress's `hub.store.Store`: with a remote (``hf:ORG``) it answers `get`
(and so `Store.resolve`) from the remote's tags and published digests file
(``loradock.digests.json`` at the tag's commit), without downloading any weights; the engine
replicas do the verified pulls. Tags are re-read after ``tags_ttl_s`` (a version published after
start is seen within that time); a digests file is read once per commit (commits are immutable).

Where the job ends: naming and resolution. Pulls and their checks are `hub.remote`'s, routing is
Ray's.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from hub.errors import InvalidInput, NotFound, RemoteError
from hub.manifest import Capabilities
from hub.names import validate_name
from hub.records import AdapterRecord
from hub.store import Store

_CONTENT_ID = re.compile(r"([a-z0-9][a-z0-9._-]{0,63})@([1-9][0-9]{0,8}):([0-9a-f]{64})")


def content_id(record: AdapterRecord) -> str:
    """``NAME@V:DIGEST``: the multiplexed model id of one adapter version's content."""
    return f"{record.name}@{record.version}:{record.digest}"


def parse_content_id(model_id: str) -> tuple[str, int, str]:
    """``(name, version, digest)`` of a `content_id`.

    Raises:
        InvalidInput: Not a content id.
    """
    match = _CONTENT_ID.fullmatch(model_id or "")
    if match is None:
        raise InvalidInput(f"{model_id[:120]!r} is not an adapter content id",
                           fix="Send requests through the loradock ingress.", param="model")
    return match.group(1), int(match.group(2)), match.group(3)


class RemoteCatalog(Store):
    """A store whose adapters are the remote's versions, resolved without downloading weights.

    Records it returns carry the published names, version, base and file digests; their
    ``path`` is empty and their ``capabilities`` unknown (rank 0): only the engine replicas hold
    the files and check what they can serve.

    Args:
        home: A local store root (it holds the base's registration only).
        remote: ``hf:ORG``.
        cache: Converted-base cache (as for `Store`).
        tags_ttl_s: Seconds a repo's tag list is reused before it is read again.
    """

    def __init__(self, home: Path | None, remote: str, *, cache: Path | None = None,
                 tags_ttl_s: float = 2.0) -> None:
        super().__init__(home, cache)
        from hub.replica import open_remote

        self._hub = open_remote(remote)
        self.remote_spec = self._hub.spec
        self.tags_ttl_s = tags_ttl_s
        self._lock = threading.Lock()
        self._tags: dict[str, tuple[float, dict[int, str]]] = {}
        self._digests: dict[tuple[str, str], dict] = {}
        self._seen: dict[tuple[str, int], AdapterRecord] = {}

    def _org(self) -> str:
        if not self._hub.org:
            from hub.remote import hub_api, remote_error

            try:
                self._hub.org = str(hub_api().whoami()["name"])
            except Exception as exc:
                raise remote_error("look up the user of HF_TOKEN on", "the Hub", exc) from exc
        return self._hub.org

    def _version_tags(self, repo_id: str, name: str) -> dict[int, str]:
        from hub.remote import hub_api, is_missing, remote_error, version_tags

        with self._lock:
            cached = self._tags.get(repo_id)
        if cached is not None and time.monotonic() - cached[0] < self.tags_ttl_s:
            return cached[1]
        try:
            tags = version_tags(hub_api(), repo_id)
        except Exception as exc:
            if is_missing(exc):
                raise NotFound(f"Adapter {name!r} is not on the Hub ({repo_id})",
                               fix="Push it with `loradock hub push`.", param="model") from None
            raise remote_error("list the versions of", repo_id, exc) from exc
        with self._lock:
            self._tags[repo_id] = (time.monotonic(), tags)
        return tags

    def _digests_at(self, repo_id: str, commit: str) -> dict:
        from hub.remote import DIGESTS_FILE, hub_api, read_digests, remote_error

        key = (repo_id, commit)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        try:
            doc = read_digests(hub_api(), repo_id, commit)
        except RemoteError:
            raise
        except Exception as exc:
            raise remote_error("read the digests of", repo_id, exc) from exc
        if doc is None:
            raise RemoteError(f"{repo_id}@{commit[:12]} has no {DIGESTS_FILE}, so its content "
                              "cannot be pinned", fix="Push it with `loradock hub push`.")
        with self._lock:
            self._digests[key] = doc
        return doc

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """The remote's ``name@version`` (newest ``vN`` when None), from its digests file.

        Raises:
            NotFound: No such repo or version tag.
            RemoteError: The remote failed, or the version was not pushed by loradock.
        """
        validate_name(name)
        repo_id = f"{self._org()}/{name}"
        tags = self._version_tags(repo_id, name)
        if not tags:
            raise NotFound(f"{repo_id} has no vN tag", fix="Push it with `loradock hub push`.",
                           param="model")
        version = max(tags) if version is None else version
        if version not in tags:
            raise NotFound(f"Adapter {name}@{version} is not on the Hub ({repo_id} has no tag "
                           f"v{version})", fix="See the repo's vN tags.", param="model")
        commit = tags[version]
        doc = self._digests_at(repo_id, commit)
        files = {str(k): str(v) for k, v in doc["files"].items()}
        record = AdapterRecord(
            name=name, version=version, base=str(doc.get("base") or "smollm2"), path=Path(),
            files=files, capabilities=Capabilities(rank=0, alpha=0.0, target_modules=[]),
            source=f"hf://{repo_id}@{commit}",
        )
        with self._lock:
            self._seen[(name, version)] = record
        return record

    def list(self, name: str | None = None, *, all_versions: bool = True) -> list[AdapterRecord]:
        """The versions this ingress has resolved so far (the remote is the catalogue)."""
        with self._lock:
            records = sorted(self._seen.values(), key=lambda r: (r.name, r.version))
        if name is not None:
            records = [r for r in records if r.name == name]
        if not all_versions:
            records = list({r.name: r for r in records}.values())
        return records
