"""The base as a QLoRA adapter saw it: 4-bit (NF4) values held in ordinary dense layers.

A QLoRA adapter learns on the base's 4-bit weights. Applied to the original full-precision
weights it meets a different model: on SmolLM2 the demo adapter's exact match fell from 0.93 to
0.73, a tie with the few-shot baseline. `dense_nf4_model` loads the base in 4-bit exactly as
training does (bitsandbytes ``Linear4bit``), dequantises every 4-bit weight once and writes the
values into a plain model of the compute dtype. The result computes what 4-bit compute computes
(the tests check logits bit for bit on CPU) at dense speed, and any tool that wants ordinary
layers (PEFT, the serving runner, merging) can use it. It saves no memory: where memory is the
point (CUDA serving), keep the real 4-bit layers.

This lives in hub because it is a fact about a base reference ("the base, as a QLoRA adapter
with this ``quantization`` record trained on it"), shared by train (evaluation) and serve.

Where the job ends: returning the model. Choosing when to use it is the caller's job (a manifest
whose ``quantization.load_in_4bit`` is true, or ``--base-dtype nf4-dense`` when serving).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hub.errors import Unsupported


def trained_4bit(quantization: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The 4-bit settings of a manifest's ``quantization`` record, or None if it is not 4-bit.

    Returns:
        ``{"quant_type", "double_quant"}`` (loradock's QuantSpec defaults fill missing keys),
        ready to pass to `dense_nf4_model`; None when ``load_in_4bit`` is absent or false.
    """
    record = quantization or {}
    if not record.get("load_in_4bit"):
        return None
    return {"quant_type": str(record.get("quant_type", "nf4")),
            "double_quant": bool(record.get("double_quant", True))}


def bnb_4bit_config(quant_type: str, double_quant: bool, compute_dtype: str) -> Any:
    """A transformers ``BitsAndBytesConfig`` for 4-bit loading.

    Args:
        quant_type: ``nf4`` or ``fp4``.
        double_quant: Quantise the quantisation constants too.
        compute_dtype: Torch dtype name of the compute (``float32`` on CPU, ``bfloat16`` on CUDA).
    """
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def pin_training_numerics(model: Any) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on the numerics QLoRA training uses.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight on CPUs with AVX512-BF16 at its first
    forward outside training (evaluation, generation) and rounds its block scales to bfloat16
    for good: on such a CPU a validation pass in the middle of training changed the frozen
    base for the remaining steps, a resumed run no longer matched the uninterrupted one, and
    4-bit inference stopped matching `dense_nf4_model`. This turns that repacking off, so the
    4-bit values are the same on every CPU, in training and in inference.

    Args:
        model: Any ``torch.nn.Module``; modules that are not ``Linear4bit`` are left alone.

    Returns:
        How many 4-bit layers were pinned.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    pinned = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            pinned += 1
    return pinned


def dense_nf4_model(
    base_path: Path,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float32",
    device: str = "cpu",
) -> Any:
    """Load ``base_path`` with its linear weights rounded to 4-bit, in dense layers.

    Args:
        base_path: The base's HF folder (safetensors).
        quant_type: bitsandbytes 4-bit type the adapter was trained with.
        double_quant: Whether training used double quantisation (8-bit block scales; the
            dequantisation reproduces their rounding too).
        compute_dtype: Dtype of the returned model.
        device: ``cpu`` or ``cuda[:N]``; where the 4-bit load and the returned model live.

    Returns:
        A ``PreTrainedModel`` in eval mode with no bitsandbytes layers.

    Raises:
        Unsupported: bitsandbytes is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise Unsupported(
            "Loading the 4-bit base values needs bitsandbytes",
            fix="pip install bitsandbytes (it runs on CPU too).",
        ) from exc
    dtype = getattr(torch, compute_dtype)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(base_path),
        quantization_config=bnb_4bit_config(quant_type, double_quant, compute_dtype),
        dtype=dtype,
        device_map={"": device},
        trust_remote_code=False,
        use_safetensors=True,
    )
    weights = {
        name: bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        for name, module in quantized.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    del quantized
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    model.to(device)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            target = modules[name].weight
            target.copy_(weight.to(target.dtype).reshape(target.shape))
    model.eval()
    return model
