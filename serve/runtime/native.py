"""Build and load loradock's C kernels (`native.c`) for this machine; None where that fails.

Some of the engine's work is many tiny ops in torch: the multi-LoRA delta of a mixed batch is
a gather, a ``bmm``, a pad mask, a ``bmm`` per part and a scatter per projection, and a bf16
matmul of that size costs 35-65 us in oneDNN's set-up alone on a 2-core AVX512-BF16 machine.
`native.c` does one projection's delta for a whole pool in one call (Punica's SGMV as one loop
nest). It is compiled once per machine with the system C compiler (``$CC``, else ``cc`` or
``gcc``; ``-O3 -march=native``) into ``cache_root()/native``, keyed by the source, the compiler,
its flags and the CPU flags, so a cache copied to another CPU is never loaded there, and loaded
with ctypes (which releases the GIL during the call).

Everything here may fail and must not stop the server: no compiler, a failed build or load
returns None (logged once), and the callers keep torch's path. Whether the kernel is *used* is
measured, not assumed (`serve.runtime.dtype_choice`).

Where the job ends: building and loading. What the kernels compute, and how their arguments are
laid out, is `serve.runtime.lora` (the caller) and `native.c`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from hub.machine import cache_root, cpu_flags

log = logging.getLogger("loradock.serve")

SOURCE = Path(__file__).with_name("native.c")
BUILD_TIMEOUT_S = 120


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc`` or ``gcc`` on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def flags() -> list[str]:
    """Compiler flags for this machine (``-march=native``; 512-bit vectors where AVX-512)."""
    out = ["-O3", "-fPIC", "-shared", "-std=gnu11"]
    if platform.machine() in ("x86_64", "AMD64", "i686"):
        out.append("-march=native")
        if " avx512f " in f" {cpu_flags()} ":
            out.append("-mprefer-vector-width=512")
    else:
        out.append("-mcpu=native")
    return out


def _version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.splitlines()[0] if done.stdout else ""


@functools.lru_cache(maxsize=1)
def identity() -> str:
    """What identifies this machine's build: source, compiler, flags, CPU ("" without a compiler).

    Part of the file name of the build, and of the keys of measurements that timed the kernels
    (`serve.runtime.dtype_choice`), so an edited kernel is timed again.
    """
    cc = compiler()
    if cc is None:
        return ""
    return hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), _version(cc).encode(), " ".join(flags()).encode(),
        cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:20]


def build(folder: Path | None = None) -> Path | None:
    """Compile `native.c` for this machine once; the shared library's path, or None.

    Args:
        folder: Where built libraries are kept (default ``cache_root() / "native"``).
    """
    cc = compiler()
    if cc is None:
        log.info("native kernels off: no C compiler (set CC, or install gcc)")
        return None
    folder = folder or cache_root() / "native"
    target = folder / f"loradock-native-{identity()}.so"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        done = subprocess.run([cc, *flags(), "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            os.unlink(tmp)
            log.warning("native kernels off: %s failed: %s", Path(cc).name,
                        (done.stderr.strip().splitlines() or ["?"])[-1][:200])
            return None
        os.replace(tmp, target)  # atomic: a concurrent build leaves one whole file
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native kernels off: could not build them (%s)", exc)
        return None
    return target


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on first use), or None where they cannot be had."""
    if os.environ.get("LORADOCK_NATIVE", "1") == "0":
        return None
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("native kernels off: could not load %s (%s)", path.name, exc)
        return None
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "sgmv": [i32, p, p, p, i32, p, i64, p, i32, i32, i32, p, p, p, p, i64],
        "decode_attn": [i32, i32, i32, i32, p, i64, p, p, i64, i64, p, p, p, f32, f32, p, i64,
                        p],
    }
    for stem, argtypes in signatures.items():
        for suffix in ("f32", "bf16"):
            fn = getattr(lib, f"{stem}_{suffix}")
            fn.restype = None
            fn.argtypes = argtypes
    return lib


SUFFIX = {"float32": "f32", "bfloat16": "bf16"}


def _suffix(dtype) -> str | None:
    """The kernels' suffix for a torch dtype (or its name), None where there is none."""
    return SUFFIX.get(str(dtype).removeprefix("torch."))


def sgmv(dtype):
    """The SGMV kernel for ``float32`` or ``bfloat16`` tensors, or None."""
    lib, suffix = library(), _suffix(dtype)
    if lib is None or suffix is None:
        return None
    return getattr(lib, f"sgmv_{suffix}")


class DecodeAttention:
    """The decode-attention kernel for one dtype (see ``decode_attn`` in `native.c`)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    @classmethod
    def load(cls, dtype) -> DecodeAttention | None:
        """For ``float32`` or ``bfloat16`` tensors; None where the kernels are not available."""
        lib, suffix = library(), _suffix(dtype)
        if lib is None or suffix is None:
            return None
        return cls(getattr(lib, f"decode_attn_{suffix}"))

    def __call__(self, q, keys, values, lo, hi, scale: float, softcap: float | None, out,
                 scores, kv_rows=None) -> None:
        """``out[i] = attention(q[i], keys[r, :, lo[i]:hi[i]], values[r, ...])``, r = kv_rows[i].

        Args:
            q: ``[n, heads * d]`` rows (heads sharing a kv head consecutive; rows may be
                strided).
            keys: ``[n, kv_heads, L, d]`` views of the KV cache (positions contiguous).
            values: Same shape and strides as ``keys``.
            lo: ``int32 [n]``: first visible position of each row.
            hi: ``int32 [n]``: one past the last.
            scale: Score scaling.
            softcap: Tanh soft-cap of the scores, or None.
            out: ``[n, heads * d]`` output (rows may be strided).
            scores: ``float32`` scratch of at least ``groups * max(hi)``.
            kv_rows: ``int32 [n]``: the KV row each query reads (None: row ``i``).
        """
        n = q.shape[0]
        _, kv_heads, _, d = keys.shape
        groups = q.shape[1] // (kv_heads * d)
        self.fn(n, kv_heads, groups, d, q.data_ptr(), q.stride(0), keys.data_ptr(),
                values.data_ptr(), keys.stride(0), keys.stride(1),
                None if kv_rows is None else kv_rows.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                scale, softcap or 0.0, out.data_ptr(), out.stride(0), scores.data_ptr())
