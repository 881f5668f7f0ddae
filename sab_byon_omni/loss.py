"""The causal language-model loss: the guide's shift, padding ignored, summed per token; from the
logits (:func:`causal_lm_loss`) or by the model's head (:func:`model_loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sab_byon_omni.data.batching import IGNORE_INDEX


def causal_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of each position: the label of the next one (the guide's shift), ``IGNORE_INDEX``
    at the last. Shifting the labels left (instead of slicing the logits) spares a copy of the logits."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1 (the guide's shift), ignoring padding.

    ``reduction="sum"``: the trainer divides by the real tokens of a whole optimizer step, so
    accumulated micro-batches equal one big batch.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), causal_targets(labels).reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def model_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``causal_lm_loss(model(input_ids), labels)`` (summed) computed by the model's head itself,
    which never holds the fp32 logits (this package's model, or a DDP / compiled wrapper of it:
    ``forward(ids, targets=...)``)."""
    return model(input_ids, targets=causal_targets(labels))
