"""Plots of a run's ``metrics.jsonl``: loss and learning rate against optimizer steps.

The trainer appends one JSON object per line to ``<checkpoint_dir>/metrics.jsonl``, each of a kind
that :mod:`sab_byon_omni.training.metrics` defines: ``train`` rows give the loss and learning-rate
curves, ``eval`` rows validation points, ``epoch_end`` rows the epoch means and their validation.

A resumed run appends to the same file and may repeat steps it had logged before it stopped;
for every series the last row written for a step wins. A torn last line (a run killed while
writing) is skipped with a warning.

The figure is drawn with matplotlib's object API on an Agg canvas, so nothing here touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.atomic import atomic_write, cannot_write, missing_folders
from sab_byon_omni.files.untrusted import MAX_STEP  # the one step limit (a float holds every step up to it exactly)
from sab_byon_omni.training.metrics import EPOCH_END, EVAL, METRICS_FILE, TRAIN, row_kind

log = logging.getLogger(__name__)

DEFAULT_PNG = "metrics.png"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Series:
    """The curves found in a metrics file, each a (steps, values) pair sorted by step."""

    loss: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    lr: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    muon_lr: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))  # optimizer muon
    val_loss: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    epoch_train_loss: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    nonfinite_losses: int = 0  # loss values left out for being NaN or infinite (a diverged run)

    def names(self) -> list[str]:
        """Names of the non-empty series."""
        return [k for k in ("loss", "lr", "muon_lr", "val_loss", "epoch_train_loss") if getattr(self, k)[0]]


def metrics_path(run: str | Path) -> Path:
    """``run/metrics.jsonl`` for a run folder; ``run`` itself if it is a ``.jsonl`` file; for another
    file (a checkpoint in a run folder) its folder's metrics.jsonl, said in a log line, else one
    error: a 100 MB checkpoint is not read as 19,000 broken JSON lines."""
    p = Path(run)
    if p.is_file():
        if p.suffix.lower() == ".jsonl":
            return p
        if (p.parent / METRICS_FILE).is_file():
            log.info("%s is not a metrics file: plotting its run folder %s", p, p.parent)
            return p.parent / METRICS_FILE
        raise SabError(f"{p} is not a run folder or a {METRICS_FILE} file: pass the folder train wrote "
                       "(its checkpoint_dir, e.g. runs/csv)")
    if not p.exists():
        raise SabError(f"run directory not found: {p}")
    m = p / METRICS_FILE
    if not m.is_file():
        raise SabError(f"{p} has no {METRICS_FILE} (is it a checkpoint_dir written by sab-omni train?)")
    return m


SKIPPED_SHOWN = 3  # lines of a metrics file named one by one when skipped; the rest are counted


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; lines that are not JSON objects with a step number (a whole
    number from 0 to :data:`MAX_STEP`) are skipped with a warning (the first
    :data:`SKIPPED_SHOWN`, then one line counting the rest)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SabError(f"cannot read {path}: {e.strerror or e}") from None
    rows, skipped = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row, why = _row(line)
        if why is None:
            rows.append(row)
            continue
        skipped += 1
        if skipped <= SKIPPED_SHOWN:
            log.warning("%s:%d: %s; skipped", path, n, why)
    if skipped > SKIPPED_SHOWN:
        more = skipped - SKIPPED_SHOWN
        log.warning("%s: %d more line%s skipped (%d in all)", path, more, "" if more == 1 else "s", skipped)
    return rows


def _row(line: str) -> tuple[Any, str | None]:
    """One line's row, and why it is skipped (None: it is a row)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, too deep, or a number too long to convert
        return None, "not a JSON line"
    step = row.get("step") if isinstance(row, dict) else None
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return row, "no step"
    if not _is_step(step):
        return row, f"step {bounded(step)} is not an optimizer step number"
    return row, None


def _is_step(step: int | float) -> bool:
    """A whole number from 0 to MAX_STEP (``1e400`` is valid JSON for infinity; ints are exact)."""
    if isinstance(step, float) and not (math.isfinite(step) and step.is_integer()):
        return False
    return 0 <= step <= MAX_STEP


# the curves each kind of row feeds: (field, curve)
CURVES = {TRAIN: (("loss", "loss"), ("lr", "lr"), ("muon_lr", "muon_lr")), EVAL: (("val_loss", "val_loss"),),
          EPOCH_END: (("train_loss", "epoch_train_loss"), ("val_loss", "val_loss"))}


def collect_series(rows: list[dict[str, Any]]) -> Series:
    """Split rows into curves. A later row for the same step replaces an earlier one (resumed runs)."""
    latest: dict[str, dict[int, float]] = {"loss": {}, "lr": {}, "muon_lr": {}, "val_loss": {}, "epoch_train_loss": {}}
    nonfinite = 0
    for row in rows:
        step = int(row["step"])
        for key, name in CURVES.get(row_kind(row), ()):
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                latest[name][step] = float(v)
            elif "loss" in name and key in row and (v is None or isinstance(v, float)):  # the log writes NaN as null
                nonfinite += 1
    out = Series(nonfinite_losses=nonfinite)
    for name, points in latest.items():
        steps = sorted(points)
        setattr(out, name, (steps, [points[s] for s in steps]))
    return out


def make_figure(series: Series, title: str = "") -> Any:
    """A matplotlib Figure: loss (top, log scale when it spans a decade) and learning rate (bottom)
    against whole optimizer steps, each legend beside its plot where it covers no curve."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9.5, 6), dpi=100, layout="constrained")  # wide enough for the legends beside
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    if series.loss[0]:
        ax_loss.plot(*series.loss, color="tab:blue", linewidth=1.2, label="train loss")
    if series.epoch_train_loss[0]:  # one horizontal segment per epoch, over the steps it spans
        ends, means = series.epoch_train_loss
        starts = [0, *ends[:-1]]
        ax_loss.hlines(means, starts, ends, colors="tab:blue", linestyles="dashed", linewidth=1.0, alpha=0.7,
                       label="train loss (epoch mean)")
    if series.val_loss[0]:
        ax_loss.plot(*series.val_loss, "o-", color="tab:orange", markersize=5, linewidth=1.2, label="validation loss")
    values = series.loss[1] + series.val_loss[1] + series.epoch_train_loss[1]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.grid(True, alpha=0.3)
    if ax_loss.lines or ax_loss.collections:
        _legend_outside(ax_loss)
    _plot_rates(ax_lr, series)
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared with the loss plot: no step 1.25
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def _plot_rates(ax: Any, series: Series) -> None:
    """The learning rate (AdamW's) and, for a run with optimizer muon, Muon's on an axis of its own
    at the right (its rate is one to two orders of magnitude larger)."""
    lines = ax.plot(*series.lr, color="tab:green", linewidth=1.2,
                    label="AdamW learning rate" if series.muon_lr[0] else "learning rate") if series.lr[0] else []
    if series.muon_lr[0]:
        twin = ax.twinx()
        lines += twin.plot(*series.muon_lr, "--", color="tab:purple", linewidth=1.2, label="Muon learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        twin.set_ylabel("Muon learning rate", color="tab:purple")
    if lines:
        _legend_outside(ax, lines, 1.12 if series.muon_lr[0] else 1.01)


def _legend_outside(ax: Any, lines: list[Any] | None = None, x: float = 1.01) -> None:
    """The legend right of the plot (the constrained layout makes room), never over a curve."""
    extra = {"handles": lines} if lines else {}
    ax.legend(loc="upper left", bbox_to_anchor=(x, 1.0), borderaxespad=0.0, frameon=False, **extra)


def plot_metrics(run: str | Path, out: str | Path | None = None, title: str | None = None,
                 series: Series | None = None) -> Path:
    """Write a PNG of loss and learning rate vs step for a run directory (or a metrics.jsonl file).

    ``out`` defaults to ``metrics.png`` next to the metrics file; missing folders on its way are
    created (and removed again if the write fails). An existing file at ``out`` is
    replaced only if it is itself a PNG (a previous plot); anything else is left alone. ``series``:
    the file's curves when the caller has read them already (its warnings are then not repeated).
    """
    src = metrics_path(run)
    if series is None:
        series = collect_series(read_metrics(src))
    if not series.loss[0] and not series.val_loss[0] and not series.epoch_train_loss[0]:
        if series.nonfinite_losses:
            raise SabError(f"{src}: every loss in it is non-finite (NaN or infinite, {series.nonfinite_losses} "
                           "values): the run diverged; lower the learning rate (docs/TRAINING.md) and train again")
        raise SabError(f"{src} has no loss rows yet (the first is written after train.log_interval steps)")
    dest = Path(out) if out is not None else src.parent / DEFAULT_PNG
    if dest.suffix.lower() != ".png":
        raise SabError(f"-o {dest}: the plot is a PNG; give a file name ending in .png")
    if dest.is_dir():
        raise SabError(f"-o {dest} is a directory; give a file name ending in .png")
    if dest.exists():
        with dest.open("rb") as f:
            if f.read(8) != _PNG_MAGIC:
                raise SabError(f"-o {dest} exists and is not a PNG; refusing to overwrite it")
    fig = make_figure(series, title if title is not None else str(src.parent.name or src.parent))
    made = missing_folders(dest.parent)  # created here, deepest first
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _atomic_savefig(fig, dest)
    except OSError as e:
        _remove_empty(made)
        raise SabError(f"-o {dest}: cannot create its folder: {cannot_write(dest.parent, e)}") from None
    except BaseException:
        _remove_empty(made)
        raise
    log.debug("wrote %s (%s)", dest, ", ".join(series.names()))
    return dest


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first; only what is still empty
        try:
            d.rmdir()
        except OSError:
            return


def _atomic_savefig(fig: Any, dest: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach an Agg canvas: no GUI backend is ever selected
    atomic_write(dest, lambda f: fig.savefig(f, format="png"), what="plot")
