"""Write a PEFT LoRA adapter as a llama.cpp GGUF LoRA (``general.type = adapter``).

The file llama.cpp loads with ``--lora`` (and llama-cpp-python with ``lora_path`` or
``llama_adapter_lora_init``) holds, per adapted weight ``W`` of the base:

- ``blk.N.attn_q.weight.lora_a``: PEFT's ``lora_A`` (``[r, in]``), unchanged;
- ``blk.N.attn_q.weight.lora_b``: PEFT's ``lora_B`` (``[out, r]``); for q and k its rows get the
  same rotary permutation as the base weights (`export.gguf_writer.permute_rotary`), since
  ``B @ A`` adds to the permuted weight;
- ``adapter.type = lora`` and one ``adapter.lora.alpha``: llama.cpp scales each pair by
  ``alpha / r`` with ``r`` read from the tensor. rsLoRA (``alpha / sqrt(r)``) and per-module
  ``rank_pattern``/``alpha_pattern`` are folded into ``lora_b`` so that the product is exact.

Refused, by name: DoRA, ``modules_to_save``, LoRA on embeddings or lm_head, LoRA biases, and any
module llama.cpp's ``llama`` architecture does not have. Bases other than Llama-family are refused
by `export.gguf_writer.check_architecture`.

Where the job ends: writes one file from an adapter folder and its base's ``config.json``.
Publishing atomically and checking parity are the caller's (`export.pipeline`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.config import LoraDtype
from export.gguf_writer import check_architecture, gguf_tensor_name, llama_hparams, permute_rotary
from hub.errors import Unsupported
from hub.inspect import read_adapter_config
from hub.manifest import ADAPTER_WEIGHTS_FILE

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$"
)


@dataclass
class LoraGgufSummary:
    """What was written: tensor pairs, alpha and the modules covered."""

    pairs: int
    alpha: float
    rank: int
    modules: list[str]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module path's suffix as a regex."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _refuse(config: dict[str, Any], folder: Path) -> None:
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora=true)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("lora_bias"):
        problems.append("LoRA biases (lora_bias=true)")
    if problems:
        raise Unsupported(
            f"Adapter {folder.name!r} uses {', '.join(problems)}, which a llama.cpp GGUF LoRA "
            "cannot hold",
            fix="Export a merged model instead (`loradock export gguf NAME`).",
            param="adapter",
        )


def load_lora_pairs(folder: Path) -> dict[str, dict[str, Any]]:
    """Read ``{module path: {"lora_A": tensor, "lora_B": tensor}}`` from an adapter folder."""
    from safetensors import safe_open

    pairs: dict[str, dict[str, Any]] = {}
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS_FILE), framework="pt") as fh:
        for key in fh.keys():
            match = _KEY.match(key)
            if match is None:
                raise Unsupported(
                    f"Adapter tensor {key!r} is not a LoRA A/B matrix (embedding LoRA, bias or "
                    "magnitude vectors cannot go into a GGUF LoRA)",
                    fix="Export a merged model instead (`loradock export gguf NAME`).",
                    param="adapter",
                )
            pairs.setdefault(match["module"], {})[match["part"]] = fh.get_tensor(key)
    return pairs


def write_lora_gguf(
    adapter_dir: Path,
    base_config: dict[str, Any],
    out: Path,
    *,
    dtype: LoraDtype = "f32",
    name: str = "",
) -> LoraGgufSummary:
    """Convert a PEFT LoRA folder into a GGUF LoRA at ``out``.

    Args:
        adapter_dir: PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``).
        base_config: The base model's ``config.json`` (heads for the permutation, layer count).
        out: File to write (the caller publishes it atomically).
        dtype: Storage type of the LoRA tensors.
        name: ``general.name``.

    Raises:
        Unsupported: DoRA, modules_to_save, non-matrix LoRA tensors, or modules llama.cpp lacks.
        NotAnAdapter: The folder is not a PEFT LoRA.
    """
    import gguf
    import numpy as np

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    _refuse(config, adapter_dir)
    arch = check_architecture(base_config)
    hp = llama_hparams(base_config)
    alpha = float(config.get("lora_alpha") or config.get("r") or 8)
    use_rslora = bool(config.get("use_rslora"))
    pairs = load_lora_pairs(adapter_dir)

    tensors: list[tuple[str, Any]] = []
    ranks: list[int] = []
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise Unsupported(f"Module {module!r} lacks lora_A or lora_B", param="adapter")
        target = gguf_tensor_name(f"{module}.weight", hp.n_layers)
        if target is None or target in ("token_embd.weight", "output.weight"):
            raise Unsupported(
                f"Adapter module {module!r} has no llama.cpp LoRA equivalent",
                fix="Only attention and MLP projections (q/k/v/o, gate/up/down) can be "
                "exported as a GGUF LoRA; export a merged model instead.",
                param="adapter",
            )
        a = parts["lora_A"].float().numpy()
        b = parts["lora_B"].float().numpy()
        rank = a.shape[0]
        ranks.append(rank)
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        wanted = module_alpha / (math.sqrt(rank) if use_rslora else rank)
        factor = wanted / (alpha / rank)
        if not math.isclose(factor, 1.0, rel_tol=1e-7):
            b = b * factor
        if target.endswith("attn_q.weight"):
            b = permute_rotary(b, hp.n_head)
        elif target.endswith("attn_k.weight"):
            b = permute_rotary(b, hp.n_head_kv)
        cast = np.float16 if dtype == "f16" else np.float32
        tensors.append((f"{target}.lora_a", np.ascontiguousarray(a.astype(cast))))
        tensors.append((f"{target}.lora_b", np.ascontiguousarray(b.astype(cast))))

    writer = gguf.GGUFWriter(str(out), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or adapter_dir.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return LoraGgufSummary(
        pairs=len(pairs), alpha=alpha, rank=max(ranks), modules=sorted(pairs)
    )


def read_base_config(model_dir: Path) -> dict[str, Any]:
    """Read a base folder's ``config.json``."""
    return json.loads((Path(model_dir) / "config.json").read_text())
