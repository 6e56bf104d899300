"""Fused decoder weights built once at load: four projections per layer, whatever the family.

From a loaded transformers model and its `serve.runtime.families.FamilySpec`, each layer gets
``qkv`` (q|k|v rows stacked), ``o``, ``gate_up`` (gate|up rows stacked) and ``down``, each one
matmul per step (vLLM's ``stacked_params_mapping`` idea, done at load), plus its norm weights with
the family's offset folded in (Gemma's ``1 + w``), the q/k head norms, its attention scaling,
soft-cap and sliding window.

RoPE in one layout: the query and key rows of each head are permuted at load so that the pairs
RoPE rotates together are adjacent (``x[i]`` and ``x[i + rot/2]`` become ``2i`` and ``2i + 1``;
pass-through dims of a partial rotary stay in place). Attention scores are dot products over
the head dim, so the same permutation of q and k changes nothing, and RoPE becomes
``x * cos + swap_pairs(x) * sin``. LoRA B matrices of q and k are permuted the same way
(`ModelWeights.permute_out`). ``v`` is never permuted, so outputs are unchanged.

Projections are dense tensors for dense and ``nf4-dense`` bases, run by ``F.linear`` or, where
`serve.runtime.dtype_choice` measured it faster on this CPU, by oneDNN on a weight reordered
once into its blocked layout (`Projection.pack`; what Inductor's weight freezing emits for CPU
linears): in bf16 the same numbers as ``F.linear`` (oneDNN both ways) and 1.5-1.9x faster at
decode batches on an AVX512-BF16 machine; in fp32 equal up to summation-order rounding (MKL
behind ``F.linear``). A bitsandbytes ``nf4`` base keeps its 4-bit modules: the projection calls
them and concatenates (and permutes q/k columns) instead.

Where the job ends: this module only builds tensors; the forward is `serve.runtime.runner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.runtime.families import FamilySpec

if TYPE_CHECKING:
    import torch

    from serve.runtime.nf4_kernel import Nf4Linear

PROJECTIONS = ("qkv", "o", "gate_up", "down")


def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` reordered for oneDNN's linear (None where this torch build has no oneDNN)."""
    import torch

    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    except (RuntimeError, AttributeError):
        return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  ) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a weight packed by `onednn_pack`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Projection:
    """One fused linear layer: dense ``weight`` (+ ``bias``), or 4-bit modules concatenated."""

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 modules: list[Any] | None = None, out_index: torch.Tensor | None = None,
                 ) -> None:
        """Wrap a dense weight, or modules whose outputs are concatenated (then permuted)."""
        self.weight, self.bias, self.modules, self.out_index = weight, bias, modules, out_index
        self.packed: torch.Tensor | None = None
        # 4-bit codes of an nf4-dense weight (`serve.runtime.nf4_kernel`), used for passes of
        # up to ``small_rows`` rows (0: never; set by the runner after timing it).
        self.small: Nf4Linear | None = None
        self.small_rows = 0

    def pack(self) -> bool:
        """Replace the dense weight by its oneDNN layout (held once); False if not possible."""
        if self.weight is None:
            return False
        packed = onednn_pack(self.weight)
        if packed is None:
            return False
        self.packed, self.weight = packed, None
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.small_rows:
            return self.small(x, self.bias)
        return self.dense(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The projection by its dense weight (or its 4-bit modules), whatever the rows."""
        import torch
        import torch.nn.functional as F

        if self.packed is not None:
            return onednn_linear(x, self.packed, self.bias)
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        outs = [m(x) for m in self.modules]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out if self.out_index is None else out.index_select(-1, self.out_index)


@dataclass
class LayerWeights:
    """Everything one decoder layer needs at run time."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    act: Any
    attn_in: torch.Tensor
    mlp_in: torch.Tensor
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    scaling: float = 1.0
    softcap: float | None = None
    window: int | None = None
    rope: str = "default"


@dataclass
class ModelWeights:
    """The fused layers and the facts about their shapes.

    Attributes:
        layers: One `LayerWeights` per decoder layer.
        heads / kv_heads / head_dim: Attention geometry.
        eps: RMSNorm epsilon.
        parts: ``{projection: [(offset, size), ...]}``: where each fused part's rows are.
        in_features: ``{projection: in_features}``.
        qk_perm: Row permutation applied to q|k rows of ``qkv`` (index into the original order).
        rope_types: Layer types with their own RoPE tables (``["default"]`` for most families).
    """

    layers: list[LayerWeights]
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    eps: float
    parts: dict[str, list[tuple[int, int]]]
    in_features: dict[str, int]
    qk_perm: torch.Tensor
    rope_types: list[str] = field(default_factory=lambda: ["default"])

    def permute_out(self, projection: str, part: int, bt: torch.Tensor) -> torch.Tensor:
        """Reorder the columns of a LoRA ``B^T`` (``[r, size]``) as the fused rows were."""
        if projection != "qkv":
            return bt
        offset, size = self.parts["qkv"][part]
        qk = self.qk_perm.numel()
        if offset >= qk:  # v rows: never permuted
            return bt
        perm = self.qk_perm[offset:offset + size] - offset
        if offset + size > qk:  # phi3: one part holds q|k|v
            import torch

            perm = torch.cat([self.qk_perm - offset,
                              torch.arange(qk, offset + size, dtype=perm.dtype)])
        return bt.index_select(1, perm)


def head_perm(head_dim: int, rotary_dim: int) -> list[int]:
    """Original dim index of each position in the pair-adjacent RoPE layout of one head."""
    half = rotary_dim // 2
    return [i // 2 + (i % 2) * half for i in range(rotary_dim)] + list(range(rotary_dim,
                                                                             head_dim))


def _norm_eps(module: Any) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return 1e-6


def build_weights(model: Any, spec: FamilySpec, dtype: torch.dtype, rotary_dim: int,
                  nf4: bool = False) -> ModelWeights:
    """Fuse ``model``'s decoder layers into `ModelWeights` in ``dtype`` (see the module doc).

    With ``nf4`` (an nf4-dense base), each fused weight also gets its 4-bit codes
    (`serve.runtime.nf4_kernel.pack_nf4`, None where they cannot be had), packed from the fp32
    values before they are rounded to ``dtype``.

    The transformers layers are dropped afterwards (``model.model.layers``), so the weights are
    held once.
    """
    import torch

    config = model.config
    inner = model.model
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    one = head_perm(head_dim, rotary_dim)
    qk_perm = torch.tensor([h * head_dim + j for h in range(heads + kv_heads) for j in one])
    layers = []
    first = inner.layers[0]
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            qkv=_fuse([getattr(attn, leaf) for leaf in spec.qkv], dtype, nf4, qk_perm),
            o=_fuse([attn.o_proj], dtype, nf4),
            gate_up=_fuse([getattr(mlp, leaf) for leaf in spec.gate_up], dtype, nf4),
            down=_fuse([mlp.down_proj], dtype, nf4),
            act=getattr(mlp, spec.act_attr),
            attn_in=_norm(layer, spec.attn_in_norm, spec, dtype),
            mlp_in=_norm(layer, spec.mlp_in_norm, spec, dtype),
            attn_out=_norm(layer, spec.attn_out_norm, spec, dtype),
            mlp_out=_norm(layer, spec.mlp_out_norm, spec, dtype),
            q_norm=_head_norm(attn, "q_norm", spec, dtype, one),
            k_norm=_head_norm(attn, "k_norm", spec, dtype, one),
            scaling=float(getattr(attn, "scaling", head_dim ** -0.5)),
            softcap=getattr(attn, "attn_logit_softcapping", None),
            window=getattr(attn, "sliding_window", getattr(config, "sliding_window", None)),
            rope=(attn.layer_type if spec.rope_per_layer_type else "default"),
        ))
    q, kv = heads * head_dim, kv_heads * head_dim
    inter = int(first.mlp.down_proj.in_features)
    hidden = int(config.hidden_size)
    qkv_parts = [(0, q), (q, kv), (q + kv, kv)] if len(spec.qkv) == 3 else [(0, q + 2 * kv)]
    gate_up_parts = [(0, inter), (inter, inter)] if len(spec.gate_up) == 2 else [(0, 2 * inter)]
    weights = ModelWeights(
        layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        rotary_dim=rotary_dim, eps=_norm_eps(first.input_layernorm),
        parts={"qkv": qkv_parts, "o": [(0, hidden)], "gate_up": gate_up_parts,
               "down": [(0, hidden)]},
        in_features={"qkv": hidden, "o": q, "gate_up": hidden, "down": inter},
        qk_perm=qk_perm,
        rope_types=sorted({layer.rope for layer in layers}),
    )
    inner.layers = torch.nn.ModuleList()  # the fused copies above are the only ones kept
    return weights


def _fuse(modules: list[Any], dtype: torch.dtype, nf4: bool = False,
          qk_perm: torch.Tensor | None = None) -> Projection:
    """Stack the rows of ``modules`` (then permute the q|k rows) into one projection."""
    import torch

    if not all(type(m) is torch.nn.Linear for m in modules):  # bitsandbytes 4-bit modules
        out_index = None
        if qk_perm is not None:
            total = sum(int(m.out_features) for m in modules)
            out_index = torch.cat([qk_perm, torch.arange(qk_perm.numel(), total)])
        return Projection(modules=modules, out_index=out_index)
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None
                          else torch.zeros(m.out_features, dtype=m.weight.dtype)
                          for m, b in zip(modules, biases, strict=True)])
    if qk_perm is not None:
        order = torch.cat([qk_perm, torch.arange(qk_perm.numel(), weight.shape[0])])
        weight = weight.index_select(0, order)
        bias = None if bias is None else bias.index_select(0, order)
    projection = Projection(weight.to(dtype).contiguous(),
                            None if bias is None else bias.to(dtype).contiguous())
    if nf4:
        from serve.runtime.nf4_kernel import pack_nf4

        projection.small = pack_nf4(weight.contiguous(), dtype)
    return projection


def _norm(layer: Any, name: str | None, spec: FamilySpec, dtype: torch.dtype,
          ) -> torch.Tensor | None:
    if name is None:
        return None
    weight = getattr(layer, name).weight.detach().float() + spec.norm_offset
    return weight.to(dtype).contiguous()


def _head_norm(attn: Any, name: str, spec: FamilySpec, dtype: torch.dtype, perm: list[int],
               ) -> torch.Tensor | None:
    if not spec.qk_norm:
        return None
    weight = getattr(attn, name).weight.detach().float() + spec.norm_offset
    return weight[perm].to(dtype).contiguous()
