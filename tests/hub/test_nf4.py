"""`hub.nf4` on the real SmolLM2: 4-bit values in dense layers, and pinned 4-bit numerics."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.nf4 import bnb_4bit_config, dense_nf4_model, pin_training_numerics

IDS = [[1, 504, 3251, 314, 253, 1345, 28, 2]]


@pytest.fixture(scope="module")
def four_bit(base_info):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base_info.path, quantization_config=bnb_4bit_config("nf4", True, "float32"),
        device_map={"": "cpu"})
    return model.eval()


def test_inference_on_pinned_4bit_layers_keeps_the_training_scales_and_equals_dense(
        four_bit, base_info):
    """Eval-mode forwards must not rewrite the block scales (bitsandbytes does on AVX512-BF16)."""
    import bitsandbytes as bnb
    import torch

    layers = [m for m in four_bit.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert pin_training_numerics(four_bit) == len(layers) == 30 * 7
    state = layers[0].weight.quant_state
    before = (state.absmax.clone(), layers[0].weight.data.clone())
    with torch.no_grad():
        got = four_bit(input_ids=torch.tensor(IDS)).logits
    state = layers[0].weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False)
    assert torch.equal(state.absmax, before[0]) and torch.equal(layers[0].weight.data, before[1])
    dense = dense_nf4_model(base_info.path)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    with torch.no_grad():
        assert torch.equal(dense(input_ids=torch.tensor(IDS)).logits, got)


def test_dense_nf4_values_differ_from_the_original_weights(base_info, base_model):
    import torch

    dense = dense_nf4_model(base_info.path)
    q_dense = dense.model.layers[0].self_attn.q_proj.weight
    q_orig = base_model.model.layers[0].self_attn.q_proj.weight
    assert q_dense.dtype == torch.float32 and q_dense.shape == q_orig.shape
    assert not torch.equal(q_dense, q_orig)
    # 4-bit rounding, not a different model: measured 11 % of the mean |weight| here (16 NF4
    # levels over a base that was already Q4_1 on another grid).
    assert (q_dense - q_orig).abs().mean() < 0.2 * q_orig.abs().mean()


@pytest.mark.parametrize("record, expected", [
    (None, None),
    ({}, None),
    ({"load_in_4bit": False, "quant_type": "nf4"}, None),
    ({"load_in_4bit": True}, {"quant_type": "nf4", "double_quant": True}),
    ({"load_in_4bit": True, "quant_type": "fp4", "double_quant": False,
      "compute_dtype": "float32"}, {"quant_type": "fp4", "double_quant": False}),
])
def test_one_reading_of_the_4bit_record_for_eval_export_and_drift(record, expected):
    """Eval, serving, the export merge and its drift reference read the record the same way."""
    from export.merge import LoadedAdapter, training_quantization, training_values
    from hub.nf4 import trained_4bit

    assert trained_4bit(record) == expected
    loaded = LoadedAdapter(None, None, "", Path("base"), Path("adapter"),
                           quantization=dict(record or {}))
    assert training_quantization(loaded)[0] == expected
    assert training_values(dict(record or {}), "auto") == expected
