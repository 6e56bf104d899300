"""The local adapter store: an SQLite index plus one immutable folder per adapter version.

Layout under ``LORADOCK_HOME`` (default ``~/.loradock``)::

    index.sqlite                  bases and adapter versions (the only thing readers trust)
    adapters/NAME/vN/             immutable copy of a registered adapter folder
    adapters/.tmp-PID-XXXX/       a registration in progress (invisible; cleaned when PID is gone)
    cache/                        converted embedded base (``LORADOCK_CACHE`` overrides)

Crash safety: files are copied and hashed in a hidden folder, then, inside one ``BEGIN IMMEDIATE``
transaction, the next version number is taken, the folder renamed into place and the row
inserted. A process killed before the commit leaves at most an unindexed folder, which no reader
sees and the next writer removes. Two processes registering the same name are serialised by
SQLite's write lock and get distinct versions.

Where the job ends: the store registers, lists, resolves, verifies and removes. Talking to remote
hubs is `hub.remote`; checking adapters against bases is `hub.inspect`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.bases import (
    EMBEDDED_BASE,
    BaseInfo,
    convert_embedded,
    describe_base,
    embedded_extra,
    embedded_gguf_path,
)
from hub.errors import Conflict, InvalidInput, NotFound, StoreCorrupt
from hub.files import TMP_PREFIX, fingerprint, hash_tree, refuse_symlinks, sha256_file
from hub.inspect import inspect_adapter
from hub.manifest import ADAPTER_CONFIG_FILE, AdapterManifest, Capabilities
from hub.names import ModelRef, parse_adapter_ref, validate_name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bases (
    name TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    base TEXT NOT NULL,
    files TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    manifest TEXT,
    parent TEXT,
    source TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS last_versions (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
"""
_SKIP_ON_COPY = ("checkpoint-", ".")


def default_home() -> Path:
    """Return the store root: ``$LORADOCK_HOME`` or ``~/.loradock``."""
    return Path(os.environ.get("LORADOCK_HOME") or Path.home() / ".loradock").expanduser()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


class Store:
    """The adapter store rooted at ``home`` (see the module docstring for the layout)."""

    def __init__(self, home: Path | None = None, cache: Path | None = None) -> None:
        self.home = Path(home) if home else default_home()
        env_cache = os.environ.get("LORADOCK_CACHE")
        self.cache = Path(cache) if cache else Path(env_cache) if env_cache else self.home / "cache"
        self.adapters_dir = self.home / "adapters"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._db_path = self.home / "index.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._db_path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- bases ----------------------------------------------------------------------------

    def add_base(self, name: str, path: Path, **extra: Any) -> BaseInfo:
        """Register an HF model folder as base ``name`` (the folder is referenced, not copied).

        Raises:
            InvalidName: Bad name.
            Conflict: A different base already has that name.
            InvalidInput / UnsafeWeights: Not an HF safetensors folder.
        """
        validate_name(name, "base name")
        info = describe_base(name, Path(path), **extra)
        with self._write() as db:
            row = db.execute("SELECT info FROM bases WHERE name=?", (name,)).fetchone()
            if row is not None:
                old = BaseInfo.from_dict(json.loads(row["info"]))
                if old.fingerprint != info.fingerprint:
                    raise Conflict(
                        f"Base {name!r} is already registered with fingerprint "
                        f"{old.fingerprint[:12]} ({old.path})",
                        fix="Choose another name for this base.",
                    )
                return old
            db.execute(
                "INSERT INTO bases (name, info, created_at) VALUES (?, ?, ?)",
                (name, json.dumps(info.to_dict(with_modules=True)), _now()),
            )
        return info

    def base(self, name: str) -> BaseInfo:
        """Return base ``name``, converting the embedded ``smollm2`` on first use.

        Raises:
            NotFound: Unknown base.
        """
        validate_name(name, "base name")
        with self._connect() as db:
            row = db.execute("SELECT info FROM bases WHERE name=?", (name,)).fetchone()
        if row is not None:
            return BaseInfo.from_dict(json.loads(row["info"]))
        if name == EMBEDDED_BASE:
            return self.add_base(name, self._embedded_folder(), **embedded_extra())
        raise NotFound(
            f"Unknown base model {name!r}",
            fix="Use 'smollm2' or add one with `loradock hub add-base NAME PATH`.",
            param="model",
        )

    def bases(self) -> list[BaseInfo]:
        """All registered bases (the embedded one appears once it has been used)."""
        with self._connect() as db:
            rows = db.execute("SELECT info FROM bases ORDER BY name").fetchall()
        return [BaseInfo.from_dict(json.loads(r["info"])) for r in rows]

    def _embedded_folder(self) -> Path:
        """Convert the embedded GGUF once per GGUF content, under a file lock."""
        gguf = embedded_gguf_path()
        key = sha256_file(gguf)[:16]
        folder = self.cache / f"smollm2-{key}"
        if (folder / "config.json").is_file():
            return folder
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".convert.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "config.json").is_file():
                convert_embedded(folder)
        return folder

    # -- adapters -------------------------------------------------------------------------

    def register(
        self,
        src: Path,
        name: str,
        base: str = EMBEDDED_BASE,
        *,
        parent: str | None = None,
        source: str | None = None,
    ) -> AdapterRecord:
        """Copy a PEFT LoRA folder into the store as the next version of ``name``.

        Args:
            src: The adapter folder.
            name: Adapter name (``[a-z0-9][a-z0-9._-]{0,63}``).
            base: Registered base name the adapter must fit.
            parent: ``NAME@V`` this adapter was trained from (recorded as lineage).
            source: What to record as the origin (defaults to the resolved ``src``).

        Returns:
            The new record.

        Raises:
            InvalidName, NotFound, NotAnAdapter, UnsafeWeights, Incompatible: see `inspect_adapter`.
        """
        validate_name(name)
        src = Path(src)
        base_info = self.base(base)
        capabilities = inspect_adapter(src, base_info)
        refuse_symlinks(src)
        manifest = AdapterManifest.read(src)
        if parent is None and manifest is not None:
            parent = manifest.parent
        self._remove_dead_tmp()
        tmp = self.adapters_dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, tmp, ignore=_ignore_on_copy, symlinks=True)
            self._normalise_config(tmp, base_info)
            files = hash_tree(tmp)
            _make_read_only(tmp)
            with self._write() as db:
                # Version numbers are never reused, even after `remove`: NAME@V is immutable.
                row = db.execute(
                    "SELECT MAX(COALESCE((SELECT MAX(version) FROM adapters WHERE name=?), 0),"
                    " COALESCE((SELECT version FROM last_versions WHERE name=?), 0)) AS v",
                    (name, name),
                ).fetchone()
                version = int(row["v"]) + 1
                db.execute(
                    "INSERT INTO last_versions (name, version) VALUES (?, ?) ON CONFLICT(name)"
                    " DO UPDATE SET version=excluded.version",
                    (name, version),
                )
                final = self.adapters_dir / name / f"v{version}"
                if final.exists():  # unindexed leftover of a writer killed after its rename
                    _rmtree(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(final)
                record = AdapterRecord(
                    name=name,
                    version=version,
                    base=base_info.name,
                    path=final,
                    files=files,
                    capabilities=capabilities,
                    manifest=manifest,
                    parent=parent,
                    source=source or str(src.resolve()),
                    created_at=_now(),
                )
                db.execute(
                    "INSERT INTO adapters (name, version, base, files, capabilities, manifest,"
                    " parent, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        version,
                        record.base,
                        json.dumps(files),
                        json.dumps(capabilities.to_dict()),
                        json.dumps(manifest.to_dict()) if manifest else None,
                        parent,
                        record.source,
                        record.created_at,
                    ),
                )
        finally:
            if tmp.exists():
                _rmtree(tmp)
        return record

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """Return ``name@version`` (latest when ``version`` is None).

        Raises:
            NotFound: No such adapter or version.
        """
        validate_name(name)
        with self._connect() as db:
            if version is None:
                row = db.execute(
                    "SELECT * FROM adapters WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT * FROM adapters WHERE name=? AND version=?", (name, version)
                ).fetchone()
        if row is None:
            shown = name if version is None else f"{name}@{version}"
            raise NotFound(
                f"Adapter {shown!r} is not registered",
                fix="See `loradock hub list` for what is registered.",
                param="model",
            )
        return self._record(row)

    def list(self, name: str | None = None, *, all_versions: bool = True) -> list[AdapterRecord]:
        """List adapter versions, newest version last per name."""
        query = "SELECT * FROM adapters"
        args: tuple = ()
        if name is not None:
            validate_name(name)
            query += " WHERE name=?"
            args = (name,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY name, version", args).fetchall()
        records = [self._record(r) for r in rows]
        if not all_versions:
            latest: dict[str, AdapterRecord] = {}
            for record in records:
                latest[record.name] = record
            records = list(latest.values())
        return records

    def resolve(self, model: str) -> Resolved:
        """Resolve ``BASE``, ``BASE+NAME`` or ``BASE+NAME@V``.

        Raises:
            InvalidName: Malformed string.
            NotFound: Unknown base, adapter or version.
            Incompatible: The adapter is registered against another base.
        """
        ref = ModelRef.parse(model)
        base = self.base(ref.base)
        if ref.adapter is None:
            return Resolved(base)
        record = self.get(ref.adapter, ref.version)
        if record.base != base.name:
            from hub.errors import Incompatible

            raise Incompatible(
                f"Adapter {record.name}@{record.version} belongs to base {record.base!r}, "
                f"not {base.name!r}",
                fix=f"Call it as model='{record.base}+{record.name}'.",
                param="model",
            )
        return Resolved(base, record)

    def resolve_adapter(self, model: str) -> tuple[AdapterRecord, BaseInfo]:
        """Resolve an adapter given as ``NAME[@V]`` or ``BASE+NAME[@V]`` to its record and base.

        Raises:
            InvalidInput: ``model`` names a base only.
            InvalidName: Malformed string.
            NotFound: Unknown base, adapter or version.
            Incompatible: ``BASE`` is not the base the adapter is registered against.
        """
        if "+" not in model:
            name, version = parse_adapter_ref(model)
            try:
                record = self.get(name, version)
            except NotFound:
                if version is None and name in {b.name for b in self.bases()}:
                    raise InvalidInput(f"{model!r} names a base, not an adapter",
                                       fix="Use NAME[@V] or BASE+NAME[@V].", param="model"
                                       ) from None
                raise
            return record, self.base(record.base)
        resolved = self.resolve(model)
        if resolved.adapter is None:
            raise InvalidInput(f"{model!r} names a base, not an adapter",
                               fix="Use NAME[@V] or BASE+NAME[@V].", param="model")
        return resolved.adapter, resolved.base

    def remove(self, name: str, version: int) -> AdapterRecord:
        """Remove one version: the row first (so readers stop seeing it), then its folder."""
        record = self.get(name, version)
        with self._write() as db:
            db.execute("DELETE FROM adapters WHERE name=? AND version=?", (name, version))
        trash = self.adapters_dir / f"{TMP_PREFIX}{os.getpid()}-rm-{uuid.uuid4().hex[:8]}"
        if record.path.exists():
            record.path.rename(trash)
            _rmtree(trash)
        return record

    def verify(self) -> VerifyReport:
        """Re-hash every registered file and clean leftovers of killed writers.

        Unindexed folders (a writer killed between rename and commit) and dead ``.tmp-*``
        folders are removed; they were never visible.
        """
        report = VerifyReport()
        report.leftovers_removed = [str(p) for p in self._remove_dead_tmp()]
        indexed: set[Path] = set()
        for record in self.list():
            report.checked += 1
            indexed.add(record.path)
            bad = [
                rel
                for rel, digest in record.files.items()
                if not (record.path / rel).is_file() or sha256_file(record.path / rel) != digest
            ]
            if record.path.exists():
                present = {
                    p.relative_to(record.path).as_posix()
                    for p in record.path.rglob("*") if p.is_file()
                }
                bad += sorted(present - set(record.files))
            if bad:
                report.corrupt[f"{record.name}@{record.version}"] = bad
        with self._write():  # no registration may be between rename and commit meanwhile
            for name_dir in self.adapters_dir.iterdir():
                if not name_dir.is_dir() or name_dir.name.startswith(TMP_PREFIX):
                    continue
                for version_dir in name_dir.iterdir():
                    if version_dir not in indexed:
                        _rmtree(version_dir)
                        report.leftovers_removed.append(str(version_dir))
        return report

    def check(self, record: AdapterRecord) -> None:
        """Raise if ``record``'s files differ from what was registered (used before serving).

        Raises:
            StoreCorrupt: Naming the changed or missing files.
        """
        bad = [
            rel
            for rel, digest in record.files.items()
            if not (record.path / rel).is_file() or sha256_file(record.path / rel) != digest
        ]
        if bad:
            raise StoreCorrupt(
                f"Adapter {record.name}@{record.version} has changed on disk: {', '.join(bad)}",
                fix=f"Remove it (`loradock hub rm {record.name}@{record.version}`) and register "
                "it again.",
            )

    # -- helpers --------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> AdapterRecord:
        manifest = json.loads(row["manifest"]) if row["manifest"] else None
        return AdapterRecord(
            name=row["name"],
            version=int(row["version"]),
            base=row["base"],
            path=self.adapters_dir / row["name"] / f"v{row['version']}",
            files=json.loads(row["files"]),
            capabilities=Capabilities.from_dict(json.loads(row["capabilities"])),
            manifest=AdapterManifest.from_dict(manifest) if manifest else None,
            parent=row["parent"],
            source=row["source"],
            created_at=row["created_at"],
        )

    @staticmethod
    def _normalise_config(folder: Path, base: BaseInfo) -> None:
        """Point ``base_model_name_or_path`` at the hub's base id, not a local path."""
        path = folder / ADAPTER_CONFIG_FILE
        config = json.loads(path.read_text())
        wanted = base.hf_id or base.name
        if config.get("base_model_name_or_path") != wanted:
            config["base_model_name_or_path"] = wanted
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _remove_dead_tmp(self) -> list[Path]:
        removed = []
        for path in self.adapters_dir.glob(f"{TMP_PREFIX}*"):
            pid_text = path.name[len(TMP_PREFIX):].split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            _rmtree(path)
            removed.append(path)
        return removed


def _ignore_on_copy(directory: str, names: list[str]) -> list[str]:
    del directory
    return [n for n in names if n.startswith(_SKIP_ON_COPY)]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_read_only(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _rmtree(folder: Path) -> None:
    """Remove a tree whose files and folders may be read-only."""
    def _onerror(func: Any, path: str, _exc: Any) -> None:
        os.chmod(path, stat.S_IRWXU)
        func(path)

    if folder.exists():
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(folder, onerror=_onerror)


__all__ = [
    "AdapterRecord",
    "InvalidInput",
    "Resolved",
    "Store",
    "VerifyReport",
    "default_home",
]
