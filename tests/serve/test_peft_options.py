"""The peft engine's options: every problem reported at once, choices from their types."""

from __future__ import annotations

import pytest

from hub.errors import InvalidInput
from serve.engines.peft import PeftOptions


def test_defaults_parse():
    opts = PeftOptions.parse({})
    assert (opts.lora_kernel, opts.attention_kernel, opts.compute_dtype) == ("auto", "auto",
                                                                            "auto")


@pytest.mark.parametrize(("options", "says"), [
    ({"lora_kernel": "cuda"}, "lora_kernel must be auto, native or torch, got 'cuda'"),
    ({"attention_kernel": "flash"}, "attention_kernel must be auto, native or sdpa"),
    ({"compute_dtype": "fp16"}, "compute_dtype must be auto, fp32 or bf16, got 'fp16'"),
    ({"lora_dtype": "bf16"}, "lora_dtype must be auto, compute or fp32"),
    ({"prefill_chunk": 4}, "prefill_chunk must be an int >= 16"),
    ({"no_such": 1}, "unknown option 'no_such'"),
])
def test_bad_options_name_the_value_and_the_choices(options, says):
    with pytest.raises(InvalidInput) as caught:
        PeftOptions.parse(options)
    assert says in str(caught.value)
    assert "Known options:" in caught.value.fix


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidInput) as caught:
        PeftOptions.parse({"lora_kernel": "x", "attention_kernel": "y", "prefix_block": 0})
    text = str(caught.value)
    assert "lora_kernel" in text and "attention_kernel" in text and "prefix_block" in text
