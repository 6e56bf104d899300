"""Build and load loradock's C kernels (`native.c`); None where that fails.

Some of the engine's work is many tiny ops in torch: the multi-LoRA delta of a mixed batch is
a gather, a ``bmm``, a pad mask, a ``bmm`` per part and a scatter per projection, and a bf16
matmul of that size costs 35-65 us in oneDNN's set-up alone on a 2-core AVX512-BF16 machine.
`native.c` does one projection's delta for a whole pool in one call (Punica's SGMV as one loop
nest). The element-wise work between matmuls is the same story in bf16: torch's RMSNorm is a
dozen ops around fp32 casts (30 ms of a 64-row decode step of SmolLM2 on a 2-core AMD EPYC),
so the residual add with the norm after it, RoPE and ``silu(gate) * up`` are one call each.
`native.c` is compiled once per machine with the system C compiler (``$CC``, else ``cc`` or
``gcc``; ``-O3 -march=native``) into ``cache_root()/native``, keyed by the source, the
compiler, its flags and the CPU flags, so a cache copied to another CPU is never loaded there,
and loaded with ctypes (which releases the GIL during the call).

Where there is no working compiler (the Docker ``cpu`` image has none), prebuilt portable
builds stand in: `prebuild` (``python -m serve.runtime.native --prebuild DIR``, stdlib and
`hub.machine` only, so it runs without torch) compiles `native.c` for x86-64-v4 (AVX-512) and
x86-64-v3 (AVX2), or armv8-a, and ``$LORADOCK_NATIVE_PREBUILT`` names that folder; the highest
level this CPU's flags allow is loaded. A local ``-march=native`` build is preferred when it
can be had, since it is tuned to this CPU. `identity` names whichever file was loaded (the build
key, or a digest of the prebuilt file with the CPU flags).

Everything here may fail and must not stop the server: no compiler, a failed build or load, no
suitable prebuilt file returns None (logged once), and the callers keep torch's path. Whether
the kernel is *used* is measured, not assumed (`serve.runtime.dtype_choice`), for a prebuilt
file as for a local build.

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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hub.machine import cache_root, cpu_flags

log = logging.getLogger("loradock.serve")

SOURCE = Path(__file__).with_name("native.c")
BUILD_TIMEOUT_S = 120
PREBUILT_ENV = "LORADOCK_NATIVE_PREBUILT"
COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-pthread")


@dataclass(frozen=True)
class Portable:
    """One portable build: its level, its target flags and the CPU flags it needs.

    Attributes:
        level: The instruction-set level (``x86-64-v4``...), also in the file name.
        target: Compiler flags for that level (added to `COMMON_FLAGS`).
        needs: ``/proc/cpuinfo`` flags a CPU must have to run it.
    """

    level: str
    target: tuple[str, ...]
    needs: frozenset[str]

    @property
    def file(self) -> str:
        """The library's file name."""
        return f"loradock-native-{self.level}.so"


# The x86-64 psABI levels, as /proc/cpuinfo names them (SSE3 is "pni", LZCNT "abm").
_X86_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"})
_X86_V3 = _X86_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
PORTABLE: dict[str, tuple[Portable, ...]] = {  # by architecture, highest level first
    "x86_64": (
        Portable("x86-64-v4", ("-march=x86-64-v4", "-mprefer-vector-width=512"), _X86_V4),
        Portable("x86-64-v3", ("-march=x86-64-v3",), _X86_V3),
    ),
    "aarch64": (Portable("armv8-a", ("-march=armv8-a",), frozenset()),),
}
_PORTABLE_FILES = frozenset(p.file for levels in PORTABLE.values() for p in levels)


def _arch() -> str:
    """This machine's architecture as `PORTABLE` names it (``x86_64``, ``aarch64``...)."""
    machine = platform.machine()
    return {"AMD64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc`` or ``gcc`` on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def flags(target: Portable | None = None) -> list[str]:
    """Compiler flags: `COMMON_FLAGS` plus this machine's or a portable target's.

    Args:
        target: A portable build (None: this machine, ``-march=native`` with 512-bit vectors
            where AVX-512, or ``-mcpu=native`` off x86).
    """
    out = list(COMMON_FLAGS)
    if target is not None:
        return out + list(target.target)
    if _arch() in ("x86_64", "i686"):
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


def build_key(cc: str) -> str:
    """What identifies this machine's build by ``cc``: source, compiler, flags, CPU.

    Part of the file name of the build (and so of `identity`), so an edited kernel is built,
    and timed, again.
    """
    return hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), _version(cc).encode(), " ".join(flags()).encode(),
        cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def identity() -> str:
    """What identifies the loaded kernels ("" where none are available).

    The build key of a local build, or a digest of a prebuilt file's bytes, the CPU flags and
    the machine. Part of the keys of measurements that timed the kernels
    (`serve.runtime.dtype_choice`, the thread plan), so other kernels are timed again.
    """
    lib = library()
    if lib is None:
        return ""
    path = Path(lib._name)
    if path.name not in _PORTABLE_FILES:
        return path.stem.removeprefix("loradock-native-")
    try:
        data = path.read_bytes()
    except OSError:  # removed since it was loaded: still name what ran
        data = path.name.encode()
    return hashlib.sha256(b"\0".join([
        data, cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:20]


def _compile(cc: str, args: list[str], target: Path) -> str:
    """Compile `SOURCE` into ``target`` (atomically); "" when done, else why not (one line)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *args, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                return (f"{Path(cc).name} failed: "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from other users
            os.replace(tmp, target)  # atomic: a concurrent build leaves one whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not build them ({exc})"
    return ""


def _off(level: int, reason: str) -> None:
    """Log why there is no local build: kernels off, or on to the prebuilt ones."""
    folder = os.environ.get(PREBUILT_ENV)
    if folder:
        log.info("no local build of the native kernels (%s); trying the prebuilt ones in %s",
                 reason, folder)
    else:
        log.log(level, "native kernels off: %s", reason)


def build(folder: Path | None = None) -> Path | None:
    """Compile `native.c` for this machine once; the shared library's path, or None.

    Args:
        folder: Where built libraries are kept (default ``cache_root() / "native"``).
    """
    cc = compiler()
    if cc is None:
        _off(logging.INFO, "no C compiler (set CC, or install gcc)")
        return None
    folder = folder or cache_root() / "native"
    target = folder / f"loradock-native-{build_key(cc)}.so"
    if target.is_file():
        return target
    failed = _compile(cc, flags(), target)
    if failed:
        _off(logging.WARNING, failed)
        return None
    return target


def prebuild(folder: Path) -> list[Path]:
    """Compile `native.c` for this architecture's portable levels into ``folder``.

    For images without a compiler: point ``$LORADOCK_NATIVE_PREBUILT`` at ``folder``.

    Args:
        folder: Where to write the libraries (created).

    Returns:
        The files written, highest level first.

    Raises:
        RuntimeError: No compiler, no portable levels for this architecture, or a failed build.
    """
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    levels = PORTABLE.get(_arch())
    if not levels:
        raise RuntimeError(f"no portable levels for {platform.machine() or 'this machine'}")
    written = []
    for portable in levels:
        target = folder / portable.file
        failed = _compile(cc, flags(portable), target)
        if failed:
            raise RuntimeError(f"{portable.level}: {failed}")
        written.append(target)
    return written


def prebuilt(folder: Path | None = None) -> Path | None:
    """The highest-level prebuilt library in ``folder`` this CPU can run, or None.

    Args:
        folder: Where `prebuild` wrote them (default ``$LORADOCK_NATIVE_PREBUILT``; None
            without it, silently).
    """
    if folder is None:
        named = os.environ.get(PREBUILT_ENV)
        if not named:
            return None
        folder = Path(named)
    have = set(cpu_flags().split())
    levels = PORTABLE.get(_arch(), ())
    for portable in levels:
        if portable.needs <= have and (folder / portable.file).is_file():
            return folder / portable.file
    suitable = [p.file for p in levels if p.needs <= have]
    log.warning("native kernels off: %s in %s", f"none of {', '.join(suitable)}" if suitable
                else f"no prebuilt level for this CPU ({platform.machine()})", folder)
    return None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be had.

    A local build first (built on first use), else the best prebuilt file (`prebuilt`).
    """
    if os.environ.get("LORADOCK_NATIVE", "1") == "0":
        return None
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "sgmv": [i32, p, p, p, i32, p, i64, p, i32, i32, i32, p, p, p, p, i64, i32],
        "decode_attn": [i32, i32, i32, i32, p, i64, p, p, i64, i64, p, p, p, f32, f32, p, i64,
                        i32],
        "rms_norm": [i64, i32, p, i64, p, i64, p, p, i64, f32, i32],
        "silu_mul": [i64, i32, p, i64, p, i64, i32],
        "rope": [i64, i32, i32, p, i64, p, p, p, i32],
        "nf4_linear": [i32, i32, i64, p, i64, p, p, p, p, p, i64, i32],
    }
    for find in (build, prebuilt):
        path = find()
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
            for stem, argtypes in signatures.items():
                for suffix in ("f32", "bf16"):
                    fn = getattr(lib, f"{stem}_{suffix}")
                    fn.restype = ctypes.c_int if stem == "nf4_linear" else None
                    fn.argtypes = argtypes
        except (OSError, AttributeError) as exc:
            log.warning("native kernels off: could not load %s (%s)", path.name, exc)
            continue
        log.info("native kernels: loaded %s (%s)", path,
                 "built here" if find is build else "prebuilt")
        return lib
    return None


SUFFIX = {"float32": "f32", "bfloat16": "bf16"}


def _suffix(dtype) -> str | None:
    """The kernels' suffix for a torch dtype (or its name), None where there is none."""
    return SUFFIX.get(str(dtype).removeprefix("torch."))


def _function(stem: str, dtype):
    """``{stem}_f32`` or ``{stem}_bf16`` for ``dtype``, or None where the kernels are not loaded."""
    lib, suffix = library(), _suffix(dtype)
    if lib is None or suffix is None:
        return None
    return getattr(lib, f"{stem}_{suffix}")


def sgmv(dtype):
    """The SGMV kernel for ``float32`` or ``bfloat16`` tensors, or None."""
    return _function("sgmv", dtype)


def nf4_linear(dtype):
    """The 4-bit-code linear kernel for ``float32`` or ``bfloat16`` activations, or None."""
    return _function("nf4_linear", dtype)


class _Kernel:
    """One kernel of `native.c` for one dtype: ``{stem}_f32`` or ``{stem}_bf16``."""

    stem = ""

    def __init__(self, fn) -> None:
        self.fn = fn

    @classmethod
    def load(cls, dtype):
        """For ``float32`` or ``bfloat16`` tensors; None where the kernels are not available."""
        fn = _function(cls.stem, dtype)
        return None if fn is None else cls(fn)


class DecodeAttention(_Kernel):
    """The decode-attention kernel for one dtype (see ``decode_attn`` in `native.c`)."""

    stem = "decode_attn"

    def __call__(self, q, keys, values, lo, hi, scale: float, softcap: float | None, out,
                 kv_rows=None) -> None:
        """``out[i] = attention(q[i], keys[r, :, lo[i]:hi[i]], values[r, ...])``, r = kv_rows[i].

        Runs on torch's current thread count (`torch.get_num_threads`), on the kernels' pool.

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
            kv_rows: ``int32 [n]``: the KV row each query reads (None: row ``i``).
        """
        import torch

        n = q.shape[0]
        _, kv_heads, _, d = keys.shape
        groups = q.shape[1] // (kv_heads * d)
        self.fn(n, kv_heads, groups, d, q.data_ptr(), q.stride(0), keys.data_ptr(),
                values.data_ptr(), keys.stride(0), keys.stride(1),
                None if kv_rows is None else kv_rows.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                scale, softcap or 0.0, out.data_ptr(), out.stride(0), torch.get_num_threads())


class RmsNorm(_Kernel):
    """RMSNorm, optionally after the residual add, in one pass (``rms_norm`` in `native.c`)."""

    stem = "rms_norm"

    def __call__(self, x, weight, eps: float, residual=None):
        """``x / sqrt(mean(x^2) + eps) * weight`` per row, after ``x += residual`` if given.

        The add is in place and rounded to the dtype, as ``x.add_(residual)`` then
        ``F.rms_norm``.

        Args:
            x: ``[n, hidden]`` with contiguous rows (rows may be strided).
            weight: ``[hidden]``, contiguous.
            eps: Added to the mean square.
            residual: ``[n, hidden]`` added to ``x`` first, or None.

        Returns:
            A new ``[n, hidden]`` tensor of ``x``'s dtype.
        """
        import torch

        out = torch.empty_like(x)
        self.fn(x.shape[0], x.shape[1], x.data_ptr(), x.stride(0),
                None if residual is None else residual.data_ptr(),
                0 if residual is None else residual.stride(0), weight.data_ptr(),
                out.data_ptr(), out.stride(0), eps, torch.get_num_threads())
        return out


class SiluMul(_Kernel):
    """The gated MLP's ``silu(gate) * up`` in one pass (``silu_mul`` in `native.c`)."""

    stem = "silu_mul"

    def __call__(self, gate_up):
        """``silu(gate_up[:, :inter]) * gate_up[:, inter:]``, ``inter`` half the width.

        Args:
            gate_up: ``[n, 2 * inter]`` with contiguous rows (rows may be strided).

        Returns:
            A new ``[n, inter]`` tensor of ``gate_up``'s dtype.
        """
        import torch

        n, width = gate_up.shape
        out = torch.empty(n, width // 2, dtype=gate_up.dtype, device=gate_up.device)
        self.fn(n, width // 2, gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(),
                out.stride(0), torch.get_num_threads())
        return out


class Rope(_Kernel):
    """Rotary embedding in place, pair-adjacent layout (``rope`` in `native.c`)."""

    stem = "rope"

    def __call__(self, x, positions, cos, sin) -> None:
        """Rotate every head of every token of ``x`` by its position, in place.

        Args:
            x: ``[n, heads, d]``: heads contiguous within a token (tokens may be strided).
            positions: ``int64 [n]``, each token's position.
            cos: ``[max_len, d]`` the signed pair-adjacent table, contiguous; ``sin`` the same.
            sin: See ``cos``.
        """
        import torch

        n, heads, d = x.shape
        self.fn(n, heads, d, x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(),
                sin.data_ptr(), torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.runtime.native --prebuild DIR``: one line per file written."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m serve.runtime.native",
        description="Build the portable native kernels, for a machine without a compiler "
                    f"(point ${PREBUILT_ENV} at DIR there).")
    parser.add_argument("--prebuild", type=Path, metavar="DIR", required=True,
                        help="Folder to write the libraries into (created).")
    opts = parser.parse_args(argv)
    try:
        written = prebuild(opts.prebuild)
    except RuntimeError as exc:
        print(f"native prebuild failed: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
