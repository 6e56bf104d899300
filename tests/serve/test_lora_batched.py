"""The batched multi-LoRA op against a one-row-at-a-time reference (table-driven, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from serve.runtime import native
from serve.runtime.adapter_files import module_scaling
from serve.runtime.lora import AdapterWeights, LoraStack, reference_delta

# projection -> (in_features, [part sizes]): a fused 3-part projection, and two single ones.
SHAPES = {"qkv": (24, [24, 8, 8]), "o": (24, [24]), "down": (40, [24])}
KEYS = [(layer, name) for layer in range(2) for name in SHAPES]


def _offsets(name: str) -> list[int]:
    sizes = SHAPES[name][1]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _adapter(seed: int, rank: int, names: tuple[str, ...], layers: int = 2,
             shapes: dict | None = None) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for name in names:
            in_f, sizes = (shapes or SHAPES)[name]
            modules[(layer, name)] = (torch.randn(len(sizes) * rank, in_f, generator=gen),
                                      [torch.randn(rank, size, generator=gen) for size in sizes])
    return AdapterWeights(modules=modules, rank=rank)


# (ranks of the adapters installed in order, rows' adapter index (-1: base), indices evicted)
CASES = [
    ("one adapter, all rows", [8], [0, 0, 0], ()),
    ("one adapter and base rows", [8], [-1, 0, -1, 0], ()),
    ("two ranks, two pools", [4, 16], [1, 0, 1, 0, 0], ()),
    ("three adapters, mixed ranks", [8, 2, 8], [2, 0, 1, -1, 2, 1], ()),
    ("only base rows", [8], [-1, -1], ()),
    ("gap in the used indices", [8, 4, 8], [0, 2, 2, 0], ()),
    ("single row", [16], [0], ()),
    ("evicted adapter inside the range", [8, 8, 8], [0, 2, 0], (1,)),
    ("eight adapters, uneven segments", [8] * 8, [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 3, -1], ()),
    ("even segments and base rows", [8, 8], [0, 1, -1, 1, 0], ()),
    ("two pools, even segments", [4, 4, 8], [0, 1, 2, 1, 0, 2], ()),
]


def _kernel(kernel: str) -> str:
    if kernel == "native" and native.library() is None:
        pytest.skip("no C compiler here: the native kernel cannot be built")
    return kernel


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize(("label", "ranks", "row_adapters", "evicted"), CASES,
                         ids=[c[0] for c in CASES])
def test_batched_delta_matches_per_row_reference(label, ranks, row_adapters, evicted, kernel):
    names_by_index = [("qkv", "o", "down"), ("qkv",), ("o", "down")]
    adapters = [_adapter(10 + i, r, names_by_index[i % 3]) for i, r in enumerate(ranks)]
    stack = LoraStack(SHAPES, capacity=len(ranks), dtype=torch.float32, kernel=_kernel(kernel))
    assert stack.kernel == kernel
    slots = [stack.install(adapter) for adapter in adapters]
    for index in evicted:
        stack.clear(slots[index])
    row_slots = [slots[i] if i >= 0 else -1 for i in row_adapters]
    plan = stack.plan(row_slots)
    gen = torch.Generator().manual_seed(0)
    for key in KEYS:
        in_f, sizes = SHAPES[key[1]]
        x = torch.randn(len(row_slots), in_f, generator=gen)
        base_out = torch.randn(len(row_slots), sum(sizes), generator=gen)
        out = base_out.clone()
        stack.apply(key, x, out, plan, _offsets(key[1]))
        rows = [adapters[i] if i >= 0 and i not in evicted else None for i in row_adapters]
        want = base_out + reference_delta(x, rows, key, sum(sizes), _offsets(key[1]))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"{label} {key}")


# Wide enough for the kernel's full 64-column expand blocks and 16-column shrink chunks, with
# tails on both (parts * rank = 48 + 0, 24 + 8; sizes 136 = 2 * 64 + 8).
WIDE = {"qkv": (72, [136, 64, 64]), "down": (200, [136])}
# Rows' adapters (-1: base): blocks of 4 and 2 rows; a lone row (the one-row block) beside
# full blocks; a single stream.
WIDE_ROWS = ([0, 1, 2, 0, -1, 0, 0, 0, 0, 2, 1], [2, 0, -1, 0, 1, 0, 0, 2], [1])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("row_adapters", WIDE_ROWS, ids=["blocks", "lone-row", "single"])
def test_native_kernel_matches_reference_on_wide_shapes_in_both_dtypes(dtype, tol,
                                                                       row_adapters):
    _kernel("native")
    check_wide_native(dtype, tol, row_adapters)


def check_wide_native(dtype: torch.dtype, tol: float, row_adapters: list[int]) -> None:
    """The loaded native kernel on `WIDE` shapes against `reference_delta` (rows' adapters)."""
    ranks = [16, 8, 16]
    adapters = [_adapter(30 + i, r, tuple(WIDE), layers=1, shapes=WIDE)
                for i, r in enumerate(ranks)]
    stack = LoraStack(WIDE, capacity=3, dtype=dtype, kernel="native")
    slots = [stack.install(AdapterWeights({k: (a.to(dtype), [b.to(dtype) for b in bs])
                                           for k, (a, bs) in ad.modules.items()}, ad.rank))
             for ad in adapters]
    plan = stack.plan([slots[i] if i >= 0 else -1 for i in row_adapters])
    gen = torch.Generator().manual_seed(1)
    for name, (in_f, sizes) in WIDE.items():
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        x = torch.randn(len(row_adapters), in_f, generator=gen)
        base_out = torch.randn(len(row_adapters), sum(sizes), generator=gen)
        out = base_out.to(dtype, copy=True)
        stack.apply((0, name), x.to(dtype), out, plan, offsets)
        want = base_out + reference_delta(x, [adapters[i] if i >= 0 else None
                                              for i in row_adapters], (0, name), sum(sizes),
                                          offsets)
        scale = want.abs().max().item()
        torch.testing.assert_close(out.float() / scale, want / scale, rtol=0, atol=tol)


def test_each_adapter_keeps_its_own_rank_and_clear_frees_the_index():
    stack = LoraStack(SHAPES, capacity=2, dtype=torch.float32)
    small = stack.install(_adapter(1, 2, ("qkv",)))
    big = stack.install(_adapter(2, 16, ("qkv",)))
    assert sorted(stack.pools) == [2, 16]
    assert stack.pools[2].at[(0, "qkv")].shape == (2, 24, 3 * 2)  # rank 2, not padded to 16
    x, out = torch.randn(2, 24), torch.zeros(2, 24)
    stack.apply((0, "o"), x, out, stack.plan([small, big]), [0])  # "o" is not targeted
    assert torch.count_nonzero(out) == 0
    generation = stack.generation
    stack.clear(small)
    assert stack.generation > generation
    assert stack.has_room(2) and stack.pools[2].free == [0, 1]
    assert not stack.plan([-1, -1]).pools


SCALING_CASES = [
    ("plain", {"r": 8, "lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 8, 2.0),
    ("rslora", {"r": 16, "lora_alpha": 16, "use_rslora": True},
     "model.layers.0.mlp.up_proj", 16, 16 / math.sqrt(16)),
    ("alpha pattern", {"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 32}},
     "model.layers.3.self_attn.v_proj", 8, 4.0),
    ("alpha pattern other module", {"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 32}},
     "model.layers.3.self_attn.q_proj", 8, 2.0),
    ("rank pattern", {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}},
     "model.layers.1.self_attn.q_proj", 4, 4.0),
    ("layer-specific pattern", {"r": 8, "lora_alpha": 8,
                                "rank_pattern": {r"model.layers.1.self_attn.q_proj": 2}},
     "model.layers.1.self_attn.q_proj", 2, 4.0),
]


@pytest.mark.parametrize(("label", "config", "module", "rank", "want"), SCALING_CASES,
                         ids=[c[0] for c in SCALING_CASES])
def test_module_scaling_follows_peft(label, config, module, rank, want):
    assert module_scaling(config, module, rank) == pytest.approx(want)


def test_module_scaling_refuses_rank_mismatch():
    from hub.errors import Incompatible

    with pytest.raises(Incompatible):
        module_scaling({"r": 8, "lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 4)
