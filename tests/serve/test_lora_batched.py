"""The batched multi-LoRA op against a one-row-at-a-time reference (table-driven, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from serve.runtime.adapter_files import module_scaling
from serve.runtime.lora import LORA_KERNELS, AdapterWeights, LoraStack, reference_delta

SHAPES = {"q_proj": (24, 24), "v_proj": (24, 8), "down_proj": (40, 24)}


def _adapter(seed: int, rank: int, leaves: tuple[str, ...], layers: int = 2) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for leaf in leaves:
            in_f, out_f = SHAPES[leaf]
            modules[(layer, leaf)] = (torch.randn(rank, in_f, generator=gen),
                                      torch.randn(rank, out_f, generator=gen))
    return AdapterWeights(modules=modules, rank=rank)


# (ranks of the adapters in slots 0.., rows' slot (-1: base), slots left empty)
CASES = [
    ("one adapter, all rows", [8], [0, 0, 0], ()),
    ("one adapter and base rows", [8], [-1, 0, -1, 0], ()),
    ("two ranks padded", [4, 16], [1, 0, 1, 0, 0], ()),
    ("three adapters, mixed ranks", [8, 2, 8], [2, 0, 1, -1, 2, 1], ()),
    ("only base rows", [8], [-1, -1], ()),
    ("gap in the used slot range", [8, 4, 8], [0, 2, 2, 0], ()),
    ("single row", [16], [0], ()),
    ("evicted slot inside the range", [8, 8, 8], [0, 2, 0], (1,)),
]


@pytest.mark.parametrize("kernel", LORA_KERNELS)
@pytest.mark.parametrize(("label", "ranks", "row_slots", "cleared"), CASES,
                         ids=[c[0] for c in CASES])
def test_batched_delta_matches_per_row_reference(kernel, label, ranks, row_slots, cleared):
    leaves_by_slot = [("q_proj", "v_proj", "down_proj"), ("q_proj",), ("v_proj", "down_proj")]
    adapters = [_adapter(10 + i, r, leaves_by_slot[i % 3]) for i, r in enumerate(ranks)]
    stack = LoraStack(SHAPES, num_slots=len(ranks) + 1, dtype=torch.float32, kernel=kernel)
    for slot, adapter in enumerate(adapters):
        stack.install(slot, adapter)
    for slot in cleared:
        stack.clear(slot)
    assert stack.rank == max(ranks)
    plan = stack.plan(row_slots)
    gen = torch.Generator().manual_seed(0)
    for key in [(layer, leaf) for layer in range(2) for leaf in SHAPES]:
        in_f, out_f = SHAPES[key[1]]
        x = torch.randn(len(row_slots), in_f, generator=gen)
        base_out = torch.randn(len(row_slots), out_f, generator=gen)
        out = base_out.clone()
        stack.apply(key, x, out, plan)
        rows = [adapters[s] if s >= 0 and s not in cleared else None for s in row_slots]
        want = base_out + reference_delta(x, rows, key, out_f)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"{label} {key}")


def test_untargeted_modules_get_no_delta_and_clear_frees_the_slot():
    stack = LoraStack(SHAPES, num_slots=2, dtype=torch.float32)
    stack.install(0, _adapter(1, 4, ("q_proj",)))
    plan = stack.plan([0, 0])
    assert stack.targeted((0, "q_proj"), plan)
    assert not stack.targeted((0, "v_proj"), plan)
    x, out = torch.randn(2, 24), torch.zeros(2, 8)
    stack.apply((0, "v_proj"), x, out, plan)
    assert torch.count_nonzero(out) == 0
    generation = stack.generation
    stack.clear(0)
    assert stack.generation > generation
    assert not stack.targeted((0, "q_proj"), stack.plan([0, 0]))


def test_rank_growth_keeps_installed_adapters():
    stack = LoraStack(SHAPES, num_slots=2, dtype=torch.float32)
    small, big = _adapter(1, 2, ("q_proj",)), _adapter(2, 8, ("q_proj",))
    stack.install(0, small)
    stack.install(1, big)
    x = torch.randn(3, 24)
    out = torch.zeros(3, 24)
    stack.apply((0, "q_proj"), x, out, stack.plan([0, 1, -1]))
    want = reference_delta(x, [small, big, None], (0, "q_proj"), 24)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


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
