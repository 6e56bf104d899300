"""Evaluation under each family's chat format: what is scored, and where generation stops.

The tokenizers are SmolLM2's under each family's special tokens and template
(`tests.tiny_models.write_chat_format`); no model is needed. The answer's tokens and the turn's
end token are scored (Gemma's ``<end_of_turn>`` and Phi-3's ``<|end|>`` are not the tokenizer's
``eos_token``), and greedy evaluation stops at that end-of-turn token, which the base's
``generation_config.json`` lists, as the instruct checkpoints do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import CHAT_FORMATS, write_chat_format
from train.eval.generate import stop_token_ids
from train.eval.scoring import encode_conversation

TURN_END = {"llama": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>",
            "qwen3": "<|im_end|>", "gemma2": "<end_of_turn>", "gemma3_text": "<end_of_turn>",
            "phi3": "<|end|>"}


@pytest.mark.parametrize("family", list(CHAT_FORMATS))
def test_the_answer_and_its_turn_end_are_scored_and_generation_stops_there(family, tmp_path,
                                                                          base_info):
    from transformers import AutoTokenizer

    write_chat_format(tmp_path, Path(base_info.path), CHAT_FORMATS[family])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello you"}]
    encoded = encode_conversation(tokenizer, messages)
    scored = tokenizer.decode([t for t, s in zip(encoded.ids, encoded.scored, strict=True) if s])
    assert scored.endswith("Hello you" + TURN_END[family]) and "Hi there" not in scored
    end = tokenizer.convert_tokens_to_ids(TURN_END[family])
    assert end in stop_token_ids(tmp_path, tokenizer)
