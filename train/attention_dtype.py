"""Attention in float32 under bf16 autocast, where this CPU runs it faster that way.

Under bf16 autocast torch runs ``scaled_dot_product_attention`` in bf16. On the AVX512-BF16 CPU
of this project its backward at training shapes (batch 8, ~64 tokens, head_dim 64) took ~26 ms
a layer against ~5 ms in float32: a fifth of a SmolLM2 training step, while the bf16
projections around it ran ~3x faster than float32. Which is faster depends on the CPU (AMX,
sequence length), so `train.dtype_choice` times both at the run's shapes and records the
result as ``attention``; `use_float32_attention` applies a float32 choice.

It registers transformers' own SDPA attention and mask functions under one more name,
``loradock_sdpa_fp32``, with q, k and v cast to float32 and autocast off inside, the output
cast back; the mask (padding, packed rows' block-diagonal causal mask) is built exactly as for
``sdpa``. Saved activations grow by the float32 copies of q, k and v (~100 MB on the demo).

Where the job ends: this module switches the attention's dtype; measuring is `train.dtype_choice`.
"""

from __future__ import annotations

from typing import Any

NAME = "loradock_sdpa_fp32"


def _fp32_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
               **kwargs: Any) -> tuple[Any, Any]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                              attention_mask, **kwargs)
    return out.to(query.dtype), weights


def register() -> str:
    """Register the float32 SDPA attention and its mask with transformers; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _fp32_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_float32_attention(model: Any) -> bool:
    """Switch ``model`` (an HF model using ``sdpa``) to float32 SDPA; False if it uses another.

    Returns:
        Whether it was switched.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = register()
    return True
