"""The store's records: one adapter version, a resolved model string, a verify report.

Also `AdapterSource`, the interface of a remote a store pulls missing adapters from.

Plain data shared by `hub.store` (which builds them from its index) and every reader (serve,
export, the CLI, `hub.remote`). ``hub.store`` re-exports them.

Where the job ends: data and (de)serialisation; nothing here reads the index or the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hub.bases import BaseInfo
from hub.files import fingerprint
from hub.manifest import AdapterManifest, Capabilities

if TYPE_CHECKING:
    from hub.store import Store


@dataclass
class AdapterRecord:
    """One registered adapter version.

    Attributes:
        name: Adapter name.
        version: 1, 2, ...
        base: Base model name it is registered against.
        path: Its immutable folder in the store.
        files: ``{relative path: sha256}`` recorded at registration.
        capabilities: What engines need to know (rank, DoRA, modules_to_save...).
        manifest: The training manifest, if the folder had one.
        parent: ``NAME@V`` this adapter was trained from, if any.
        source: Where it was registered from (a local path or ``hf://ORG/NAME@REV``).
        created_at: UTC timestamp.
    """

    name: str
    version: int
    base: str
    path: Path
    files: dict[str, str]
    capabilities: Capabilities
    manifest: AdapterManifest | None = None
    parent: str | None = None
    source: str = ""
    created_at: str = ""

    @property
    def model(self) -> str:
        """The model string apps send: ``BASE+NAME@V``."""
        return f"{self.base}+{self.name}@{self.version}"

    @property
    def digest(self) -> str:
        """One sha256 over all files: a stable identity for this version's content."""
        return fingerprint(self.files)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (what ``hub show --json`` prints)."""
        return {
            "kind": "adapter",
            "name": self.name,
            "version": self.version,
            "base": self.base,
            "model": self.model,
            "path": str(self.path),
            "digest": self.digest,
            "parent": self.parent,
            "source": self.source,
            "created_at": self.created_at,
            "capabilities": self.capabilities.to_dict(),
            "files": self.files,
            "manifest": self.manifest.to_dict() if self.manifest else None,
        }


@dataclass
class Resolved:
    """A model string resolved against the store."""

    base: BaseInfo
    adapter: AdapterRecord | None = None

    @property
    def model(self) -> str:
        """Canonical model string with the version pinned."""
        return self.adapter.model if self.adapter else self.base.name


@dataclass
class VerifyReport:
    """What ``hub verify`` found."""

    checked: int = 0
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    leftovers_removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every recorded file is present and unchanged."""
        return not self.corrupt


class AdapterSource(Protocol):
    """Where a store pulls adapters it does not hold (`hub.replica.HfRemote`)."""

    spec: str

    def fetch(self, store: Store, name: str, version: int | None) -> AdapterRecord:
        """Pull ``name@version`` (latest when None) into ``store`` and return its record.

        Raises:
            NotFound: The remote has no such adapter or version.
        """
        ...
