"""What a run is at a given moment (``TrainState``), and every random-number generator it uses.

Together with the model, the optimizer and the GradScaler this is everything an exact resume
needs; :class:`~sab_byon_omni.training.checkpointer.Checkpointer` writes it into the checkpoint
dict (``data_state``, ``history``, ``best_val_loss``, ``global_step``, ``epoch``, ``rng_state``)
and reads it back, checking every field.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.checkpoint import MAX_STEP, finite_float


@dataclass
class TrainState:
    """The loop's position and running sums. Every field is saved; nothing else is."""

    epoch: int = 0  # epochs completed
    cursor: int = 0  # samples of this epoch's order consumed, by all processes together
    global_step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    epoch_loss_sum: float = 0.0  # this epoch's loss so far (nats, all processes), for an exact epoch mean
    epoch_tokens: int = 0  # and its predicted tokens
    skipped_steps: int = 0  # non-finite steps skipped since the run began
    skipped_in_a_row: int = 0
    train_losses: list[float] = field(default_factory=list)  # per finished epoch
    val_losses: list[float] = field(default_factory=list)

    def to_checkpoint(self, world: int) -> dict[str, Any]:
        """The checkpoint keys that hold the state (the guide's ``epoch`` and ``global_step`` among them)."""
        return {
            "epoch": self.epoch, "global_step": self.global_step,
            "data_state": {"epoch": self.epoch, "cursor": self.cursor, "world_size": world,
                           "epoch_loss_sum": float(self.epoch_loss_sum), "epoch_tokens": int(self.epoch_tokens),
                           "skipped_steps": self.skipped_steps, "skipped_in_a_row": self.skipped_in_a_row},
            "history": {"train_loss": list(self.train_losses), "val_loss": list(self.val_losses)},
            "best_val_loss": self.best_val_loss,
        }

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any], source: str, epoch_size: int) -> "TrainState":
        """The state saved in ``ck``; a field of the wrong type or out of range is a SabError.
        ``epoch_size``: samples in an epoch of this run's data (a cursor past it is refused)."""
        data = ck.get("data_state", {"epoch": ck["epoch"], "cursor": 0})
        hist = ck.get("history", {})
        if not isinstance(data, dict) or not isinstance(hist, dict):
            raise SabError(f"{source}: data_state/history must be mappings (damaged checkpoint?)")
        st = cls(epoch=_count(data.get("epoch", ck["epoch"]), "data_state.epoch", source),
                 cursor=_count(data.get("cursor", 0), "data_state.cursor", source),
                 global_step=_count(ck["global_step"], "global_step", source),
                 best_val_loss=finite_float(ck.get("best_val_loss")),
                 epoch_loss_sum=finite_float(data.get("epoch_loss_sum", 0.0), 0.0),
                 epoch_tokens=_count(data.get("epoch_tokens", 0), "data_state.epoch_tokens", source),
                 skipped_steps=_count(data.get("skipped_steps", 0), "data_state.skipped_steps", source),
                 skipped_in_a_row=_count(data.get("skipped_in_a_row", 0), "data_state.skipped_in_a_row", source),
                 train_losses=_losses(hist.get("train_loss", []), source),
                 val_losses=_losses(hist.get("val_loss", []), source))
        if st.cursor > epoch_size:
            raise SabError(f"{source}: its data cursor ({st.cursor:,}) is past the end of an epoch of this run's data "
                           f"({epoch_size:,} samples): was it trained on other data or settings?")
        return st


def _count(value: Any, name: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STEP:
        raise SabError(f"{source}: {name}={bounded(value)} is not a count (damaged checkpoint?)")
    return value


def _losses(values: Any, source: str) -> list[float]:
    if not isinstance(values, list) or len(values) > 100_000:
        raise SabError(f"{source}: history must be a list of losses (damaged checkpoint?)")
    return [finite_float(v, math.nan) for v in values]


# ---------------------------------------------------------------------------------- randomness
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG the run uses, as tensors and primitives: torch's CPU generator, this process's own
    CUDA device, Python's and numpy's. Under torchrun every rank's goes into the checkpoint
    (``rng_state_by_rank``) and each restores its own (:func:`rank_rng`)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def rank_rng(ck: dict[str, Any], rank: int, world: int) -> Any:
    """The random state this rank saved, when the checkpoint holds one per rank of a run of the same
    size (``rng_state_by_rank``: each rank's generators move differently, e.g. dropout on batches
    of other lengths); else the main process's ``rng_state``."""
    per_rank = ck.get("rng_state_by_rank")
    if isinstance(per_rank, list) and len(per_rank) == world:
        return per_rank[rank]
    return ck["rng_state"]


def restore_rng(state: Any, device: torch.device | None, source: str) -> None:
    """Restore what :func:`capture_rng` saved; a malformed entry is a SabError."""
    try:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if device is not None and device.type == "cuda" and "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise SabError(f"{source}: its rng_state cannot be restored ({type(e).__name__}): damaged checkpoint?") from None
