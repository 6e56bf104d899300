"""Tiny random-weight checkpoints of every family the peft engine serves, for tests.

Each is built with transformers' own config and model classes (so the checkpoint is exactly
what ``save_pretrained`` writes for that family), a few layers wide, with the embedded
SmolLM2's tokenizer under the family's own chat format (`CHAT_FORMATS`): the family's special
tokens put on SmolLM2's special-token ids, its bos/eos and turn-end tokens, and its chat
template written into ``tokenizer_config.json``, so training, serving and export meet the
family's real prompt format, not ChatML everywhere. Sliding windows are shorter than the test
prompts, so window masks matter; weights are drawn wider than transformers' default
(``initializer_range``) so greedy argmaxes are decided by clear margins, not by float rounding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chat_formats import GEMMA, GEMMA2, LLAMA3, MISTRAL_FIRST, PHI3, QWEN2, QWEN3

COMMON: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2, "initializer_range": 0.2,
}
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 12, "tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True, "use_sliding_window": False},
    "qwen3": {"tie_word_embeddings": True},
    "gemma2": {"sliding_window": 12, "query_pre_attn_scalar": 16, "initializer_range": 0.04,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "hidden_activation": "gelu_pytorch_tanh",
               "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {"sliding_window": 12, "query_pre_attn_scalar": 16,
                    "initializer_range": 0.04, "hidden_activation": "gelu_pytorch_tanh",
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"tie_word_embeddings": False, "partial_rotary_factor": 0.5},
}
# PEFT target modules of an all-linear adapter for each family.
ALL_LINEAR: dict[str, list[str]] = {
    family: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for family in FAMILY_CONFIGS
}
ALL_LINEAR["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@dataclass(frozen=True)
class ChatFormat:
    """A family's prompt format as its instruct checkpoints ship it.

    Attributes:
        template: The Jinja chat template (`tests.chat_formats`, written from the family's).
        tokens: The family's special tokens, put on SmolLM2's special ids (`ids`) in order.
        bos: ``bos_token`` ("" for none, as Qwen ships it).
        eos: ``eos_token``.
        stops: ``generation_config.json``'s ``eos_token_id`` tokens (the turn end included).
        license: The licence the family's instruct models are published under (card data).
        ids: The SmolLM2 special ids that take ``tokens`` (default 0, 1, 2, ...).
    """

    template: str
    tokens: tuple[str, ...]
    bos: str
    eos: str
    stops: tuple[str, ...]
    license: str
    ids: tuple[int, ...] = ()

    def token_ids(self) -> dict[str, int]:
        """Each special token's id."""
        return dict(zip(self.tokens, self.ids or range(len(self.tokens)), strict=True))


CHAT_FORMATS: dict[str, ChatFormat] = {
    "llama": ChatFormat(LLAMA3, ("<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>",
                                 "<|start_header_id|>", "<|end_header_id|>"),
                        "<|begin_of_text|>", "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>"),
                        # <|im_start|> (1) and <repo_name> (3) stay: loradock's own GGUF writer
                        # (the Llama path) knows SmolLM2's BPE by them (export.gguf_tokenizer).
                        "llama3.2", ids=(0, 2, 4, 5, 6)),
    "mistral": ChatFormat(MISTRAL_FIRST, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
                          "<s>", "</s>", ("</s>",), "apache-2.0"),
    "qwen2": ChatFormat(QWEN2, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "",
                        "<|im_end|>", ("<|endoftext|>", "<|im_end|>"), "apache-2.0"),
    "qwen3": ChatFormat(QWEN3, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                "</think>"), "", "<|im_end|>", ("<|endoftext|>", "<|im_end|>"),
                        "apache-2.0"),
    "gemma2": ChatFormat(GEMMA2, ("<pad>", "<bos>", "<eos>", "<start_of_turn>",
                                           "<end_of_turn>"),
                         "<bos>", "<eos>", ("<eos>", "<end_of_turn>"), "gemma"),
    "gemma3_text": ChatFormat(GEMMA, ("<pad>", "<bos>", "<eos>", "<start_of_turn>",
                                      "<end_of_turn>"),
                              "<bos>", "<eos>", ("<eos>", "<end_of_turn>"), "gemma"),
    "phi3": ChatFormat(PHI3, ("<unk>", "<s>", "<|endoftext|>", "<|end|>", "<|user|>",
                              "<|assistant|>", "<|system|>"),
                       "<s>", "<|endoftext|>", ("<|endoftext|>", "<|assistant|>", "<|end|>"),
                       "mit"),
}


def write_chat_format(out: Path, tokenizer_from: Path, chat: ChatFormat) -> dict[str, int]:
    """Write SmolLM2's tokenizer under ``chat``'s special tokens into ``out``; return their ids.

    The byte-level BPE (vocabulary, merges, pre-tokenizer) stays SmolLM2's; only the special
    tokens are renamed, in ``tokenizer.json``'s added tokens and vocabulary alike.
    """
    tokenizer = json.loads((Path(tokenizer_from) / "tokenizer.json").read_text())
    added = {t["id"]: t for t in tokenizer["added_tokens"]}
    vocab = tokenizer["model"]["vocab"]
    ids = chat.token_ids()
    for new, token_id in ids.items():
        token = added[token_id]
        vocab[new] = vocab.pop(token["content"])
        token["content"] = new
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = json.loads((Path(tokenizer_from) / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config.update(bos_token=chat.bos or None, eos_token=chat.eos, pad_token=chat.tokens[0],
                  unk_token=chat.tokens[0], chat_template=chat.template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    generation = {"bos_token_id": ids.get(chat.bos), "pad_token_id": ids[chat.tokens[0]],
                  "eos_token_id": [ids[t] for t in chat.stops]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return ids


def make_tiny_base(family: str, out: Path, tokenizer_from: Path, seed: int = 0,
                   **overrides: Any) -> Path:
    """Save a tiny random ``family`` checkpoint with the tokenizer of ``tokenizer_from``.

    The tokenizer carries the family's chat format (`CHAT_FORMATS`, `write_chat_format`);
    ``overrides`` replace config values (a value of None removes the key, so transformers'
    default applies).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    chat = CHAT_FORMATS[family]
    ids = chat.token_ids()
    specials = {"bos_token_id": ids.get(chat.bos), "eos_token_id": ids[chat.eos],
                "pad_token_id": ids[chat.tokens[0]]}
    values = {**COMMON, **specials, **FAMILY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(family, **{k: v for k, v in values.items() if v is not None})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from their init, so offsets (Gemma's 1 + w) matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape) * 0.1)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    assert write_chat_format(out, tokenizer_from, chat) == ids
    (out / "README.md").write_text(f"---\nlicense: {chat.license}\n---\n# tiny {family}\n")
    return out


def teach_tiny_base(path: Path, texts: list[str], steps: int = 60, lr: float = 3e-3) -> Path:
    """Fit the checkpoint at ``path`` on ``texts`` for a few full-weight steps, in place.

    Random weights give near-tied next-token logits over the 49k vocabulary, so any lossy format
    (q8_0, even f16) flips argmaxes by chance; a few steps on the texts that will be asked
    (e.g. the parity prompts in their chat template) give the confident predictions a trained
    model has, so a parity check measures the format, not the ties.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    batch = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        ids = batch[step % len(batch)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)
