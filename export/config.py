"""Typed options for every export, their help text (one place), and the export's own error.

The CLI (`loradock/cli_export.py`) builds these dataclasses from its flags and reads each flag's
help from `help_for`, so a flag's meaning is written once, here. Choices are `Literal` types.

Where the job ends: data and validation only. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from hub.errors import InvalidInput, LoradockError

Quant = Literal["f16", "q8_0", "q4_k_m"]
MergeDtype = Literal["fp32", "fp16", "bf16"]
LoraDtype = Literal["f32", "f16"]
BaseWeights = Literal["auto", "training", "original"]

BASE_WEIGHTS_HELP = (
    "Base weights the adapter is merged into: training = the 4-bit (NF4) values a QLoRA adapter "
    "was trained on, dequantised (what `loradock eval` scored and `loradock serve` runs on CPU); "
    "original = the unquantised base; auto = training when the manifest records 4-bit training, "
    "else original."
)

# Minimum teacher-forced top-1 agreement with the PEFT adapter on the unmerged base, per output
# format. Measured here on SmolLM2-135M: f16 100 %, q8_0 ~96 %, q4_k_m ~85 %.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "fp32": 0.99,
    "fp16": 0.99,
    "bf16": 0.95,
    "f16": 0.99,
    "q8_0": 0.90,
    "q4_k_m": 0.75,
    "lora": 0.99,
}


class ParityFailed(LoradockError):
    """An exported model disagrees with the PEFT adapter more than its threshold allows."""

    http_status = 500
    error_type = "server_error"
    code = "parity_failed"
    exit_code = 7


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ParityOptions:
    """How an export is checked against the PEFT adapter on the unmerged base."""

    verify: bool = field(
        default=True,
        metadata=_help("Check parity and fail the export under the threshold (--no-verify: "
                       "measure and report only)."),
    )
    prompts: int = field(
        default=8,
        metadata=_help("Prompts to compare on (the manifest's eval prompts first, then bundled "
                       "ones)."),
    )
    max_tokens: int = field(
        default=32, metadata=_help("Greedy tokens generated per prompt by the reference.")
    )
    threshold: float | None = field(
        default=None,
        metadata=_help("Minimum top-1 agreement (0-1); default per format: f16 0.99, q8_0 0.90, "
                       "q4_k_m 0.75, merged 0.99 (bf16 0.95)."),
    )
    threads: int = field(default=0, metadata=_help("CPU threads for llama.cpp (0: its default)."))

    def threshold_for(self, kind: str) -> float:
        """The threshold for output format ``kind`` (``f16``, ``q8_0``, ``fp32``, ``lora``...)."""
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[kind]

    def validate(self) -> ParityOptions:
        """Check ranges; raise one error naming every bad flag."""
        problems = []
        if self.prompts < 1:
            problems.append(f"--prompts must be >= 1 (got {self.prompts})")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1 (got {self.max_tokens})")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            problems.append(f"--threshold must be between 0 and 1 (got {self.threshold})")
        if problems:
            raise InvalidInput("; ".join(problems), fix="Fix the values and run again.")
        return self


@dataclass
class MergeOptions:
    """``loradock export merged``: a 16-bit or fp32 merge, never into 4-bit weights."""

    dtype: MergeDtype = field(
        default="fp32",
        metadata=_help("Weight dtype of the saved merged model (the merge itself runs in fp32)."),
    )
    measure_quantised: bool = field(
        default=True,
        metadata=_help("Also measure how far the merged model is from the adapter on its 4-bit "
                       "(NF4) training base."),
    )
    base_weights: BaseWeights = field(default="auto", metadata=_help(BASE_WEIGHTS_HELP))

    def validate(self) -> MergeOptions:
        """Check the dtype and base-weights choices."""
        _check_choice("--dtype", self.dtype, MergeDtype)
        _check_choice("--base-weights", self.base_weights, BaseWeights)
        return self


@dataclass
class GgufOptions:
    """``loradock export gguf``: the merged model as one GGUF file."""

    quant: Quant = field(
        default="f16",
        metadata=_help("f16 is written directly; q8_0 and q4_k_m are quantised by llama.cpp "
                       "from an f32 GGUF."),
    )
    pre_tokenizer: str | None = field(
        default=None,
        metadata=_help("llama.cpp pre-tokenizer name, when it cannot be recognised from the "
                       "tokenizer (e.g. smollm, llama-bpe)."),
    )
    base_weights: BaseWeights = field(default="auto", metadata=_help(BASE_WEIGHTS_HELP))

    def validate(self) -> GgufOptions:
        """Check the quant and base-weights choices."""
        _check_choice("--quant", self.quant, Quant)
        _check_choice("--base-weights", self.base_weights, BaseWeights)
        return self


@dataclass
class LoraGgufOptions:
    """``loradock export lora-gguf``: the adapter as a llama.cpp GGUF LoRA."""

    dtype: LoraDtype = field(
        default="f32", metadata=_help("Storage type of the LoRA tensors in the GGUF.")
    )

    def validate(self) -> LoraGgufOptions:
        """Check the dtype choice."""
        _check_choice("--dtype", self.dtype, LoraDtype)
        return self


@dataclass
class OllamaOptions:
    """``loradock export ollama``: GGUF + Modelfile, optionally ``ollama create``."""

    quant: Quant = field(default="q8_0", metadata=_help("Quantisation of the model GGUF."))
    adapter_only: bool = field(
        default=False,
        metadata=_help("FROM the base GGUF + ADAPTER the LoRA GGUF instead of a merged model "
                       "(Ollama's ADAPTER support is narrower)."),
    )
    create: bool = field(
        default=True,
        metadata=_help("Run `ollama create` when an ollama binary is on PATH (else print it)."),
    )
    model_name: str | None = field(
        default=None, metadata=_help("Ollama model name (default NAME:vVERSION).")
    )
    base_weights: BaseWeights = field(
        default="auto",
        metadata=_help(BASE_WEIGHTS_HELP + " --adapter-only always uses the original base GGUF."),
    )

    def validate(self) -> OllamaOptions:
        """Check the quant and base-weights choices (adapter-only runs on the stock base)."""
        _check_choice("--quant", self.quant, Quant)
        _check_choice("--base-weights", self.base_weights, BaseWeights)
        if self.adapter_only and self.base_weights == "training":
            raise InvalidInput(
                "--adapter-only puts the LoRA on the stock base GGUF, which holds the original "
                "weights, not the 4-bit training values",
                fix="Drop --adapter-only to merge into the training values, or pass "
                "--base-weights original.",
                param="base_weights",
            )
        return self


def _check_choice(flag: str, value: str, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise InvalidInput(
            f"{flag} {value!r} is not one of {', '.join(allowed)}",
            fix=f"Pass {flag} {allowed[0]} (or another listed value).",
            param=flag.lstrip("-"),
        )


def help_for(options: type, name: str) -> str:
    """Return the help text of field ``name`` of an options dataclass (for CLI flags)."""
    for item in fields(options):
        if item.name == name:
            return str(item.metadata.get("help", ""))
    raise KeyError(name)
