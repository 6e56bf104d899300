"""Load the base model once with transformers, in the weight format asked for.

Formats (``EngineConfig.base_dtype``):

- ``nf4``: bitsandbytes 4-bit NF4 with double quantisation; compute dtype fp32 on CPU, bf16 on
  CUDA. lm_head / tied embeddings stay unquantised (transformers' default).
- ``nf4-dense``: the same NF4 values, dequantised once into dense fp32 (CPU) or bf16 (CUDA)
  layers (`hub.nf4`): what a QLoRA adapter trained on, at dense speed, with no memory saving.
- ``fp32``, ``bf16``, ``fp16``: dense original weights.
- ``auto``: ``nf4-dense`` on CPU, ``nf4`` on CUDA, so every device serves the base numbers that
  loradock's QLoRA adapters were trained on (served on the original fp32 weights, the demo
  adapter's exact match drops from 0.93 to 0.73). On CPU dense layers decode faster than
  bitsandbytes 4-bit, which dequantises every weight on each call with no fused CPU kernel
  (measured 0.42-0.73x of dense here). On CUDA the quantised base is the point of the product
  (one small base, many adapters). Adapters trained
  on full-precision weights elsewhere may prefer ``fp32``/``bf16``.

Compute dtype (activations, KV cache, fused weights, LoRA): forced by ``fp32``/``bf16``/
``fp16``; otherwise (``auto``, ``nf4-dense``, ``nf4``) bf16 on CUDA and, on CPU, the faster of
fp32 and bf16 by measurement with an agreement check (`serve.runtime.dtype_choice`).

Families: those in `serve.runtime.families.FAMILIES` (the runner fuses their layers itself);
others are refused with the list of families served and the engines that serve the rest.

Where the job ends: this module returns the loaded model and its facts; running it is
`serve.runtime.runner`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.errors import InvalidInput, Unsupported
from hub.nf4 import bnb_4bit_config, dense_nf4_model, pin_training_numerics
from serve.runtime import dtype_choice
from serve.runtime.dtype_choice import DtypeChoice
from serve.runtime.families import LLAMA, FamilySpec, context_cap, family_for

if TYPE_CHECKING:
    import torch

    from hub.bases import BaseInfo

DENSE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class LoadedBase:
    """A loaded base model and the facts the runner needs.

    Attributes:
        model: The transformers ``*ForCausalLM`` (eval mode, no grad).
        dtype_name: ``nf4``, ``nf4-dense``, ``fp32``, ``bf16`` or ``fp16`` (what ``auto``
            resolved to).
        compute_dtype: Dtype of activations, KV cache and LoRA weights.
        device: Where it runs.
        max_len: Longest sequence served (config cap and the model's context).
        load_s: Seconds the load took.
        spec: The family's differences from Llama.
        dtype_choice: Why the compute dtype was chosen (measured on CPU, or forced).
    """

    model: Any
    dtype_name: str
    compute_dtype: torch.dtype
    device: torch.device
    max_len: int
    load_s: float
    spec: FamilySpec = LLAMA
    dtype_choice: DtypeChoice | None = None


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        InvalidInput: ``cuda`` asked for but not available, or an unknown device.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidInput(f"Unknown device {device!r}", fix="Use cpu, cuda or auto.",
                           param="device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("device='cuda' was asked for but no CUDA GPU is visible",
                           fix="Use --device cpu.", param="device")
    return torch.device(device)


def resolve_dtype(base_dtype: str, device: torch.device) -> str:
    """Resolve ``auto`` for ``device`` (see the module docstring for why)."""
    if base_dtype == "auto":
        return "nf4" if device.type == "cuda" else "nf4-dense"
    if base_dtype not in ("nf4", "nf4-dense") and base_dtype not in DENSE_DTYPES:
        raise InvalidInput(f"Unknown base dtype {base_dtype!r}",
                           fix="Use auto, nf4, nf4-dense, fp32, bf16 or fp16.",
                           param="base_dtype")
    return base_dtype


def check_architecture(path: Path) -> dict[str, Any]:
    """Read ``config.json`` and refuse families the runner does not know.

    Raises:
        Unsupported: A family not in the table, or a sequence-dependent rope.
    """
    config = json.loads((Path(path) / "config.json").read_text())
    family_for(config)
    return config


def load_base(base: BaseInfo, base_dtype: str, device_name: str, max_model_len: int,
              compute: str = "auto") -> LoadedBase:
    """Load ``base`` for inference.

    Args:
        base: The registered base (its ``path`` is an HF folder with safetensors weights).
        base_dtype: ``auto``, ``nf4``, ``nf4-dense``, ``fp32``, ``bf16`` or ``fp16``.
        device_name: ``auto``, ``cpu`` or ``cuda``.
        max_model_len: Requested context cap (lowered to the model's own).
        compute: ``auto`` (measured on CPU), ``fp32`` or ``bf16`` (ignored when ``base_dtype``
            is a dense dtype, which forces both).

    Raises:
        Unsupported: Architecture, or nf4 without bitsandbytes.
        InvalidInput: Unknown dtype or device.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.perf_counter()
    config = check_architecture(Path(base.path))
    spec = family_for(config)
    device = resolve_device(device_name)
    dtype_name = resolve_dtype(base_dtype, device)
    kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True}
    load_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype_name == "nf4-dense":
        model = dense_nf4_model(Path(base.path), compute_dtype=str(load_dtype)[6:],
                                device=str(device))
    elif dtype_name == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise Unsupported("nf4 needs bitsandbytes", fix="pip install bitsandbytes") from exc
        model = AutoModelForCausalLM.from_pretrained(
            base.path, quantization_config=bnb_4bit_config("nf4", True, str(load_dtype)[6:]),
            dtype=load_dtype, device_map={"": device}, **kwargs)
        pin_training_numerics(model)  # the 4-bit values the adapters trained on (hub.nf4)
    else:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, **kwargs)
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    choice = _compute_dtype(model, base, base_dtype, dtype_name, device, compute)
    return LoadedBase(
        model=model,
        dtype_name=dtype_name,
        compute_dtype=getattr(torch, DENSE_DTYPES[choice.dtype]),
        device=device,
        max_len=min(max_model_len, context_cap(config)),
        load_s=time.perf_counter() - started,
        spec=spec,
        dtype_choice=choice,
    )


def _compute_dtype(model: Any, base: BaseInfo, base_dtype: str, dtype_name: str,
                   device: torch.device, compute: str) -> DtypeChoice:
    """Forced by ``fp32``/``bf16``/``fp16`` or ``compute``; bf16 on CUDA; else measured."""
    import torch

    if device.type == "cpu" and (base_dtype in DENSE_DTYPES or compute != "auto"):
        forced = ("forced by --base-dtype" if base_dtype in DENSE_DTYPES
                  else "forced by compute_dtype")
        choice = DtypeChoice(base_dtype if base_dtype in DENSE_DTYPES else compute, forced)
        return dtype_choice.add_kernel(choice, model.config)  # kernels give the same numbers
    if base_dtype in DENSE_DTYPES:
        return DtypeChoice(base_dtype, "forced by --base-dtype")
    if compute != "auto":
        return DtypeChoice(compute, "forced by compute_dtype")
    if device.type != "cpu":
        return DtypeChoice("bf16", "CUDA")
    if dtype_name == "nf4":
        return DtypeChoice("fp32", "bitsandbytes 4-bit on CPU computes in fp32")
    weights = sorted(Path(base.path).glob("*.safetensors"))
    weights_id = json.dumps([str(Path(base.path).resolve()), dtype_name,
                             [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]])
    choice = dtype_choice.choose(model, Path(base.path), weights_id, torch.get_num_threads(),
                                 dtype_choice.default_cache_dir())
    dtype_choice.log.info("compute dtype %s (%s%s)", choice.dtype, choice.reason,
                          ", cached" if choice.cached else "")
    return choice
