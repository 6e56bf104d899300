"""Lazy pulls for replicas: the Hugging Face Hub as the remote a `hub.store.Store` pulls from.

``Store(remote="hf:ORG")`` (``loradock serve --remote hf:ORG``) asks `HfRemote.fetch` for an
adapter it does not hold: repo ``ORG/NAME``, tag ``vN`` (the newest ``vN`` when no version is
asked), pulled by `hub.remote.pull` (pinned to the tag's commit, only the listed allowed files,
each checked against its published digest) and registered under the same name and version, so
``NAME@N`` means the Hub's ``vN`` on every replica. `hub.store` makes that happen once per name,
however many threads or processes ask at once. Remotes are registered by kind in `REMOTES`.

Where the job ends: naming (ORG/NAME, vN) and choosing the version; moving and checking files is
`hub.remote`'s, single-flight and indexing `hub.store`'s.
"""

from __future__ import annotations

import re

from hub.errors import Conflict, InvalidInput, InvalidName, NotFound
from hub.names import validate_name
from hub.records import AdapterRecord
from hub.remote import hub_api, is_missing, pull, remote_error, version_tags
from hub.store import Store


class HfRemote:
    """Adapters on the Hugging Face Hub as ``ORG/NAME`` tagged ``vN`` (what `push` writes).

    Args:
        org: The Hub namespace; empty: the token's own user (``whoami``), looked up once.
    """

    kind = "hf"

    def __init__(self, org: str = "") -> None:
        if org and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", org):
            raise InvalidName(f"Invalid Hub namespace {org!r} in --remote",
                              fix="Write it as hf:ORG with letters, digits, '.', '_' or '-'.",
                              param="remote")
        self.org = org
        self.spec = f"hf:{org}" if org else "hf"

    def _namespace(self) -> str:
        if not self.org:
            try:
                self.org = str(hub_api().whoami()["name"])
            except Exception as exc:
                raise remote_error("look up the user of HF_TOKEN on", "the Hub", exc) from exc
        return self.org

    def fetch(self, store: Store, name: str, version: int | None) -> AdapterRecord:
        """Pull ``ORG/name`` at tag ``v<version>`` (newest ``vN`` when None) as ``name@N``.

        Raises:
            NotFound: No such repo or version tag on the Hub.
            RemoteError, DigestMismatch: see `pull`.
        """
        validate_name(name)
        repo_id = f"{self._namespace()}/{name}"
        if version is None:
            try:
                tags = version_tags(hub_api(), repo_id)
            except Exception as exc:
                if is_missing(exc):
                    raise NotFound(f"Adapter {name!r} is neither registered nor on the Hub "
                                   f"({repo_id})", fix="Push it with `loradock hub push`.",
                                   param="model") from None
                raise remote_error("list the versions of", repo_id, exc) from exc
            if not tags:
                raise NotFound(f"{repo_id} has no vN tag", fix="Push it with `loradock hub "
                               "push`.", param="model")
            version = max(tags)
        try:
            return pull(store, f"{repo_id}@v{version}", name=name, version=version)
        except Conflict:  # another process sharing this store registered it meanwhile
            return store.get(name, version)
        except NotFound as exc:
            raise NotFound(exc.message, fix=exc.fix, param="model") from None


REMOTES: dict[str, type[HfRemote]] = {"hf": HfRemote}


def open_remote(spec: str) -> HfRemote:
    """Build the remote ``spec`` names: ``hf`` (the token's user) or ``hf:ORG``.

    Raises:
        InvalidInput: An unknown kind of remote.
    """
    kind, _, arg = spec.partition(":")
    if kind not in REMOTES:
        raise InvalidInput(f"Unknown remote {spec!r}", fix="Use hf or hf:ORG.", param="remote")
    return REMOTES[kind](arg)
