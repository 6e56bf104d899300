"""QLoRA's frozen half: the base loaded in 4-bit NF4 with double quantisation, and LoRA on top.

Compute dtype: bfloat16 on CUDA; on CPU measured per machine (`train.dtype_choice`: bf16 ran
7-10x slower than fp32 on an AVX2-only CPU and ~2.8x faster on one with AVX512-BF16).
`QuantSpec.record` is what the manifest stores.

TRL casts LoRA parameters of a quantised model to bf16 (the QLoRA paper's choice for GPUs);
`match_adapter_dtype` casts them back to float32 on CPU (with bf16 compute, autocast then runs
the matmuls in bf16 from float32 master weights).

Where the job ends: this module loads and wraps the model. Building trainers is `train.sft` and
`train.dpo`; what the adapter folder holds is `train.run`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hub.nf4 import bnb_4bit_config, pin_training_numerics

Device = Literal["cpu", "cuda"]


def pick_device() -> Device:
    """Return ``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class QuantSpec:
    """How the base is quantised for training.

    Attributes:
        device: ``cpu`` or ``cuda``.
        compute_dtype: ``float32`` or ``bfloat16`` (bfloat16 on CUDA; measured on CPU).
        quant_type: bitsandbytes 4-bit type (``nf4``).
        double_quant: Quantise the quantisation constants too.
    """

    device: Device
    compute_dtype: str
    quant_type: str = "nf4"
    double_quant: bool = True
    attention_dtype: str | None = None  # float32: attention outside bf16 autocast (measured)

    @classmethod
    def for_device(cls, device: Device, compute_dtype: str | None = None,
                   attention_dtype: str | None = None) -> QuantSpec:
        """The spec for ``device``.

        Args:
            device: ``cpu`` or ``cuda``.
            compute_dtype: The dtype to use (`train.dtype_choice` measures it on CPU); None:
                bfloat16 on CUDA, float32 on CPU.
            attention_dtype: ``float32`` to run attention outside bf16 autocast (measured
                faster on some CPUs, `train.attention_dtype`); None: the compute dtype.
        """
        if compute_dtype is None:
            compute_dtype = "bfloat16" if device == "cuda" else "float32"
        return cls(device=device, compute_dtype=compute_dtype, attention_dtype=attention_dtype)

    def torch_dtype(self) -> Any:
        """The compute dtype as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.compute_dtype)

    def bnb_config(self) -> Any:
        """A transformers ``BitsAndBytesConfig`` for this spec."""
        return bnb_4bit_config(self.quant_type, self.double_quant, self.compute_dtype)

    def record(self) -> dict[str, Any]:
        """The manifest's ``quantization`` section."""
        return {
            "load_in_4bit": True,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
        }


def load_quantized_base(base_path: Path, spec: QuantSpec, *, gradient_checkpointing: bool) -> Any:
    """Load an HF base folder in 4-bit and prepare it for k-bit training.

    Args:
        base_path: The base's HF folder (``BaseInfo.path``).
        spec: Quantisation settings.
        gradient_checkpointing: Passed to PEFT's ``prepare_model_for_kbit_training``.

    Returns:
        The quantised ``PreTrainedModel`` (its linear layers are bitsandbytes ``Linear4bit``).
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if spec.device == "cuda":  # one GPU per process under accelerate launch / torchrun (DDP)
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path),
        quantization_config=spec.bnb_config(),
        dtype=spec.torch_dtype(),
        trust_remote_code=False,
        **kwargs,
    )
    model.config.use_cache = False
    pin_training_numerics(model)  # the same 4-bit values in validation passes (hub.nf4)
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing
    )


def lora_config(
    r: int, alpha: float, dropout: float, target_modules: list[str] | str,
    use_dora: bool = False,
) -> Any:
    """A PEFT ``LoraConfig`` for causal LM training (DoRA when ``use_dora``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=use_dora,
    )


def attach_lora(model: Any, config: Any | None, parent_dir: Path | None) -> Any:
    """Wrap ``model`` in a trainable LoRA: a fresh one from ``config`` or a parent adapter.

    Args:
        model: The quantised base.
        config: ``LoraConfig`` for a fresh adapter (ignored when ``parent_dir`` is given).
        parent_dir: Adapter folder to continue training from.

    Returns:
        A ``PeftModel`` whose only trainable parameters are the LoRA weights.
    """
    from peft import PeftModel, get_peft_model

    if parent_dir is not None:
        return PeftModel.from_pretrained(model, str(parent_dir), is_trainable=True)
    return get_peft_model(model, config)


def match_adapter_dtype(model: Any, spec: QuantSpec) -> int:
    """Keep trainable parameters in float32 on CPU (undoing TRL's bf16 cast), else compute dtype.

    On CPU the LoRA weights and their AdamW states stay float32 whatever the compute dtype:
    with bfloat16 compute, autocast runs the matmuls in bf16 from float32 master weights (mixed
    precision), so small updates are not rounded away.

    Returns:
        How many parameters were cast.
    """
    import torch

    dtype = torch.float32 if spec.device == "cpu" else spec.torch_dtype()
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def count_parameters(model: Any) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; 4-bit weights count as their real size."""
    trainable = 0
    total = 0
    for param in model.parameters():
        n = param.numel()
        if getattr(param, "quant_state", None) is not None or type(param).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def four_bit_modules(model: Any) -> list[str]:
    """Names of bitsandbytes ``Linear4bit`` modules (the quantised base under the LoRA)."""
    import bitsandbytes as bnb

    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
