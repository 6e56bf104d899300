"""The SFT loss on the labelled positions only: the LM head never sees prompt or padding tokens.

TRL 1.16's ``SFTTrainer`` computes its loss through a fused LM head (``add_fused_lm_head``):
per-token log-probabilities in vocabulary tiles, without the full logits tensor. Off CUDA/XPU it
scores every position of the batch, prompt and padding included, and masks the result. With
``assistant_only_loss`` most positions carry no label (on the json-extract demo 185 of 536 in a
batch of 8), so most of that work and memory is thrown away: on this project's 2-core CPU the
LM head (49,152-token vocabulary) was a third of a training step.

`install_labelled_head` replaces that forward on the base model with one that projects only the
positions whose next-token label is not ``-100`` (``hidden[mask] @ W.T``), takes the standard
cross-entropy there in float32, and returns the same ``FusedCausalLMOutput`` fields TRL's
``compute_loss`` reads (``log_probs``, ``entropy``, ``is_top1``, ``label_mask``; zero where
unlabelled). The loss is the same sum over the same tokens divided by the same count, so it
equals TRL's up to float rounding (tested on the real SmolLM2). Entropy and top-1 accuracy are
logged metrics only and are computed without gradient.

Cases this forward does not cover (pre-shifted ``shift_labels`` under sequence parallelism,
MoE router losses, logit scales other than ``final_logit_softcapping``) go to TRL's forward
unchanged.

Where the job ends: this module changes how the loss is computed, not what it is; building the
trainer is `train.sft`'s.
"""

from __future__ import annotations

import types
from typing import Any

# Config attributes that scale logits in ways this forward does not reproduce (TRL's does).
_OTHER_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def labelled_positions_supported(config: Any) -> bool:
    """Whether `install_labelled_head` computes this model's loss itself (else TRL's does)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) is not None for name in _OTHER_LOGIT_SCALES):
        return False
    return not getattr(text, "output_router_logits", False)


def labelled_log_probs(hidden: Any, labels: Any, lm_head: Any, softcap: float | None) -> tuple:
    """Log-probabilities of the labels at the labelled positions, and metrics for them.

    Args:
        hidden: ``[batch, seq, hidden]`` states whose position ``t`` predicts ``labels[:, t]``.
        labels: ``[batch, seq]`` next-token ids, ``-100`` where nothing is predicted.
        lm_head: The output projection (a ``torch.nn.Linear`` or anything taking ``[n, hidden]``).
        softcap: ``final_logit_softcapping`` of the config, or None.

    Returns:
        ``(log_probs, entropy, is_top1, mask)``, each ``[batch, seq]`` and zero where the label
        is ``-100``; only ``log_probs`` carries gradient.
    """
    import torch
    import torch.nn.functional as F

    mask = labels != -100
    targets = labels[mask]
    logits = lm_head(hidden[mask]).float()  # [n labelled, vocab]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    picked = -F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():
        log_z = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        entropy = log_z - (probs * logits).sum(-1)
        del probs
        top1 = logits.argmax(-1) == targets
    # masked_scatter keeps a batch without labelled tokens connected to the graph (a zero loss).
    log_probs = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
    return (log_probs, entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            top1.new_zeros(mask.shape).masked_scatter(mask, top1), mask)


def install_labelled_head(model: Any) -> bool:
    """Make ``model(..., labels=..., fused_lm_head=True)`` score only the labelled positions.

    Args:
        model: The causal LM whose ``forward`` TRL patched with ``add_fused_lm_head`` (for a
            ``PeftModel``, its ``get_base_model()``).

    Returns:
        True when installed; False when the model needs TRL's own forward (it is kept).
    """
    if not labelled_positions_supported(model.config):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward
    text = model.config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None,
                shift_labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if (not fused_lm_head or labels is None or shift_labels is not None
                or kwargs.get("output_router_logits")):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                               shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                               **kwargs)
        kwargs["use_cache"] = False
        states = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        lm_head = self.get_output_embeddings()
        labels = labels[:, 1:].to(lm_head.weight.device)
        log_probs, entropy, top1, mask = labelled_log_probs(
            states.to(lm_head.weight.device), labels, lm_head, softcap)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs,
                                   entropy=entropy, is_top1=top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
