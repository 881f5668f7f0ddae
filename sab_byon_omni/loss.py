"""The causal language-model loss: the guide's shift, padding ignored, summed per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sab_byon_omni.data.batching import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1 (the guide's shift), ignoring padding.

    Shifting the labels left (instead of slicing the logits) gives the same value without copying
    the logits. ``reduction="sum"``: the trainer divides by the real tokens of a whole optimizer
    step, so accumulated micro-batches equal one big batch.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
