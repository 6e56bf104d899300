"""Tiny random-weight checkpoints of every family the peft engine serves, for tests.

Each is built with transformers' own config and model classes (so the checkpoint is exactly
what ``save_pretrained`` writes for that family), a few layers wide, with the embedded
SmolLM2's tokenizer and chat template copied in, so a real server can serve it through the
OpenAI API. Sliding windows are shorter than the test prompts, so window masks matter;
weights are drawn wider than transformers' default (``initializer_range``) so greedy argmaxes
are decided by clear margins, not by float rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hub.bases import TOKENIZER_FILES

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


def make_tiny_base(family: str, out: Path, tokenizer_from: Path, seed: int = 0,
                   **overrides: Any) -> Path:
    """Save a tiny random ``family`` checkpoint with the tokenizer of ``tokenizer_from``.

    ``overrides`` replace config values (a value of None removes the key, so transformers'
    default applies).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(family, **{k: v for k, v in values.items() if v is not None})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from their init, so offsets (Gemma's 1 + w) matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape) * 0.1)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_from) / name
        if source.is_file():
            shutil.copy(source, out / name)
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
