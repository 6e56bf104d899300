"""Adapter inspection: is this folder a PEFT LoRA that fits this base, and what does it need?

Reads ``adapter_config.json`` and the safetensors header (never the tensors, never pickle) and
checks every LoRA tensor against the base's module shapes. The result, `Capabilities`, is what
the store records so that engines can refuse an adapter at registration time, not at the first
request.

Where the job ends: this module only reads the candidate folder and a `BaseInfo`; copying,
versioning and indexing are `hub.store`'s job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.errors import Incompatible, LoradockError, NotAnAdapter
from hub.files import refuse_pickle, safetensors_header
from hub.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterManifest, Capabilities

# base_model.model.<module path>.lora_A[.<adapter name>].weight
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$"
)
_EMBEDDING_LEAVES = ("embed_tokens", "lm_head", "wte", "word_embeddings")
_FIX_NOT_LORA = "Pass the folder written by PEFT's save_pretrained() for a LoRA adapter."


def read_adapter_config(folder: Path, *, shown: str | None = None) -> dict[str, Any]:
    """Read and sanity-check ``adapter_config.json``.

    Args:
        folder: The adapter folder.
        shown: How to name the folder in errors (default: its path).

    Raises:
        NotAnAdapter: If the file is missing, unreadable, or not a LoRA config.
    """
    shown = shown or str(folder)
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not Path(folder).is_dir():
        raise NotAnAdapter(f"{shown} is not a folder", fix=_FIX_NOT_LORA)
    if not path.is_file():
        raise NotAnAdapter(f"{shown} is not a PEFT adapter (no {ADAPTER_CONFIG_FILE})",
                           fix=_FIX_NOT_LORA)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NotAnAdapter(f"{shown}/{ADAPTER_CONFIG_FILE} is not valid JSON ({exc})",
                           fix=_FIX_NOT_LORA) from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise NotAnAdapter(
            f"{shown} is a PEFT {peft_type or 'unknown'} adapter, not LoRA",
            fix="loradock serves LoRA adapters only; train one with `loradock train`.",
        )
    return config


def inspect_adapter(folder: Path, base: BaseInfo, *, shown: str | None = None) -> Capabilities:
    """Validate an adapter folder against ``base`` and return its capabilities.

    Args:
        folder: The folder to read (the store passes its private copy).
        base: The base it must fit.
        shown: How to name the folder in errors (the store passes the user's folder, so that
            errors about the copy name what the user gave).

    Raises:
        UnsafeWeights: Pickle weights present.
        NotAnAdapter: Not a PEFT LoRA folder, or no LoRA tensors.
        Incompatible: Made for another base, or modules missing / shapes wrong on ``base``.
    """
    folder = Path(folder)
    shown = shown or str(folder)
    refuse_pickle(folder, shown=shown)
    config = read_adapter_config(folder, shown=shown)
    weights = folder / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise NotAnAdapter(f"{shown} has no {ADAPTER_WEIGHTS_FILE}", fix=_FIX_NOT_LORA)
    name = Path(shown).name
    _check_base_reference(folder, name, config, base)
    header = safetensors_header(weights)
    return _capabilities(name, config, header, base)


def _check_base_reference(folder: Path, name: str, config: dict[str, Any],
                          base: BaseInfo) -> None:
    manifest = AdapterManifest.read(folder)
    if manifest is not None and manifest.base.get("fingerprint"):
        if manifest.base["fingerprint"] == base.fingerprint:
            return
        raise Incompatible(
            f"Adapter {name!r} was trained on base fingerprint "
            f"{manifest.base['fingerprint'][:12]} ({manifest.base.get('name')!r}), "
            f"not on {base.name!r} ({base.fingerprint[:12]})",
            fix=f"Register it with --base {manifest.base.get('name') or 'NAME'} "
            "(add that base first with `loradock hub add-base`).",
            param="base",
        )
    reference = config.get("base_model_name_or_path")
    if not reference or base.matches(reference) or _same_local_base(reference, base):
        return
    if not _is_existing_folder(reference) and reference.startswith(("/", ".", "~")):
        return  # a dead local path (LESSONS #5): the shape check below decides
    raise Incompatible(
        f"Adapter {name!r} names base_model_name_or_path={reference!r}, "
        f"which is not the base {base.name!r} ({base.hf_id or base.path})",
        fix=f"Pass the right --base, or add its base with `loradock hub add-base NAME PATH`"
        f" (or set base_model_name_or_path to {base.name!r} if it really was trained on it).",
        param="base",
    )


def _is_existing_folder(reference: str) -> bool:
    return (Path(reference).expanduser() / "config.json").is_file()


def _same_local_base(reference: str, base: BaseInfo) -> bool:
    """True if ``reference`` is a local copy of ``base`` (same fingerprint, other path)."""
    if not _is_existing_folder(reference):
        return False
    from hub.bases import describe_base

    try:
        local = describe_base(base.name, Path(reference).expanduser())
        return local.fingerprint == base.fingerprint
    except LoradockError:
        return False


def _capabilities(
    name: str, config: dict[str, Any], header: dict[str, dict], base: BaseInfo
) -> Capabilities:
    ranks: list[int] = []
    leaves: set[str] = set()
    num_parameters = 0
    dtype = ""
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, meta in header.items():
        match = _LORA_KEY.match(key)
        if not match:
            continue
        module, part = match["module"], match["part"]
        pairs.setdefault(module, {})[part] = meta["shape"]
        count = 1
        for dim in meta["shape"]:
            count *= dim
        num_parameters += count
        dtype = dtype or meta["dtype"]
    if not pairs:
        raise NotAnAdapter(f"{name}/{ADAPTER_WEIGHTS_FILE} holds no LoRA tensors",
                           fix=_FIX_NOT_LORA)
    for module, parts in sorted(pairs.items()):
        target = base.modules.get(module)
        if target is None:
            raise Incompatible(
                f"Adapter {name!r} targets module {module!r}, which base {base.name!r} "
                "does not have",
                fix="Register it against the base it was trained on (--base).",
                param="base",
            )
        out_features, in_features = target
        leaf = module.rsplit(".", 1)[-1]
        leaves.add(leaf)
        if "lora_A" in parts and "lora_B" in parts:
            rank, a_in = parts["lora_A"]
            b_out, b_rank = parts["lora_B"]
            if a_in != in_features or b_out != out_features or b_rank != rank:
                raise Incompatible(
                    f"Adapter {name!r}: {module} has lora_A {parts['lora_A']} and "
                    f"lora_B {parts['lora_B']}, but base {base.name!r} has weight "
                    f"[{out_features}, {in_features}]",
                    fix="This adapter was made for a model of another size; use its own base.",
                    param="base",
                )
            ranks.append(rank)
        elif "lora_embedding_A" in parts:
            ranks.append(parts["lora_embedding_A"][0])
    modules_to_save = [str(m) for m in (config.get("modules_to_save") or [])]
    return Capabilities(
        rank=max(ranks) if ranks else int(config.get("r") or 0),
        alpha=float(config.get("lora_alpha") or config.get("r") or 0),
        target_modules=sorted(leaves),
        modules_to_save=modules_to_save,
        use_dora=bool(config.get("use_dora")),
        targets_embeddings=any(leaf in _EMBEDDING_LEAVES for leaf in leaves),
        use_rslora=bool(config.get("use_rslora")),
        num_parameters=num_parameters,
        dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(dtype, dtype.lower()),
    )
