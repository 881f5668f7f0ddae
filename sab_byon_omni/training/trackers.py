"""Where the metric rows go besides ``metrics.jsonl``: ``train.report_to`` (named like the Hugging
Face Trainer's option), a comma-separated list of ``tensorboard`` and ``wandb``.

Each tracker receives the same rows as ``metrics.jsonl`` and the resolved config at the start. A
row's ``step`` is the tracker's step, its ``time`` TensorBoard's wall time, and every other number
a scalar named after the kind of row, as the Hugging Face Trainer does: ``train/loss``,
``train/lr`` ... (every ``log_interval`` steps), ``eval/val_loss`` (every ``eval_interval``) and
``epoch_end/train_loss``, ``epoch_end/val_loss``; so an evaluation and an epoch end at the same
step stay two values. Weights & Biases honours its own environment (``WANDB_MODE=offline`` logs
with no network, under the run folder's ``wandb/``; ``WANDB_PROJECT``); its run is named after
the run folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from sab_byon_omni.config import RunConfig, TrainConfig
from sab_byon_omni.errors import SabError, first_line
from sab_byon_omni.files.atomic import check_own
from sab_byon_omni.training.metrics import row_kind

FOLDERS = {"tensorboard": "tb", "wandb": "wandb"}  # where each writes in the run folder
INSTALL = {"tensorboard": "pip install 'sab-byon-omni[tensorboard]'", "wandb": "pip install 'sab-byon-omni[wandb]'"}
NOT_SCALARS = ("step", "time")


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


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics row as ``kind/name`` scalars (a value JSON could not hold is None
    in the row and left out here, as in ``metrics.jsonl``)."""
    kind = row_kind(row) or "other"
    return {f"{kind}/{k}": float(v) for k, v in row.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def config_text(cfg: RunConfig) -> str:
    """The resolved config as YAML (the same text as the run folder's config.yaml, less its note)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


class TensorBoard:
    def __init__(self, directory: Path, cfg: RunConfig) -> None:
        try:
            self.writer = _import("tensorboard")(str(directory / FOLDERS["tensorboard"]))
        except OSError as e:  # tb is a file, or the disk is full
            raise SabError(f"train.report_to=tensorboard: cannot write {directory / FOLDERS['tensorboard']}: "
                           f"{e.strerror or e}") from None
        self.writer.add_text("config", "```yaml\n" + config_text(cfg) + "```", 0)

    def log(self, row: dict[str, Any]) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, row["step"], walltime=row.get("time"))

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, directory: Path, cfg: RunConfig) -> None:
        wandb = _import("wandb")
        try:
            self.run = wandb.init(name=directory.name, dir=str(directory), config=cfg.to_dict(),
                                  reinit="finish_previous")
        except wandb.Error as e:  # no account or no network: say how to log without them
            raise SabError(f"train.report_to=wandb: {first_line(e)} (or set WANDB_MODE=offline to log without an "
                           "account or network)") from None

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_all(asked: list[str], directory: Path, cfg: RunConfig, is_main: bool) -> list[Any]:
    """Open the trackers (the main process only); a link where one would write is refused first."""
    if not is_main:
        return []
    for n in asked:
        check_own(directory / FOLDERS[n], f"the {n} log (train.report_to)")
    return [TensorBoard(directory, cfg) if n == "tensorboard" else WandB(directory, cfg) for n in asked]

