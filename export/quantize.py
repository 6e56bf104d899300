"""Quantise a GGUF file with llama.cpp, through llama-cpp-python's ``llama_model_quantize``.

``f16`` is written directly by `export.gguf_writer`; ``q8_0`` and ``q4_k_m`` are produced here
from an f32 (or f16) GGUF. llama.cpp decides per tensor: 1-D norms stay f32, and K-quants fall back
to another type for tensors whose rows are not a multiple of 256 (SmolLM2's width is 576), which it
reports in its log.

Where the job ends: one file in, one file out. Parity checks are `export.parity`'s; publishing the
output atomically is the caller's.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from export.config import Quant
from hub.errors import InvalidInput, Unsupported

# llama.cpp's llama_ftype values (llama.h), by our quant names.
FTYPES: dict[str, int] = {"f16": 1, "q8_0": 7, "q4_k_m": 15}


def quantize_gguf(src: Path, dst: Path, quant: Quant, *, threads: int = 0) -> Path:
    """Quantise ``src`` into ``dst`` with llama.cpp.

    Args:
        src: An f32 or f16 GGUF model file.
        dst: Output path (overwritten).
        quant: ``q8_0``, ``q4_k_m`` (or ``f16`` to convert an f32 file).
        threads: Worker threads (0: one per CPU core).

    Raises:
        InvalidInput: Unknown quant name or missing source.
        Unsupported: llama-cpp-python is missing or llama.cpp refused the file.
    """
    if quant not in FTYPES:
        raise InvalidInput(
            f"Unknown quantisation {quant!r}",
            fix=f"Use one of {', '.join(FTYPES)}.",
            param="quant",
        )
    if not Path(src).is_file():
        raise InvalidInput(f"{src} does not exist", fix="Write the f32/f16 GGUF first.")
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = threads if threads > 0 else (os.cpu_count() or 1)
    status = llama_cpp.llama_model_quantize(
        str(src).encode(), str(dst).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise Unsupported(
            f"llama.cpp could not quantise {Path(src).name} to {quant} (status {status})",
            fix="Run with the llama.cpp log visible (LORADOCK_LLAMA_VERBOSE=1) to see why.",
        )
    return Path(dst)


def import_llama_cpp() -> Any:
    """Import llama_cpp with its log quiet unless ``LORADOCK_LLAMA_VERBOSE`` is set.

    Raises:
        Unsupported: llama-cpp-python is not installed.
    """
    try:
        import llama_cpp
    except ImportError as exc:
        raise Unsupported(
            "llama-cpp-python is not installed; GGUF quantisation and checks need it",
            fix="Install it with `pip install llama-cpp-python==0.3.36` (the Makefile builds it).",
        ) from exc
    verbose = os.environ.get("LORADOCK_LLAMA_VERBOSE", "") not in ("", "0")
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    llama_cpp.llama_backend_init()
    return llama_cpp
