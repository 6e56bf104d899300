"""The models under evaluation and batched greedy generation from them.

One base model is loaded (transformers, from the base's HF folder) and the adapter is attached
with PEFT (`PeftModel.from_pretrained`, safetensors only). "base" and "few-shot" run with the
adapter disabled (`disable_adapter()`), "adapter" with it enabled, so the three systems share one
copy of the weights. Prompts use the adapter's ``chat_template.jinja`` when the folder has one
(the template it was trained with), else the base tokenizer's.

A QLoRA adapter (its manifest says ``load_in_4bit``) is evaluated on the base as training saw it:
the NF4 weights dequantised once (`hub.nf4.dense_nf4_model`), so all three systems run the
numbers the adapter learned on. On the original full-precision weights the demo adapter's exact
match fell from 0.93 to 0.73 (a tie with few-shot), which measures the mismatch, not the adapter.

Where the job ends: this module loads, builds prompts and generates text. Scoring tokens is
`train.eval.scoring`; metrics are `train.eval.metrics`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hub.bases import BaseInfo
from hub.errors import InvalidInput, NotAnAdapter
from hub.files import refuse_pickle
from hub.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CHAT_TEMPLATE_FILE
from hub.nf4 import dense_nf4_model, trained_4bit

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
System = Literal["base", "few_shot", "adapter", "parent"]
PARENT = "parent"  # the adapter name a parent adapter is loaded under (`Loaded.add_parent`)
Messages = list[dict[str, str]]


def stop_token_ids(base_dir: Path, tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's eos and the base's ``generation_config.json`` ``eos_token_id`` list.

    Instruct checkpoints list their end-of-turn token there (Gemma's ``<end_of_turn>``, Phi-3's
    ``<|end|>``, Llama 3's ``<|eot_id|>``) when it differs from ``eos_token``; stopping at
    ``eos_token`` alone would run past the answer into made-up turns.
    """
    import json

    ids = [tokenizer.eos_token_id]
    config = Path(base_dir) / "generation_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [value])
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))


@dataclass
class Loaded:
    """A base model with the adapter attached, and its tokenizer.

    Attributes:
        model: `peft.PeftModel` on ``device``.
        tokenizer: The base tokenizer with the chosen chat template set.
        template_source: ``adapter`` (the folder's chat_template.jinja) or ``base``.
        dtype: The torch dtype name the base was loaded in.
        device: Torch device string.
        weights: How the base weights were obtained, in words (for the report).
        quantized: True when the base holds 4-bit (dequantised) values.
        stop_token_ids: Ids that end a generated answer (`stop_token_ids`).
    """

    model: Any
    tokenizer: Any
    template_source: str
    dtype: str
    device: str
    weights: str = "unquantised"
    quantized: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @contextlib.contextmanager
    def system(self, name: System) -> Iterator[Any]:
        """Yield the model as system ``name`` (``base`` and ``few_shot``: no adapter).

        ``adapter`` is this adapter, ``parent`` the one it was trained from (`add_parent`).
        """
        if name == "adapter":
            yield self.model
        elif name == PARENT:
            self.model.set_adapter(PARENT)
            try:
                yield self.model
            finally:
                self.model.set_adapter("default")
        else:
            with self.model.disable_adapter():
                yield self.model

    def add_parent(self, parent_dir: Path) -> None:
        """Load the adapter this one was trained from as a second, inactive adapter."""
        self.model.load_adapter(str(parent_dir), adapter_name=PARENT)
        self.model.set_adapter("default")
        self.model.eval()


def resolve_dtype(dtype: Dtype, device: str) -> str:
    """``auto`` means float32 on CPU (no fast bf16 here) and bfloat16 on CUDA."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load(
    adapter_dir: Path,
    base: BaseInfo,
    *,
    device: str = "cpu",
    dtype: Dtype = "auto",
    quantization: dict[str, Any] | None = None,
) -> Loaded:
    """Load ``base`` with transformers and attach the adapter in ``adapter_dir``.

    Args:
        adapter_dir: PEFT LoRA folder.
        base: The base it was trained on.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: Compute precision (``auto``: float32 on CPU, bfloat16 on CUDA).
        quantization: The manifest's ``quantization`` section; when it says ``load_in_4bit`` the
            base is loaded as QLoRA training saw it (NF4 values, dequantised), else unquantised.

    Raises:
        NotAnAdapter: If the folder lacks the PEFT config or safetensors weights.
        UnsafeWeights: If it holds pickle weights.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    for needed in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (adapter_dir / needed).is_file():
            raise NotAnAdapter(
                f"{adapter_dir} has no {needed}",
                fix="Pass a PEFT LoRA folder saved with save_pretrained(safe_serialization=True).",
            )
    refuse_pickle(adapter_dir)
    dtype_name = resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    template_file = adapter_dir / CHAT_TEMPLATE_FILE
    template_source = "base"
    if template_file.is_file():
        tokenizer.chat_template = template_file.read_text()
        template_source = "adapter"
    if not tokenizer.chat_template:
        raise InvalidInput(
            f"Neither {template_file} nor the base {base.name!r} has a chat template",
            fix=f"Save the training chat template as {CHAT_TEMPLATE_FILE} in the adapter folder.",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    four_bit = trained_4bit(quantization)
    if four_bit is not None:
        model = dense_nf4_model(Path(base.path), **four_bit, compute_dtype=dtype_name,
                                device=device)
        weights = (
            f"{four_bit['quant_type']} 4-bit{' (double quant)' if four_bit['double_quant'] else ''}"
            f" dequantised to {dtype_name}, as in training"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base.path, dtype=getattr(torch, dtype_name), trust_remote_code=False
        )
        weights = f"unquantised {dtype_name}"
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.to(device)
    model.eval()
    return Loaded(model, tokenizer, template_source, dtype_name, device, weights,
                  quantized=four_bit is not None,
                  stop_token_ids=stop_token_ids(Path(base.path), tokenizer))


def split_conversation(messages: Messages) -> tuple[Messages, str]:
    """Split an SFT conversation into the prompt and the reference answer (its last assistant turn).

    Raises:
        InvalidInput: If the conversation has no assistant message.
    """
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[:i], messages[i].get("content", "")
    raise InvalidInput(
        "A test conversation has no assistant message",
        fix="Prepare the data with `loradock data prepare`.",
    )


def pick_shots(train_rows: Sequence[dict[str, Any]], k: int, seed: int = 0) -> list[dict[str, Any]]:
    """Choose ``k`` SFT rows from train deterministically (seeded sample, kept in file order)."""
    candidates = [row for row in train_rows if "messages" in row]
    if k <= 0 or not candidates:
        return []
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), min(k, len(candidates))))
    return [candidates[i] for i in chosen]


def with_shots(shots: Sequence[dict[str, Any]], messages: Messages) -> tuple[Messages, int]:
    """Put the shots' turns (system messages dropped) before ``messages``.

    The test conversation's own system message, if any, stays first.

    Returns:
        ``(messages, first)``: the few-shot conversation and the index where the test
        conversation's own turns begin (scoring starts there).
    """
    system = [m for m in messages[:1] if m.get("role") == "system"]
    rest = messages[len(system) :]
    shot_turns = [m for shot in shots for m in shot["messages"] if m.get("role") != "system"]
    combined = [*system, *shot_turns, *rest]
    return combined, len(system) + len(shot_turns)


def greedy_generate(
    loaded: Loaded,
    system: System,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding, stopped at end of turn.

    Prompts are sorted by length so each batch pads little; outputs come back in input order,
    decoded without special tokens and stripped. Decoding reads every weight once per step
    whatever the batch, so large batches pay: on 2 CPU cores 24 prompts took 21.8 s in one
    batch of 24 and 54.6 s in batches of 8 (16 new tokens).
    """
    import torch
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    texts = [
        tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(loaded.stop_token_ids) or tokenizer.eos_token_id,
    )
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id
    with loaded.system(system) as model, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                seq = encoded[index]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                attention[row, width - len(seq) :] = 1
            generated = model.generate(
                input_ids=ids.to(loaded.device),
                attention_mask=attention.to(loaded.device),
                generation_config=config,
            )
            for row, index in enumerate(batch):
                new = generated[row, width:]
                outputs[index] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return outputs
