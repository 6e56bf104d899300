"""LoRA dropout that keeps a one-byte mask for the backward pass instead of a full float copy.

PEFT puts an ``nn.Dropout`` in front of every LoRA ``A`` matrix. On CPU, torch's dropout keeps
its mask for the backward pass as a tensor of the input's dtype: with ``all-linear`` targets that
is seven masks per decoder layer, each the size of the layer's input. On SmolLM2-135M in a batch
of 8 x 67 tokens that was ~320 MB of float32 masks held from the forward pass to the backward
pass, more than all the LoRA weights, gradients and optimizer states together.

`LeanDropout` computes the same inverted dropout (each element kept with probability ``1 - p``
and scaled by ``1 / (1 - p)``; the identity in eval mode) but saves the mask as ``torch.bool``,
a quarter of float32's memory. `use_lean_dropout` swaps it in for every LoRA dropout of a PEFT
model; dropout has no weights, so the adapter files are unchanged.

Where the job ends: this module changes how the mask is stored, not the method; LoRA itself is
PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch


class _MaskedScale(torch.autograd.Function):
    """``x * mask / (1 - p)`` with the mask saved as booleans."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:  # noqa: D102
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class LeanDropout(torch.nn.Module):
    """Inverted dropout with a boolean mask (a drop-in for ``nn.Dropout`` in LoRA layers)."""

    def __init__(self, p: float) -> None:
        """Drop each element with probability ``p`` (0 <= p < 1) in training mode."""
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply dropout in training mode with grad enabled; the identity otherwise."""
        if not self.training or self.p == 0.0:
            return x
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.nn.functional.dropout(x, self.p, training=True)
        return _MaskedScale.apply(x, self.p)

    def extra_repr(self) -> str:  # noqa: D102
        return f"p={self.p}"


def use_lean_dropout(model: torch.nn.Module) -> int:
    """Replace each LoRA layer's ``nn.Dropout`` with `LeanDropout` of the same ``p``.

    Returns:
        How many were replaced.
    """
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                fresh = LeanDropout(dropout.p)
                fresh.train(dropout.training)
                dropouts[name] = fresh
                replaced += 1
    return replaced
