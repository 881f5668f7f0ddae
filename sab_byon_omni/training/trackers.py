"""Where the metric rows go besides ``metrics.jsonl``: ``train.report_to`` (named like the Hugging
Face Trainer's option), a comma-separated list of ``tensorboard`` and ``wandb``.

Each tracker receives the same rows as ``metrics.jsonl`` and the resolved config at the start.
Weights & Biases honours its own environment (``WANDB_MODE=offline`` logs to ``./wandb`` with no
network; ``WANDB_PROJECT``); its run is named after the run folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sab_byon_omni.config import TRACKERS, RunConfig, TrainConfig
from sab_byon_omni.errors import SabError

INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
SKIP = ("step", "epoch", "time")


def names(t: TrainConfig) -> list[str]:
    """The trackers a run asked for (``tensorboard: true`` is the older spelling of report_to)."""
    asked = [n.strip() for n in t.report_to.split(",") if n.strip() and n.strip() != "none"]
    if t.tensorboard and "tensorboard" not in asked:
        asked.append("tensorboard")
    return asked


def check(t: TrainConfig) -> list[str]:
    """The trackers to open, each known and importable: checked before anything is written."""
    asked = names(t)
    for name in asked:
        try:
            _import(name)
        except ImportError:
            raise SabError(f"train.report_to={name} needs the {name} package ({INSTALL[name]})") from None
    return asked


def _import(name: str) -> Any:
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    import wandb

    return wandb


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, directory: Path, cfg: RunConfig) -> None:
        self.writer = _import("tensorboard")(str(directory / "tb"))
        self.writer.add_text("config", "```\n" + _flat_text(cfg) + "\n```", 0)

    def log(self, row: dict[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, directory: Path, cfg: RunConfig) -> None:
        wandb = _import("wandb")
        self.run = wandb.init(name=directory.name, dir=str(directory), config=cfg.to_dict(), resume="allow",
                              reinit="finish_previous")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_all(asked: list[str], directory: Path, cfg: RunConfig, is_main: bool) -> list[Any]:
    """Open the trackers (the main process only)."""
    if not is_main:
        return []
    return [TensorBoard(directory, cfg) if n == "tensorboard" else WandB(directory, cfg) for n in asked]


def _flat_text(cfg: RunConfig) -> str:
    return "\n".join(f"{s}.{k}: {v}" for s, section in cfg.to_dict().items() for k, v in section.items())
