"""The parts of a run that have state besides the model, the optimizer and the GradScaler: where the
run is (:class:`TrainState`), every random-number generator it uses (:class:`RngState`) and the
learning-rate schedule (:class:`Schedule`).

Each has ``state_dict()`` and ``load_state_dict()``, as a model and an optimizer do, and
:class:`~sab_byon_omni.training.checkpointer.Checkpointer` composes them into the checkpoint file.
The checkpointer validates what it reads, once; these parts trust what they are given.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sab_byon_omni.config import TrainConfig
from sab_byon_omni.training.optim import set_lr


@dataclass
class TrainState:
    """The loop's position and running sums. Every field is saved; nothing else is. ``epoch`` and
    ``cursor`` are the data cursor: the order of an epoch's samples is a function of (seed, epoch),
    so the samples consumed by all processes together say where any number of processes continues."""

    epoch: int = 0  # epochs completed
    cursor: int = 0  # samples of this epoch's order consumed, by all processes together
    global_step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    epoch_loss_sum: float = 0.0  # this epoch's loss so far (nats, all processes), for an exact epoch mean
    epoch_tokens: int = 0  # and its predicted tokens
    log_loss_sum: float = 0.0  # the metrics row in progress when saved: its loss so far (nats, all processes),
    log_tokens: int = 0  # predicted tokens and steps, so that a resumed run's next row is the one an
    log_steps: int = 0  # uninterrupted run writes (zero outside a save)
    skipped_steps: int = 0  # non-finite steps skipped since the run began
    skipped_in_a_row: int = 0
    train_losses: list[float] = field(default_factory=list)  # per finished epoch
    val_losses: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """Every field by name (the lists copied)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every field from ``state`` (as :meth:`state_dict` gives it, or the checkpointer's validated reading)."""
        for f in dataclasses.fields(self):
            value = state[f.name]
            setattr(self, f.name, list(value) if isinstance(value, list) else value)


class RngState:
    """Every random-number generator the run uses, in this process: torch's CPU generator, this
    process's own CUDA device, Python's and numpy's."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return capture_rng(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state, self.device)


class Schedule:
    """The learning-rate schedule, a pure function of the optimizer step
    (:func:`~sab_byon_omni.training.optim.lr_at`): its state is its name, the step it stands at (the
    train state's) and the steps it was planned for. :meth:`set_step` sets every group's rate for a
    step and tells the model (``model.on_step``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, train: TrainConfig, total_steps: int,
                 state: TrainState) -> None:
        self.optimizer, self.model, self.train = optimizer, model, train
        self.total_steps, self.state = total_steps, state

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.train.lr_schedule, "step": self.state.global_step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the rate follows from the step, which the train state brings back (a
        run planned for another length follows its own plan; the checkpointer says so)."""

    def set_step(self, step: int) -> None:
        set_lr(self.optimizer, step, self.train, self.total_steps)
        self.model.on_step(step)


# ---------------------------------------------------------------------------------- randomness
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG the run uses, as tensors and primitives. Under torchrun every rank's goes into the
    checkpoint (``rng_state_by_rank``) and each restores its own."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None) -> None:
    """Restore what :func:`capture_rng` saved (a malformed entry raises; the checkpointer names the file)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device is not None and device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
