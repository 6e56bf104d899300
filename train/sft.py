"""Supervised fine-tuning: canonical chat rows -> a TRL ``SFTTrainer`` on the 4-bit base.

Loss is on assistant tokens only (``assistant_only_loss``): the tokenizer gets the training copy
of the base template with ``{% generation %}`` markers (`train.template`), checked first to
render exactly like the original. The original template is what the adapter folder keeps.

``packing`` uses TRL's best-fit-decreasing packing, which is padding-free: the rows of a batch are
concatenated into one sequence whose ``position_ids`` restart at each row, and transformers
builds a block-diagonal causal mask from them, so a row never attends to another row (tested:
the same loss as unpacked). ``neftune_noise_alpha`` adds NEFTune's uniform noise to the
embeddings in training only.

Changes to how TRL's trainer computes, none to what it computes (tested against the
previous path on the real SmolLM2): the LM head scores only labelled positions
(`train.lm_loss`), LoRA dropout keeps boolean masks (`train.lean_dropout`), and under bf16
autocast the 4-bit layers return bf16 like any autocast linear (`train.autocast_4bit`) and
attention runs in float32 where that was measured faster (`train.attention_dtype`).

Where the job ends: this module builds the trainer. Running it, checkpoints and publishing the
adapter folder are `train.run`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub.errors import Unsupported
from train.args import common_args, early_stopping_callbacks
from train.attention_dtype import use_float32_attention
from train.autocast_4bit import autocast_4bit_outputs
from train.lean_dropout import use_lean_dropout
from train.lm_loss import install_labelled_head
from train.quant import QuantSpec, match_adapter_dtype
from train.recipe import Recipe
from train.template import add_generation_markers, check_same_rendering


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str) -> list[dict]:
    """Prepend ``system_prompt`` as a system turn when set and the conversation has none."""
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return [dict(m) for m in messages]
    return [{"role": "system", "content": system_prompt}, *(dict(m) for m in messages)]


def sft_dataset(rows: Sequence[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of ``{"messages": [...]}`` from canonical SFT rows."""
    from datasets import Dataset

    return Dataset.from_list([{"messages": [dict(m) for m in r["messages"]]} for r in rows])


def use_training_template(tokenizer: Any) -> str:
    """Give ``tokenizer`` the generation-marker copy of its template; return the original.

    Raises:
        Unsupported: When no equivalent marked template can be derived.
    """
    original = tokenizer.chat_template
    training = add_generation_markers(original)
    check_same_rendering(original, training)
    tokenizer.chat_template = training
    return original


def build_sft_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    *,
    spec: QuantSpec,
    checkpoints: Path,
    callbacks: list,
    progress: bool = True,
) -> Any:
    """Build an ``SFTTrainer`` for a LoRA-wrapped 4-bit model.

    Args:
        recipe: The validated recipe.
        model: ``PeftModel`` over the quantised base (`train.quant.attach_lora`).
        tokenizer: The base tokenizer (its template is swapped for the training copy when
            ``assistant_only_loss`` is on).
        train_rows: Canonical SFT rows of the train split.
        val_rows: Canonical SFT rows of the validation split (may be empty).
        spec: Device and compute dtype.
        checkpoints: Checkpoint folder.
        callbacks: Extra trainer callbacks (metrics logging...).
        progress: Show progress bars.

    Returns:
        The trainer, ready for ``train()``.
    """
    from trl import SFTConfig, SFTTrainer

    if recipe.assistant_only_loss:
        try:
            use_training_template(tokenizer)
        except Unsupported as exc:  # the fallback: loss on every token, said and recorded
            import logging

            logging.getLogger("loradock.train").warning(
                "assistant-only loss is off for this run: %s", exc.message)
            print(f"note: assistant-only loss is off for this run (loss on every token): "
                  f"{exc.message}", file=sys.stderr)
            recipe.assistant_only_loss = False  # the manifest records what was trained
    validate = bool(val_rows)
    args = common_args(recipe, spec, checkpoints, progress=progress, has_validation=validate)
    config = SFTConfig(
        **args,
        max_length=recipe.max_seq_len,
        assistant_only_loss=recipe.assistant_only_loss,
        packing=recipe.packing,
        packing_strategy="bfd",  # padding-free: rows concatenated, position_ids restart per row
        neftune_noise_alpha=recipe.neftune_noise_alpha,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=sft_dataset(train_rows),
        eval_dataset=sft_dataset(val_rows) if val_rows else None,
        processing_class=tokenizer,
        callbacks=[*callbacks, *early_stopping_callbacks(recipe, has_validation=validate)],
    )
    match_adapter_dtype(trainer.model, spec)
    model = trainer.model
    use_lean_dropout(model)
    autocast_4bit_outputs(model)
    if spec.compute_dtype == "bfloat16" and spec.attention_dtype == "float32":
        use_float32_attention(model)
    install_labelled_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return trainer
