"""Real PEFT adapters made on the real embedded base, for tests and benchmarks.

`make_lora` builds a LoRA with PEFT's own `get_peft_model` and saves it with `save_pretrained`:
the same files a training run writes. lora_B is filled with small random values (PEFT starts it
at zero, which would make every adapter a no-op), so different seeds give different outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hub.bases import BaseInfo


def load_base_model(base: BaseInfo, dtype: str = "float32"):
    """Load the base folder with transformers (fp32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base.path, dtype=getattr(torch, dtype))


def make_lora(
    base_model,
    out: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    targets: Sequence[str] | str = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.05,
    **lora_kwargs,
) -> Path:
    """Save a random LoRA adapter for ``base_model`` in ``out`` and return ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        task_type="CAUSAL_LM",
        lora_dropout=0.0,
        **lora_kwargs,
    )
    peft_model = get_peft_model(base_model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    # Unwrap so the same base model object can be reused for the next adapter.
    peft_model.unload()
    return Path(out)


def set_base_reference(folder: Path, reference: str | None) -> None:
    """Rewrite ``base_model_name_or_path`` in an adapter folder (for refusal tests)."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = reference
    path.write_text(json.dumps(config))
