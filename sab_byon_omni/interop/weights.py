"""The one shape every model source is read into."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sab_byon_omni.config import RunConfig
from sab_byon_omni.data.tokenizers import Tokenizer


@dataclass
class Weights:
    """A model's parts, read from any source; the facade builds and checks the model."""

    config: RunConfig
    tokenizer: Tokenizer
    state_dict: dict[str, torch.Tensor]
    epoch: int = 0
    global_step: int = 0
    origin: str = ""
