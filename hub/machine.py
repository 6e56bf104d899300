"""What more than one stage needs to know about this machine and a model's shapes.

CPUs differ between the machines this project runs on (AVX2 without native bf16, AVX512-BF16,
AMX), so the serving engine (`serve.runtime.dtype_choice`) and training (`train.dtype_choice`)
each time their own workload on this CPU instead of assuming. What they share lives here, once:

- `cpu_flags`: the flag line that identifies the kind of CPU (part of every cache key and
  report);
- `Geometry`: a decoder's shapes from its Hugging Face config (the matmuls they time);
- `MeasurementCache`: a folder of small JSON results keyed by what was measured, so a
  measurement runs once per machine, torch version and thread count; written atomically, and a
  read-only or missing folder only costs a re-measurement.

Where the job ends: nothing here times anything or decides a dtype; the choosers do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


# Environment variables that change which CPU kernels torch and oneDNN pick.
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
              "ONEDNN_DEFAULT_FPMATH_MODE")


def cpu_flags() -> str:
    """The CPU's flag line (``/proc/cpuinfo``), or ``""`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_root() -> Path:
    """``$LORADOCK_CACHE``, else ``~/.cache/loradock``."""
    return Path(os.environ.get("LORADOCK_CACHE") or Path.home() / ".cache" / "loradock")


@dataclass(frozen=True)
class Geometry:
    """A decoder's shapes, read from its config (``head_dim`` and kv heads where given)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Geometry:
        """From a Hugging Face config (``num_key_value_heads`` and ``head_dim`` optional)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        return cls(hidden=hidden, heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
                   intermediate=int(config.intermediate_size), vocab=int(config.vocab_size))

    @property
    def q(self) -> int:
        """Width of the query projection."""
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.kv_heads * self.head_dim


class MeasurementCache:
    """JSON results in one folder, one file per key."""

    def __init__(self, folder: Path | None, prefix: str = "") -> None:
        """Use ``folder`` (None: nothing is cached); file names start with ``prefix``."""
        self.folder = folder
        self.prefix = prefix

    @staticmethod
    def key(*parts: Any) -> str:
        """A file-name-safe digest of what was measured (JSON-serialisable ``parts``).

        The settings that change which kernels torch and oneDNN run (`KERNEL_ENV`) are part
        of every key: with ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AMX machine bf16 matmuls ran 4x
        slower, and a choice measured without it was reused.
        """
        env = [(name, os.environ.get(name, "")) for name in KERNEL_ENV]
        return hashlib.sha256(json.dumps([*parts, env]).encode()).hexdigest()[:24]

    def read(self, key: str) -> dict[str, Any] | None:
        """The result stored under ``key``, or None (absent, unreadable or not JSON)."""
        if self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{self.prefix}{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_as(self, key: str, cls: type[T]) -> T | None:
        """The result under ``key`` as a ``cls`` dataclass, marked ``cached=True``.

        None when absent, or written by another version of ``cls``.
        """
        data = self.read(key)
        if data is None:
            return None
        try:
            value = cls(**data)
        except TypeError:
            return None
        value.cached = True  # type: ignore[attr-defined]
        return value

    def write(self, key: str, data: dict[str, Any]) -> bool:
        """Store ``data`` under ``key`` atomically; False when the folder cannot be written."""
        if self.folder is None:
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{self.prefix}{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.folder / f"{self.prefix}{key}.json")
        except OSError:
            return False
        return True
