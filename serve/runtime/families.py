"""What is special about each model family the peft engine serves: one small spec per family.

The runner (`serve.runtime.runner`) has one forward for every family; a `FamilySpec` says only
how a family differs from Llama, as transformers' ``modular_*.py`` files do (Qwen2 = Llama +
q/k/v bias, Qwen3 = Llama + q/k norm, Gemma 3 = Gemma 2 + q/k norm). Numbers that the loaded
modules already carry are read from them, not restated here: norm epsilons, the attention
``scaling`` (Gemma's ``query_pre_attn_scalar``), soft-capping values, each layer's sliding
window, biases, the activation, RoPE tables (from the model's own ``rotary_emb``, so every static
rope type of transformers works, including partial rotary dims).

- ``llama``, ``mistral``: the reference (Mistral's sliding window comes from its config).
- ``qwen2``: q/k/v biases (read from the modules).
- ``qwen3``: RMSNorm on each query and key head before RoPE.
- ``gemma2``: norms apply ``1 + w``; a norm after attention and around the MLP; scaled
  embeddings (done by its embedding module); attention and final-logit soft-capping; a sliding
  window on alternate layers.
- ``gemma3_text``: Gemma 2 plus q/k head norms and RoPE tables per layer type (local, global).
- ``phi3``: q/k/v and gate/up stored fused in the checkpoint (``qkv_proj``, ``gate_up_proj``).

Where the job ends: this module describes families and refuses unknown ones; building fused
weights from a loaded model is `serve.runtime.weights`, running them is the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hub.errors import Unsupported

# Rope types whose tables do not depend on the sequence length (``longrope`` is static while
# the context stays within ``original_max_position_embeddings``; `context_cap` enforces it).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class FamilySpec:
    """How one model family differs from Llama.

    Attributes:
        model_type: ``config.model_type``.
        qkv: Checkpoint leaves under ``self_attn`` fused, in order, into one q|k|v projection.
        gate_up: Checkpoint leaves under ``mlp`` fused, in order, into one gate|up projection.
        act_attr: Name of the MLP's activation module.
        qk_norm: RMSNorm over each query and key head (``q_norm``, ``k_norm``) before RoPE.
        norm_offset: Norms multiply by ``offset + weight`` (Gemma: 1).
        attn_in_norm: Norm before attention.
        attn_out_norm: Norm on the attention output before the residual add, if any.
        mlp_in_norm: Norm before the MLP.
        mlp_out_norm: Norm on the MLP output before the residual add, if any.
        rope_per_layer_type: ``rotary_emb`` takes the layer type (local/global tables).
        final_softcap_attr: Config attribute with the final-logit soft-cap, if the family has one.
    """

    model_type: str
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    act_attr: str = "act_fn"
    qk_norm: bool = False
    norm_offset: float = 0.0
    attn_in_norm: str = "input_layernorm"
    attn_out_norm: str | None = None
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    rope_per_layer_type: bool = False
    final_softcap_attr: str | None = None

    @property
    def lora_leaves(self) -> dict[str, tuple[str, int]]:
        """PEFT target leaf -> (fused projection, index of the part inside it)."""
        leaves = {leaf: ("qkv", i) for i, leaf in enumerate(self.qkv)}
        leaves.update({leaf: ("gate_up", i) for i, leaf in enumerate(self.gate_up)})
        leaves.update({"o_proj": ("o", 0), "down_proj": ("down", 0)})
        return leaves


LLAMA = FamilySpec("llama")
GEMMA2 = replace(
    LLAMA, model_type="gemma2", norm_offset=1.0, attn_out_norm="post_attention_layernorm",
    mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm",
    final_softcap_attr="final_logit_softcapping",
)
FAMILIES: dict[str, FamilySpec] = {
    "llama": LLAMA,
    "mistral": replace(LLAMA, model_type="mistral"),
    "qwen2": replace(LLAMA, model_type="qwen2"),
    "qwen3": replace(LLAMA, model_type="qwen3", qk_norm=True),
    "gemma2": GEMMA2,
    "gemma3_text": replace(GEMMA2, model_type="gemma3_text", qk_norm=True,
                           rope_per_layer_type=True),
    "phi3": replace(LLAMA, model_type="phi3", qkv=("qkv_proj",), gate_up=("gate_up_proj",),
                    act_attr="activation_fn"),
}
# Families other engines serve that this one does not (named in the refusal).
OTHER_ENGINES = "vllm (--engine vllm) or llama.cpp on a GGUF export (--engine llamacpp)"


def family_for(config: dict[str, Any]) -> FamilySpec:
    """The spec of ``config.json``'s ``model_type``, after checking its RoPE is static.

    Raises:
        Unsupported: A family not in `FAMILIES`, or a sequence-dependent rope type.
    """
    model_type = config.get("model_type", "")
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise Unsupported(
            f"The peft engine serves the families {', '.join(FAMILIES)}, not "
            f"model_type={model_type!r}",
            fix=f"Serve this base with {OTHER_ENGINES}.",
            param="base",
        )
    for rope_type in rope_types(config):
        if rope_type not in STATIC_ROPE_TYPES:
            raise Unsupported(
                f"rope_type={rope_type!r} is not supported by the peft engine",
                fix=f"Use a base with one of {', '.join(STATIC_ROPE_TYPES)}, or {OTHER_ENGINES}.",
                param="base",
            )
    return spec


def rope_types(config: dict[str, Any]) -> list[str]:
    """Every rope type in ``config`` (Gemma 3 keeps one rope config per layer type)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    nested = [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
    blocks = nested or [rope]
    return [str(b.get("rope_type") or b.get("type") or "default") for b in blocks]


def context_cap(config: dict[str, Any]) -> int:
    """Longest context whose RoPE tables are static (``longrope``: the original context)."""
    context = int(config.get("max_position_embeddings") or 2048)
    if "longrope" in rope_types(config):
        context = min(context, int(config.get("original_max_position_embeddings") or context))
    return context
