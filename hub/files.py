"""File helpers every stage shares: hashing, safe weight formats, atomic publication of outputs.

`atomic_dir` and `atomic_file` are how loradock makes outputs appear "under their final name only
when complete": work happens in a hidden sibling, then one `rename` publishes it. A process killed
at any moment leaves either nothing or a hidden ``.tmp-*`` sibling that no reader looks at.

This module reads and writes files; it knows nothing about adapters, bases or the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hub.errors import DigestMismatch, InvalidInput, UnsafeWeights

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """Return ``{relative posix path: sha256}`` for every regular file under ``folder``.

    Symlinks are refused so that a folder cannot smuggle files from elsewhere into the store.

    Raises:
        InvalidInput: If the folder contains a symlink.
    """
    folder = Path(folder)
    refuse_symlinks(folder)
    hashes: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def refuse_symlinks(folder: Path) -> None:
    """Raise if ``folder`` contains a symlink (it could smuggle files from elsewhere).

    Raises:
        InvalidInput: Naming the first symlink.
    """
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            raise InvalidInput(
                f"Refusing symlink {path}",
                fix="Copy the real file into the folder instead of linking it.",
            )


def fingerprint(files: dict[str, str]) -> str:
    """Combine per-file hashes into one sha256 (order-independent, names included)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def is_pickle_name(name: str) -> bool:
    """True if a file name has a pickle-based weights suffix (``.bin``, ``.pt``...)."""
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(folder: Path, *, shown: str | None = None) -> None:
    """Raise if ``folder`` holds weights in a pickle-based format.

    Args:
        folder: The folder to scan.
        shown: How to name the folder in the error (default: its path).

    Raises:
        UnsafeWeights: Naming the first offending file.
    """
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and is_pickle_name(path.name):
            raise UnsafeWeights(
                f"Refusing pickle weights {path.name!r} in {shown or folder}: pickle can run "
                "code on load",
                fix="Save the adapter as safetensors (PEFT: save_pretrained(..., "
                "safe_serialization=True)) and remove the pickle file.",
            )


def safetensors_header(path: Path) -> dict[str, dict]:
    """Read a safetensors file's header without loading tensors.

    Returns:
        ``{tensor name: {"dtype": str, "shape": [int, ...]}}`` (the ``__metadata__`` entry dropped).

    Raises:
        InvalidInput: If the file is not a valid safetensors file.
    """
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * _CHUNK:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidInput(
            f"{path} is not a valid safetensors file ({exc})",
            fix="Re-save the weights with safetensors.",
        ) from exc
    header.pop("__metadata__", None)
    return {name: {"dtype": v["dtype"], "shape": list(v["shape"])} for name, v in header.items()}


def copy_regular_tree(src: Path, dst: Path, *, skip: Callable[[str], bool]) -> None:
    """Copy ``src`` into the new folder ``dst``: regular files and folders only.

    Anything else refuses the whole copy with one clear error: a symlink (it could smuggle files
    from elsewhere), a FIFO (reading it would block), a socket or a device. Each file is opened
    without following links and checked again on the open descriptor, so an entry swapped for a
    link or a FIFO after it was listed is refused too. Entries whose name ``skip`` accepts are
    left out at every depth, and never looked at.

    Raises:
        InvalidInput: Naming the first entry that is not a regular file or folder.
    """
    src, dst = Path(src), Path(dst)
    _copy_dir(src, dst, "", src, skip)


def _copy_dir(src: Path, dst: Path, rel: str, root: Path, skip: Callable[[str], bool]) -> None:
    os.mkdir(dst)
    with os.scandir(src) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        if skip(entry.name):
            continue
        shown = f"{rel}{entry.name}"
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            _copy_dir(Path(entry.path), dst / entry.name, f"{shown}/", root, skip)
        elif stat.S_ISREG(mode):
            _copy_file(Path(entry.path), dst / entry.name, shown, root)
        else:
            raise _not_regular(shown, mode, root)


def _copy_file(src: Path, dst: Path, shown: str, root: Path) -> None:
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:  # ELOOP: swapped for a symlink since it was listed
        if os.path.islink(src):
            raise _not_regular(shown, stat.S_IFLNK, root) from None
        raise InvalidInput(f"Cannot read {shown!r} in {root} ({exc.strerror})",
                           fix="Check the file's permissions.") from None
    with open(fd, "rb") as fin:
        mode = os.fstat(fin.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(shown, mode, root)
        with open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)


def _not_regular(shown: str, mode: int, root: Path) -> InvalidInput:
    if stat.S_ISLNK(mode):
        return InvalidInput(f"Refusing symlink {shown!r} in {root}",
                            fix="Copy the real file into the folder instead of linking it.")
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
    return InvalidInput(
        f"Refusing {kind} {shown!r} in {root}: an adapter folder may hold only regular files "
        "and folders",
        fix=f"Remove {shown!r} from the folder.",
    )


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(Path(folder))



def fsync_dir(folder: Path) -> None:
    """Flush a folder to disk (fsync), so that renames and new entries in it survive power loss."""
    _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder that is renamed to ``final`` when the block succeeds.

    On an exception the temporary folder is removed and ``final`` is untouched.

    Args:
        final: The folder to publish.
        overwrite: Replace an existing ``final`` (the old one is removed after the rename).

    Raises:
        InvalidInput: If ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InvalidInput(
            f"Output {final} already exists", fix="Choose another --out or remove it first."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary path in the same folder, renamed to ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete hidden ``.tmp-*`` leftovers of killed writers directly under ``folder``."""
    removed = []
    if Path(folder).is_dir():
        for path in Path(folder).iterdir():
            if path.name.startswith(TMP_PREFIX):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` runs (this process included; unknown owners count as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_read_only(folder: Path) -> None:
    """Make every file under ``folder`` read-only (0444)."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def rmtree_read_only(folder: Path) -> None:
    """Remove a tree whose files and folders may be read-only."""
    def _onerror(func: Any, path: str, _exc: Any) -> None:
        os.chmod(path, stat.S_IRWXU)
        func(path)

    if folder.exists():
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(folder, onerror=_onerror)


def digest_mismatch(shown: str, files: dict[str, str], expect: dict[str, str]) -> DigestMismatch:
    """The error for files whose digests differ from those they were published with."""
    changed = sorted(k for k in files.keys() & expect.keys() if files[k] != expect[k])
    missing = sorted(expect.keys() - files.keys())
    extra = sorted(files.keys() - expect.keys())
    parts = [f"changed: {', '.join(changed)}"] if changed else []
    parts += [f"missing: {', '.join(missing)}"] if missing else []
    parts += [f"unexpected: {', '.join(extra)}"] if extra else []
    return DigestMismatch(
        f"The files of {shown} do not match the digests they were published with "
        f"({'; '.join(parts)})",
        fix="Do not use this copy; ask the publisher to push the version again.",
    )
