"""llama.cpp's own HF → GGUF converters, run from the pinned llama-cpp-python's sdist.

``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py`` ship in the llama-cpp-python sdist
together with the ``gguf-py`` they are written against (the wheel ships neither). On first use
the sdist of the installed version is found (``LORADOCK_LLAMA_CPP_SDIST``, then the cache), or
fetched once with pip (``pip download --no-deps --no-binary :all: llama-cpp-python==V``), and
only the converter files are unpacked, with tarfile's ``data`` filter, into
``$LORADOCK_CACHE/llama.cpp-convert-V/``. Each conversion runs in a child interpreter
(`export.llama_cpp_runner`), so the converter's gguf-py never meets the installed ``gguf``.

Which architectures go through here is decided by `uses_converter`: every one loradock's own
writer (`export.gguf_writer`, Llama only, also used in-process by the llama.cpp engine) does
not handle.

Where the job ends: one HF folder (or PEFT folder) in, one GGUF out, or a clear error. Parity is
`export.parity`'s; quantisation beyond f32/f16 is `export.quantize`'s; publishing is the caller's.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any, Literal

from hub.errors import Unsupported

SDIST_ENV = "LORADOCK_LLAMA_CPP_SDIST"
RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/")
ConvertDtype = Literal["f32", "f16"]


def uses_converter(config: dict[str, Any]) -> bool:
    """True when llama.cpp's converter (not `export.gguf_writer`) writes this architecture."""
    from export.gguf_writer import SUPPORTED_ARCHITECTURES

    archs = config.get("architectures") or [""]
    return str(archs[0]) not in SUPPORTED_ARCHITECTURES


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (the converter must match it)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise Unsupported("llama-cpp-python is not installed; GGUF export needs it",
                          fix="pip install llama-cpp-python==0.3.36") from exc


def _sdist(cache: Path, version: str) -> Path:
    name = f"llama_cpp_python-{version}.tar.gz"
    given = os.environ.get(SDIST_ENV)
    if given:
        if not Path(given).is_file():
            raise Unsupported(f"{SDIST_ENV}={given} does not exist",
                              fix=f"Point it at {name} or unset it.")
        return Path(given)
    folder = cache / "sdist"
    if (folder / name).is_file():
        return folder / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not (folder / name).is_file():
        raise Unsupported(
            f"llama.cpp's GGUF converter (in the llama-cpp-python {version} sdist) is not in the "
            "cache and pip could not fetch it",
            fix=f"Run `{' '.join(command[2:])}` where PyPI is reachable, or set {SDIST_ENV} to "
            "the downloaded file.")
    return folder / name


def converter_dir(cache: Path) -> Path:
    """The unpacked converter for the installed llama-cpp-python (unpacked once)."""
    version = llama_cpp_version()
    target = Path(cache) / f"llama.cpp-convert-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist = _sdist(Path(cache), version)
    staging = Path(cache) / f".tmp-convert-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tarfile.open(sdist) as archive:
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(_MEMBERS) and (m.isfile() or m.isdir())]
            if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                raise Unsupported(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py",
                                  fix=f"Delete {sdist} and retry (or fix {SDIST_ENV}).")
            archive.extractall(staging, members=members, filter="data")
        try:
            (staging / prefix).rename(target)
        except OSError:
            if not (target / "convert_hf_to_gguf.py").is_file():  # not a concurrent winner
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_supported(config: dict[str, Any], cache: Path) -> None:
    """Refuse, before loading anything, an architecture llama.cpp's converter does not know.

    The converter registers each model class under its ``architectures`` names
    (``@ModelBase.register("Qwen2ForCausalLM", ...)``); the name is looked up in its source.

    Raises:
        Unsupported: Naming the architecture.
    """
    arch = str((config.get("architectures") or [config.get("model_type") or "unknown"])[0])
    sources = (converter_dir(cache) / "conversion").glob("*.py")
    if not any(f'"{arch}"' in path.read_text(encoding="utf-8") for path in sources):
        raise Unsupported(
            f"Architecture {arch!r} cannot be exported to GGUF: llama.cpp's converter "
            f"(llama-cpp-python {llama_cpp_version()}) does not know it",
            fix="Export a merged HF folder instead (`loradock export merged`).",
            param="architecture",
        )


def _run(cache: Path, script: str, args: list[str], what: str) -> None:
    command = [sys.executable, str(RUNNER), str(converter_dir(cache)), script, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the converter must never reach the Hub
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1][:300] if lines else f"exit status {result.returncode}"
        raise Unsupported(f"llama.cpp's converter could not convert {what}: {detail}",
                          fix="Check the architecture is one llama.cpp supports; the full log "
                          "is printed with LORADOCK_LLAMA_VERBOSE=1.")
    if os.environ.get("LORADOCK_LLAMA_VERBOSE", "") not in ("", "0"):
        sys.stderr.write(result.stderr)


def convert_model(model_dir: Path, out: Path, *, cache: Path, dtype: ConvertDtype = "f32",
                  name: str = "") -> Path:
    """Write the HF folder ``model_dir`` as one GGUF ``out`` with llama.cpp's converter.

    ``name`` becomes ``general.name`` (llama.cpp keys some tokenizer rules on it, so the
    folder's own name is never used).

    Raises:
        Unsupported: The converter is unavailable or refused the model.
    """
    args = [str(model_dir), "--outfile", str(out), "--outtype", dtype,
            "--model-name", name or "model"]
    _run(cache, "convert_hf_to_gguf.py", args, Path(model_dir).name)
    return Path(out)


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, *, cache: Path,
                 dtype: ConvertDtype = "f32") -> Path:
    """Write the PEFT folder ``adapter_dir`` as a GGUF LoRA for the HF base ``base_dir``.

    Raises:
        Unsupported: The converter is unavailable or refused the adapter.
    """
    args = [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out),
            "--outtype", dtype]
    _run(cache, "convert_lora_to_gguf.py", args, f"the adapter {Path(adapter_dir).name}")
    return Path(out)
