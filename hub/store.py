"""The local adapter store: an SQLite index plus one immutable folder per adapter version.

Layout under ``LORADOCK_HOME`` (default ``~/.loradock``)::

    index.sqlite                  bases and adapter versions (the only thing readers trust)
    adapters/NAME/vN/             immutable copy of a registered adapter folder
    adapters/.tmp-PID-XXXX/       a registration in progress (invisible; cleaned when PID is gone)
    cache/                        converted embedded base (``LORADOCK_CACHE`` overrides)

Registration copies first and checks the copy: the source folder is copied (regular files and
folders only; ``checkpoint-*`` and hidden entries left out) into a hidden folder, and every check
(pickle, PEFT config, shapes, base) and the hashes run on that copy, so nothing swapped in the
source meanwhile is stored unchecked. Inside one ``BEGIN IMMEDIATE`` transaction the next version
number is taken, the fsynced folder renamed into place, the parent folder fsynced and the row
inserted; SQLite commits with ``synchronous=FULL``. A process killed (or a machine losing power)
before the commit leaves at most an unindexed folder, which no reader sees and the next writer
removes. Two processes registering the same name are serialised by SQLite's write lock and get
distinct versions.

With a remote (``Store(remote="hf:ORG")``), `get` and `resolve` pull an adapter that is not in
the store from the remote on first use, pinned and verified (`hub.replica`, `hub.remote`), once
per name even when many threads or processes ask at once.

Where the job ends: the store registers, lists, resolves, verifies and removes. Talking to remote
hubs is `hub.remote`; checking adapters against bases is `hub.inspect`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
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
from hub.errors import Conflict, InvalidInput, NotAnAdapter, NotFound, StoreCorrupt
from hub.files import (
    TMP_PREFIX,
    copy_regular_tree,
    digest_mismatch,
    fsync_dir,
    fsync_tree,
    hash_tree,
    make_read_only,
    pid_alive,
    rmtree_read_only,
    sha256_file,
)
from hub.inspect import inspect_adapter
from hub.manifest import ADAPTER_CONFIG_FILE, AdapterManifest, Capabilities
from hub.names import ModelRef, parse_adapter_ref, validate_name
from hub.records import AdapterRecord, AdapterSource, Resolved, VerifyReport

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
_FLIGHTS: dict[tuple[str, str], threading.Lock] = {}
_FLIGHTS_LOCK = threading.Lock()


def skipped_on_copy(name: str) -> bool:
    """True for entries registration leaves out (``checkpoint-*`` folders, hidden entries)."""
    return name.startswith(_SKIP_ON_COPY)


def default_home() -> Path:
    """Return the store root: ``$LORADOCK_HOME`` or ``~/.loradock``."""
    return Path(os.environ.get("LORADOCK_HOME") or Path.home() / ".loradock").expanduser()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """The adapter store rooted at ``home`` (see the module docstring for the layout)."""

    def __init__(self, home: Path | None = None, cache: Path | None = None, *,
                 remote: str | AdapterSource | None = None) -> None:
        """Open (creating if needed) the store at ``home``.

        Args:
            home: Store root (default `default_home`).
            cache: Converted-base cache (default ``$LORADOCK_CACHE`` or ``home/cache``).
            remote: Pull adapters missing here from this remote on first use: ``hf`` or
                ``hf:ORG`` (see `hub.replica.open_remote`), or an `AdapterSource`.
        """
        self.home = Path(home) if home else default_home()
        if isinstance(remote, str):
            from hub.replica import open_remote

            remote = open_remote(remote)
        self.remote: AdapterSource | None = remote
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
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when COMMIT returns
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
        version: int | None = None,
        expect: dict[str, str] | None = None,
    ) -> AdapterRecord:
        """Copy a PEFT LoRA folder into the store as the next version of ``name``.

        Every check runs on the store's private copy (see the module docstring).

        Args:
            src: The adapter folder.
            name: Adapter name (``[a-z0-9][a-z0-9._-]{0,63}``).
            base: Registered base name the adapter must fit.
            parent: ``NAME@V`` this adapter was trained from (recorded as lineage).
            source: What to record as the origin (defaults to the resolved ``src``).
            version: Register exactly this version (a pull keeping the Hub's ``vN``) instead
                of the next one.
            expect: ``{relative path: sha256}`` the copy must equal exactly (a pull's digests).

        Returns:
            The new record.

        Raises:
            InvalidName, NotFound, NotAnAdapter, UnsafeWeights, Incompatible: see `inspect_adapter`.
            InvalidInput: A symlink, FIFO or other special file in the folder.
            Conflict: ``version`` is already registered.
            DigestMismatch: The copy differs from ``expect``.
        """
        validate_name(name)
        src = Path(src)
        base_info = self.base(base)
        if not src.is_dir():
            raise NotAnAdapter(f"{src} is not a folder",
                               fix="Pass the folder written by PEFT's save_pretrained().")
        self._remove_dead_tmp()
        tmp = self.adapters_dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            copy_regular_tree(src, tmp, skip=skipped_on_copy)
            capabilities = inspect_adapter(tmp, base_info, shown=str(src))
            manifest = AdapterManifest.read(tmp)
            if parent is None and manifest is not None:
                parent = manifest.parent
            files = hash_tree(tmp)
            if expect is not None and files != expect:
                raise digest_mismatch(src.name, files, expect)
            if self._normalise_config(tmp, base_info):
                files[ADAPTER_CONFIG_FILE] = sha256_file(tmp / ADAPTER_CONFIG_FILE)
            make_read_only(tmp)
            fsync_tree(tmp)
            with self._write() as db:
                version = self._take_version(db, name, version)
                final = self.adapters_dir / name / f"v{version}"
                if final.exists():  # unindexed leftover of a writer killed after its rename
                    rmtree_read_only(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(final)
                fsync_dir(final.parent)
                fsync_dir(self.adapters_dir)
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
                rmtree_read_only(tmp)
        return record

    @staticmethod
    def _take_version(db: sqlite3.Connection, name: str, wanted: int | None) -> int:
        """The version to register (inside the write transaction); never reuses a number."""
        row = db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(version) FROM adapters WHERE name=?), 0),"
            " COALESCE((SELECT version FROM last_versions WHERE name=?), 0)) AS v",
            (name, name),
        ).fetchone()
        last = int(row["v"])
        if wanted is None:
            version = last + 1
        else:
            taken = db.execute("SELECT 1 FROM adapters WHERE name=? AND version=?",
                               (name, wanted)).fetchone()
            if taken is not None or wanted < 1:
                raise Conflict(f"Adapter {name}@{wanted} is already registered",
                               fix="Remove it first or register under another name.")
            version = wanted
        db.execute(
            "INSERT INTO last_versions (name, version) VALUES (?, ?) ON CONFLICT(name)"
            " DO UPDATE SET version=MAX(version, excluded.version)",
            (name, version),
        )
        return version

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """Return ``name@version`` (latest when ``version`` is None).

        With a remote, a name (or version) the store does not hold is pulled from it first;
        once pulled, the local copy answers (``NAME`` alone then means the newest version held
        here: pin ``NAME@V`` to ask for a later one).

        Raises:
            NotFound: No such adapter or version (here, nor on the remote).
            RemoteError, DigestMismatch: The remote failed, or sent files that do not verify.
        """
        try:
            return self._get_local(name, version)
        except NotFound:
            if self.remote is None:
                raise
        return self._pull_once(name, version)

    def _pull_once(self, name: str, version: int | None) -> AdapterRecord:
        """Pull from the remote, one download per name across threads and processes."""
        key = (str(self.home), name)
        with _FLIGHTS_LOCK:
            flight = _FLIGHTS.setdefault(key, threading.Lock())
        locks = self.home / ".locks"
        locks.mkdir(exist_ok=True)
        with flight, open(locks / f"pull-{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:  # whoever held the lock before may have pulled it
                return self._get_local(name, version)
            except NotFound:
                pass
            assert self.remote is not None
            return self.remote.fetch(self, name, version)

    def _get_local(self, name: str, version: int | None) -> AdapterRecord:
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
        record = self._get_local(name, version)
        with self._write() as db:
            db.execute("DELETE FROM adapters WHERE name=? AND version=?", (name, version))
        trash = self.adapters_dir / f"{TMP_PREFIX}{os.getpid()}-rm-{uuid.uuid4().hex[:8]}"
        if record.path.exists():
            record.path.rename(trash)
            rmtree_read_only(trash)
        return record

    def verify(self) -> VerifyReport:
        """Re-hash every registered file and clean leftovers of killed writers.

        Unindexed folders (a writer killed between rename and commit) and dead ``.tmp-*``
        folders are removed; they were never visible. What is indexed is read again under the
        write lock, so a version registered while the files were being hashed is kept.
        """
        report = VerifyReport()
        report.leftovers_removed = [str(p) for p in self._remove_dead_tmp()]
        for record in self.list():
            report.checked += 1
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
        with self._write() as db:  # no registration may be between rename and commit meanwhile
            rows = db.execute("SELECT name, version FROM adapters").fetchall()
            indexed = {self.adapters_dir / r["name"] / f"v{r['version']}" for r in rows}
            still = {f"{r['name']}@{r['version']}" for r in rows}
            report.corrupt = {k: v for k, v in report.corrupt.items() if k in still}
            for name_dir in self.adapters_dir.iterdir():
                if not name_dir.is_dir() or name_dir.name.startswith(TMP_PREFIX):
                    continue
                for version_dir in name_dir.iterdir():
                    if version_dir not in indexed:
                        rmtree_read_only(version_dir)
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
    def _normalise_config(folder: Path, base: BaseInfo) -> bool:
        """Point ``base_model_name_or_path`` at the hub's base id, not a local path.

        Returns:
            True when the file was rewritten.
        """
        path = folder / ADAPTER_CONFIG_FILE
        config = json.loads(path.read_text())
        wanted = base.hf_id or base.name
        if config.get("base_model_name_or_path") == wanted:
            return False
        config["base_model_name_or_path"] = wanted
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return True

    def _remove_dead_tmp(self) -> list[Path]:
        removed = []
        for path in self.adapters_dir.glob(f"{TMP_PREFIX}*"):
            pid_text = path.name[len(TMP_PREFIX):].split("-", 1)[0]
            if pid_text.isdigit() and pid_alive(int(pid_text)):
                continue
            rmtree_read_only(path)
            removed.append(path)
        return removed


__all__ = [
    "AdapterRecord",
    "AdapterSource",
    "InvalidInput",
    "Resolved",
    "Store",
    "VerifyReport",
    "default_home",
    "skipped_on_copy",
]
