"""Jinja chat templates -> Ollama Go templates: the four families render byte-identically.

The Jinja templates below are written here from each family's public prompt format (tokenizer
configs built in the test); conversations are rendered with Jinja exactly as transformers does and
with our Go renderer on the translation, with the values Ollama passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from export.gotemplate import render as render_go
from export.templates import detect_family, ollama_values, render_chat, translate
from hub.errors import Unsupported
from tests.chat_formats import (
    CHATML,
    GEMMA,
    GEMMA2,
    GEMMA_NO_SYSTEM,
    LLAMA3,
    MISTRAL_FIRST,
    MISTRAL_LAST,
    PHI3,
    PHI3_NO_SYSTEM,
    QWEN2,
    QWEN3,
)

# Tokenizer configs as the families ship them (the parts templates read).
CONFIGS = {
    "chatml": {"chat_template": CHATML, "bos_token": "", "eos_token": "<|im_end|>",
               "add_bos_token": False},
    "llama3": {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "add_bos_token": True},
    "mistral-first": {"chat_template": MISTRAL_FIRST, "bos_token": "<s>", "eos_token": "</s>",
                      "add_bos_token": True},
    "mistral-last": {"chat_template": MISTRAL_LAST, "bos_token": "<s>", "eos_token": "</s>",
                     "add_bos_token": False},
    "gemma": {"chat_template": GEMMA, "bos_token": "<bos>", "eos_token": "<eos>",
              "add_bos_token": True},
    "gemma-no-system": {"chat_template": GEMMA_NO_SYSTEM, "bos_token": "<bos>",
                        "eos_token": "<eos>", "add_bos_token": True},
    "phi3": {"chat_template": PHI3, "bos_token": "<s>", "eos_token": "<|endoftext|>",
             "add_bos_token": False},
    "phi3-no-system": {"chat_template": PHI3_NO_SYSTEM, "bos_token": "<s>",
                       "eos_token": "<|endoftext|>", "add_bos_token": True},
    "qwen2": {"chat_template": QWEN2, "bos_token": "", "eos_token": "<|im_end|>",
              "add_bos_token": False},
    "gemma2": {"chat_template": GEMMA2, "bos_token": "<bos>", "eos_token": "<eos>",
               "add_bos_token": True},
    "qwen3": {"chat_template": QWEN3, "bos_token": "", "eos_token": "<|im_end|>",
              "add_bos_token": False},
}
FAMILY = {"chatml": "chatml", "llama3": "llama3", "mistral-first": "mistral",
          "mistral-last": "mistral", "gemma": "gemma", "gemma-no-system": "gemma",
          "phi3": "phi3", "phi3-no-system": "phi3", "qwen2": "chatml", "gemma2": "gemma",
          "qwen3": "chatml"}

SYSTEM = {"role": "system", "content": "You answer in French.\nKeep it short."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 2?"}],
    "system": [SYSTEM, {"role": "user", "content": "Name a colour."}],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Write 'ok' twice:\nok ok?"},
    ],
    "system-multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "Ça va ? {{ not a template }}"},
    ],
    "closed": [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
    ],
    "system-closed": [
        SYSTEM,
        {"role": "user", "content": "Say no."},
        {"role": "assistant", "content": "non"},
    ],
}


def _translate(config: dict):
    return translate(config["chat_template"], bos_token=config["bos_token"],
                     eos_token=config["eos_token"], add_bos=config["add_bos_token"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_family_is_recognised(name: str) -> None:
    assert detect_family(CONFIGS[name]["chat_template"]) == FAMILY[name]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_go_translation_renders_like_jinja(name: str, conversation: str) -> None:
    config = CONFIGS[name]
    translation = _translate(config)
    messages = CONVERSATIONS[conversation]
    if messages[0]["role"] == "system" and not translation.supports_system:
        pytest.skip("this template refuses system messages")
    add_generation_prompt = messages[-1]["role"] != "assistant"
    jinja = render_chat(config["chat_template"], messages,
                        add_generation_prompt=add_generation_prompt,
                        bos_token=config["bos_token"], eos_token=config["eos_token"])
    go = render_go(translation.go_template, ollama_values(messages))
    assert translation.bos_prefix + go == jinja


def test_generation_prompt_only_after_a_user_turn() -> None:
    translation = _translate(CONFIGS["chatml"])
    open_turn = render_go(translation.go_template, ollama_values(CONVERSATIONS["single"]))
    closed = render_go(translation.go_template, ollama_values(CONVERSATIONS["closed"]))
    assert open_turn.endswith("<|im_start|>assistant\n")
    assert closed.endswith("yes<|im_end|>\n")


def test_smollm2_template_keeps_its_default_system_prompt(base_info) -> None:
    from transformers import AutoTokenizer

    template = (Path(base_info.path) / "chat_template.jinja").read_text()
    translation = translate(template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert translation.family == "chatml"
    assert "SmolLM" in (translation.default_system or "")
    assert translation.stops == ["<|im_start|>", "<|im_end|>"]
    tokenizer = AutoTokenizer.from_pretrained(base_info.path)
    for messages in CONVERSATIONS.values():
        gen = messages[-1]["role"] != "assistant"
        hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert render_go(translation.go_template, ollama_values(messages)) == hf


def test_llama3_bos_is_left_to_the_runtime_and_trim_is_noted() -> None:
    translation = _translate(CONFIGS["llama3"])
    assert translation.bos_prefix == "<|begin_of_text|>"
    assert "<|begin_of_text|>" not in translation.go_template
    assert any("trims" in note for note in translation.notes)
    kept = translate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                     add_bos=False)
    assert kept.go_template.startswith("<|begin_of_text|>") and kept.bos_prefix == ""


def test_mistral_system_placement_is_probed() -> None:
    first = _translate(CONFIGS["mistral-first"])
    last = _translate(CONFIGS["mistral-last"])
    assert first.go_template != last.go_template
    assert "</s>" in first.stops and "[INST]" in last.stops


def test_template_without_system_support_is_flagged() -> None:
    translation = _translate(CONFIGS["gemma-no-system"])
    assert translation.supports_system is False
    assert translation.checked >= 4


def test_unknown_family_is_refused() -> None:
    alpaca = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(Unsupported, match="not one loradock can translate"):
        translate(alpaca)


def test_a_family_variant_that_renders_differently_is_refused() -> None:
    odd = CHATML.replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '\\n\\n'")
    with pytest.raises(Unsupported, match="renders differently"):
        translate(odd)


def test_ollama_values_collate_like_ollama() -> None:
    values = ollama_values([
        {"role": "system", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "user", "content": "c"},
    ])
    assert values["System"] == "a"
    assert [m["Content"] for m in values["Messages"]] == ["a", "b\n\nc"]
