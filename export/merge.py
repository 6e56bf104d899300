"""Merging an adapter into its base in fp32 (never into 4-bit weights), and measuring the drift.

QLoRA adapters are trained on a 4-bit (NF4) base, but merging into 4-bit weights rounds the update
away (PEFT warns; lesson 6). So the merge runs in fp32 dense layers (``PeftModel.from_pretrained``
then ``merge_and_unload``) and the result is cast to the requested storage dtype afterwards. The
dense layers hold either the 4-bit values the adapter trained on, dequantised (`hub.nf4`,
``base_weights="training"``, the default for QLoRA adapters: what evaluation scored and what the
server runs on CPU), or the original unquantised weights (``"original"``), which the adapter never
saw. `measure_drift` reports how far the merged model is from the adapter on its real 4-bit
training base (top-1 agreement and mean |Δlogit| on the parity prompts).

Where the job ends: models in memory and numbers. Writing folders or GGUF files is
`export.pipeline`'s and `export.gguf_writer`'s job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.config import BaseWeights, MergeDtype
from hub.manifest import CHAT_TEMPLATE_FILE, AdapterManifest

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class DriftReport:
    """How far the merged model is from the adapter on its quantised training base.

    Attributes:
        reference: What the merged model was compared with (e.g. ``adapter on nf4 base``).
        top1_agreement: Share of positions where both pick the same next token.
        mean_abs_dlogit: Mean |logit difference| over all positions and vocabulary.
        max_abs_dlogit: Largest |logit difference|.
        positions: Positions compared.
        note: Why the measurement was skipped or what was assumed.
    """

    reference: str
    top1_agreement: float | None = None
    mean_abs_dlogit: float | None = None
    max_abs_dlogit: float | None = None
    positions: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


@dataclass
class LoadedAdapter:
    """A base model with an adapter applied (unmerged) and the pieces around it."""

    model: Any
    tokenizer: Any
    chat_template: str
    base_path: Path
    adapter_path: Path
    quantization: dict[str, Any] = field(default_factory=dict)
    base_weights: str = "original"


def chat_template_for(adapter_path: Path, base_path: Path, tokenizer: Any = None) -> str:
    """The template used in training: the adapter's own file first, then the base's."""
    for folder in (Path(adapter_path), Path(base_path)):
        path = folder / CHAT_TEMPLATE_FILE
        if path.is_file():
            return path.read_text()
    if tokenizer is not None and isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    from hub.errors import Unsupported

    raise Unsupported(
        f"Neither {adapter_path} nor {base_path} has a chat template",
        fix="Add chat_template.jinja to the adapter folder (train writes it).",
    )


def training_values(quantization: dict[str, Any], requested: BaseWeights) -> dict | None:
    """The 4-bit settings whose values to merge into, or None for the original weights.

    Raises:
        InvalidInput: ``training`` asked for an adapter with no 4-bit training record.
    """
    from hub.nf4 import trained_4bit

    four_bit = trained_4bit(quantization)
    if requested == "original" or (requested == "auto" and four_bit is None):
        return None
    if four_bit is None:
        from hub.errors import InvalidInput

        raise InvalidInput(
            "--base-weights training: the adapter's manifest records no 4-bit training base",
            fix="Use --base-weights original (or auto).", param="base_weights",
        )
    return four_bit


def load_adapter(base_path: Path, adapter_path: Path, *, quantised: dict | None = None,
                 nf4_values: dict | None = None) -> Any:
    """Load the base in fp32 with the adapter applied (unmerged).

    Args:
        base_path: HF base folder.
        adapter_path: PEFT adapter folder.
        quantised: bitsandbytes settings ``{"quant_type", "double_quant"}``: a real 4-bit base.
        nf4_values: The same settings: dense fp32 layers holding those 4-bit values.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if nf4_values is not None:
        from hub.nf4 import dense_nf4_model

        dense = dense_nf4_model(Path(base_path), quant_type=nf4_values["quant_type"],
                                double_quant=nf4_values["double_quant"])
        model = PeftModel.from_pretrained(dense, str(adapter_path), is_trainable=False)
        model.eval()
        return model
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantised is not None:
        from hub.nf4 import bnb_4bit_config

        kwargs["quantization_config"] = bnb_4bit_config(
            quantised.get("quant_type", "nf4"), bool(quantised.get("double_quant", False)),
            "float32",
        )
        kwargs["device_map"] = "cpu"
    base = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    if quantised is not None:
        from hub.nf4 import pin_training_numerics

        pin_training_numerics(base)
    model = PeftModel.from_pretrained(base, str(adapter_path), is_trainable=False)
    model.eval()
    return model


def load_for_export(base_path: Path, adapter_path: Path, *,
                    base_weights: BaseWeights = "auto") -> LoadedAdapter:
    """Load the fp32 base with the adapter applied (unmerged), its tokenizer and template.

    Args:
        base_path: HF base folder.
        adapter_path: PEFT adapter folder (its manifest says how it was trained).
        base_weights: ``training``, ``original`` or ``auto`` (see `training_values`).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    manifest = AdapterManifest.read(adapter_path)
    quantization = dict(manifest.quantization) if manifest else {}
    values = training_values(quantization, base_weights)
    return LoadedAdapter(
        model=load_adapter(base_path, adapter_path, nf4_values=values),
        tokenizer=tokenizer,
        chat_template=chat_template_for(adapter_path, base_path, tokenizer),
        base_path=Path(base_path),
        adapter_path=Path(adapter_path),
        quantization=quantization,
        base_weights="original" if values is None else "training",
    )


def merge(loaded: LoadedAdapter) -> Any:
    """Fold the adapter into the fp32 base weights; returns the plain transformers model."""
    import torch

    with torch.no_grad():
        return loaded.model.merge_and_unload(progressbar=False, safe_merge=True)


def cast_like_storage(model: Any, dtype: MergeDtype) -> Any:
    """Round the weights to ``dtype`` and back to fp32 (CPU computes in fp32; lesson: no bf16).

    Returns the same model; used to measure what a 16-bit save loses before saving it.
    """
    import torch

    if dtype == "fp32":
        return model
    target = getattr(torch, TORCH_DTYPES[dtype])
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(target).to(torch.float32))
    return model


def training_quantization(loaded: LoadedAdapter) -> tuple[dict[str, Any] | None, str]:
    """The 4-bit settings the adapter was trained with, and a note on where they came from.

    `hub.nf4.trained_4bit` decides (the rule eval, serving and `training_values` use), so the
    drift reference is the base the merge was made on: no 4-bit record, no 4-bit reference.
    """
    from hub.nf4 import trained_4bit

    settings = trained_4bit(loaded.quantization)
    if settings is None:
        return None, "the manifest records no 4-bit training base"
    return settings, "from the manifest"


def measure_drift(loaded: LoadedAdapter, merged_logits: list[Any], sequences: list[list[int]],
                  starts: list[int]) -> DriftReport:
    """Compare the merged model's logits with the adapter on its quantised training base.

    Args:
        loaded: What `load_for_export` returned (paths, manifest quantisation).
        merged_logits: Per sequence, the merged model's logits at positions ``starts[i]-1...``.
        sequences: Token ids (prompt + generated) per prompt.
        starts: Prompt lengths (where the compared positions begin).
    """
    from export.parity import compare_logits, forward_logits

    settings, note = training_quantization(loaded)
    if settings is None:  # the base it was merged into: measures the merge and the storage cast
        label = "adapter on the unquantised base"
        quantised = load_adapter(loaded.base_path, loaded.adapter_path)
    else:
        label = f"adapter on {settings['quant_type']} 4-bit base"
        try:
            quantised = load_adapter(loaded.base_path, loaded.adapter_path, quantised=settings)
        except (ImportError, RuntimeError, ValueError) as exc:  # bitsandbytes missing/unusable
            return DriftReport(reference=label, note=f"skipped: cannot load a 4-bit base ({exc})")
    other = forward_logits(quantised, sequences, starts)
    del quantised
    agreement, mean_abs, max_abs, positions = compare_logits(merged_logits, other)
    return DriftReport(
        reference=label,
        top1_agreement=agreement,
        mean_abs_dlogit=mean_abs,
        max_abs_dlogit=max_abs,
        positions=positions,
        note=note,
    )


def save_merged(model: Any, loaded: LoadedAdapter, out: Path, dtype: MergeDtype) -> None:
    """Save the merged model (safetensors), tokenizer and chat template into ``out``."""
    import torch

    model = model.to(getattr(torch, TORCH_DTYPES[dtype]))
    model.config._name_or_path = ""
    model.save_pretrained(str(out), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(out))
    (Path(out) / CHAT_TEMPLATE_FILE).write_text(loaded.chat_template)
    config_path = Path(out) / "tokenizer_config.json"
    if config_path.is_file():  # keep the template the adapter was trained with, byte for byte
        config = json.loads(config_path.read_text())
        config.pop("chat_template", None)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
