"""The adapter manifest and the capability record: what later stages read instead of arguments.

Layout of an adapter folder (written by `train`, copied verbatim by the store):

    adapter_model.safetensors   LoRA weights (PEFT naming)
    adapter_config.json         PEFT config
    chat_template.jinja         the chat template used in training, byte for byte
    loradock.json               `AdapterManifest` (this module)
    eval.json, eval_report.md   evaluation (train/eval)
    README.md                   model card (modelcards)

`Capabilities` is derived from the weights and `adapter_config.json` at registration
(`hub.inspect`) and stored in the index, so serve and export can refuse early and size limits.

This module defines data and (de)serialisation only; no file other than the manifest is read here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput

MANIFEST_FILE = "loradock.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
EVAL_JSON_FILE = "eval.json"
EVAL_REPORT_FILE = "eval_report.md"
CARD_FILE = "README.md"
MANIFEST_SCHEMA = 1


@dataclass
class Capabilities:
    """What an adapter needs from an engine; computed from its files at registration.

    Attributes:
        rank: Largest LoRA rank over all modules (rank_pattern included).
        alpha: lora_alpha (the default one; alpha_pattern may override per module).
        target_modules: Leaf module names that carry LoRA weights (e.g. ``q_proj``).
        modules_to_save: Fully trained copies of modules (vLLM and llama.cpp cannot serve them).
        use_dora: DoRA adapters (vLLM cannot serve them).
        targets_embeddings: LoRA on ``embed_tokens`` or ``lm_head``.
        use_rslora: rank-stabilised scaling (alpha / sqrt(r)).
        num_parameters: Number of LoRA parameters.
        dtype: Storage dtype of the LoRA tensors.
    """

    rank: int
    alpha: float
    target_modules: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    use_dora: bool = False
    targets_embeddings: bool = False
    use_rslora: bool = False
    num_parameters: int = 0
    dtype: str = "float32"

    def engine_problems(self, engine: str, max_rank: int | None = None) -> list[str]:
        """List the reasons ``engine`` cannot serve this adapter (empty if it can).

        Args:
            engine: Engine name (``peft``, ``vllm``, ``llamacpp``).
            max_rank: The engine's rank cap, when it has one.
        """
        problems: list[str] = []
        if engine in ("vllm", "llamacpp"):
            if self.modules_to_save:
                problems.append(f"modules_to_save={self.modules_to_save} is not supported")
            if self.use_dora:
                problems.append("DoRA adapters are not supported")
            if self.targets_embeddings:
                problems.append("LoRA on embed_tokens/lm_head is not supported")
        if max_rank is not None and self.rank > max_rank:
            problems.append(f"rank {self.rank} is over the engine's max_lora_rank {max_rank}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        """Build from `to_dict` output, ignoring unknown keys."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class AdapterManifest:
    """The record of how an adapter was made, written beside its weights by `train`.

    Adapters made elsewhere (a plain PEFT folder) have no manifest; the hub then records only
    what it can inspect. Sections are plain dicts so that train can grow them without breaking
    readers; the keys listed are the ones other packages rely on.

    Attributes:
        base: ``{"name", "fingerprint", "source"}`` of the base model trained on.
        method: ``sft`` or ``dpo``.
        data: ``{"source", "sha256", "format", "rows_in", "rows_kept", "splits": {...},
            "dropped": {...}, "pii": {...}}``.
        hyperparameters: Every recipe field used for the run.
        quantization: ``{"load_in_4bit", "quant_type", "double_quant", "compute_dtype"}``.
        compute: ``{"device", "wall_time_s", "tokens_seen", "estimated_flops", "torch_threads"}``.
        intended_use: Recipe text (modelcards requires it).
        out_of_scope_use: Recipe text.
        license: SPDX id of the adapter's licence.
        parent: ``NAME@V`` of the adapter this one was trained from (DPO on SFT), if any.
        extra: Free-form fields (recipe card fields, eval prompts...).
    """

    base: dict[str, Any]
    method: str = "sft"
    data: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)
    intended_use: str = ""
    out_of_scope_use: str = ""
    license: str = ""
    parent: str | None = None
    created_at: str = ""
    loradock_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = MANIFEST_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterManifest:
        """Build from a dict, keeping unknown top-level keys under ``extra``."""
        if not isinstance(data, dict) or "base" not in data:
            raise InvalidInput(
                "Manifest has no 'base' section",
                fix=f"Regenerate {MANIFEST_FILE} with `loradock train`, or delete it.",
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = {k: v for k, v in data.items() if k not in cls.__dataclass_fields__}
        manifest = cls(**known)
        manifest.extra.update(unknown)
        return manifest

    def write(self, folder: Path) -> Path:
        """Write the manifest as ``folder/loradock.json`` and return its path."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> AdapterManifest | None:
        """Read ``folder/loradock.json``; None if the folder has no manifest.

        Raises:
            InvalidInput: If the file exists but is not a valid manifest.
        """
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInput(
                f"Cannot read manifest {path}: {exc}",
                fix=f"Regenerate it with `loradock train`, or delete {MANIFEST_FILE}.",
            ) from exc
        return cls.from_dict(data)
