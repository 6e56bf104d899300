"""Under bf16 autocast, let the 4-bit base layers return bf16 like any autocast linear layer.

`train.quant` keeps the base's norms and embeddings in float32 (PEFT's
``prepare_model_for_kbit_training``), so the residual stream is float32. A bitsandbytes
``Linear4bit`` casts its input to the compute dtype, multiplies, and casts the result back to
the input's dtype. With bfloat16 compute under autocast that has two costs an ordinary
``nn.Linear`` under autocast does not have:

- every 4-bit projection's output is widened to float32, so the MLP's gate/up products, its
  activation and the attention inputs are held for the backward pass in float32 (on
  SmolLM2-135M in a batch of 8 x 67 tokens: ~280 MB of the ~760 MB saved per step);
- q, k and v (and gate and up) each make their own bf16 copy of the same input, and each copy is
  saved for the backward pass.

`autocast_4bit_outputs` gives each ``Linear4bit`` a forward that, when autocast runs in the
layer's compute dtype, returns the product in that dtype (what autocast gives an ``nn.Linear``)
and reuses one bf16 copy of an input shared by consecutive projections. Outside autocast, or in
another dtype, the bitsandbytes forward runs unchanged. The weights, their 4-bit values and the
matmul are bitsandbytes' own.

Where the job ends: this module changes the dtype of activations under autocast; choosing the
compute dtype is `train.dtype_choice`'s.
"""

from __future__ import annotations

import types
from typing import Any


class _SharedCast:
    """The last input cast to the compute dtype, reused while the same tensor comes back."""

    def __init__(self) -> None:
        self.source: Any = None
        self.version = -1
        self.cast: Any = None

    def get(self, x: Any, dtype: Any) -> Any:
        if x.dtype == dtype:
            return x
        if self.source is x and self.version == x._version and self.cast.dtype == dtype:
            return self.cast
        self.source, self.version, self.cast = x, x._version, x.to(dtype)
        return self.cast

    def clear(self) -> None:
        self.source = self.cast = None


def autocast_4bit_outputs(model: Any) -> int:
    """Give every bitsandbytes ``Linear4bit`` of ``model`` the autocast-aware forward.

    Returns:
        How many layers got it (0 without bitsandbytes).
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    except ImportError:
        return 0
    import torch

    shared = _SharedCast()

    def forward(self: Any, x: Any) -> Any:
        device = x.device.type
        if (not self.training or self.compute_dtype is None
                or not torch.is_autocast_enabled(device)
                or torch.get_autocast_dtype(device) != self.compute_dtype):
            shared.clear()
            return type(self).forward(self, x)
        fix_4bit_weight_quant_state_from_module(self)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return bnb.matmul_4bit(shared.get(x, self.compute_dtype), self.weight, bias=bias,
                               quant_state=self.weight.quant_state)

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count
