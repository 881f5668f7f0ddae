"""What a run tells the person watching it: a start banner, a line every ``log_interval`` steps and
at each evaluation, a time estimate for the whole run, and a closing summary.

Everything goes through ``logging`` (logger ``sab_byon_omni.training.console``); the handler from
:func:`install_handler` writes through ``tqdm.write`` so that lines never break a progress bar.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from sab_byon_omni.estimate import fmt_count, fmt_duration

log = logging.getLogger(__name__)
PACKAGE_LOGGER = "sab_byon_omni"


class TqdmHandler(logging.Handler):
    """A stderr handler that prints above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def ours_or_warning(record: logging.LogRecord) -> bool:
    """The package's records, and other libraries' warnings: their INFO lines (the gguf writer's
    progress, naming its temporary file) are not for the person running a command."""
    name = record.name
    return (record.levelno >= logging.WARNING or name in ("root", PACKAGE_LOGGER)
            or name.startswith(PACKAGE_LOGGER + "."))


def install_handler(logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
    """Send ``logger``'s records (the root's by default) to stderr through tqdm, plain messages."""
    logger = logger or logging.getLogger()
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(ours_or_warning)
        logger.addHandler(handler)
    logger.setLevel(level)


def ensure_visible() -> None:
    """From Python (no logging configured), show the package's INFO lines like the CLI does."""
    root, pkg = logging.getLogger(), logging.getLogger(PACKAGE_LOGGER)
    if not root.handlers and not pkg.handlers:
        install_handler(pkg)


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None: only on a terminal (a log file gets the step lines, not carriage-return redraws)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


class Clock:
    """Measured speed of this run, from the end of its first step (which pays for warm-up) on:
    seconds per optimizer step, tokens per second, and the time the remaining steps will take."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.t0: float | None = None
        self.first = self.step = self.tokens = 0
        self.announced = False

    def step_done(self, step: int, tokens: int) -> None:
        if self.t0 is None:
            self.t0, self.first = time.perf_counter(), step
        else:
            self.tokens += tokens
        self.step = step

    @property
    def measured(self) -> int:
        return self.step - self.first if self.t0 is not None else 0

    def seconds_per_step(self) -> float | None:
        return (time.perf_counter() - self.t0) / self.measured if self.measured and self.t0 is not None else None

    def tokens_per_second(self) -> float | None:
        sps = self.seconds_per_step()
        return self.tokens / (sps * self.measured) if sps else None

    def eta(self) -> float | None:
        sps = self.seconds_per_step()
        return sps * max(self.total_steps - self.step, 0) if sps is not None else None

    def ready_to_announce(self) -> bool:
        sps = self.seconds_per_step()
        return not self.announced and sps is not None and (self.measured >= 3 or sps * self.measured > 20)


def step_line(step: int, total: int, epoch: int, epochs: int, loss: float, lr: float, tps: float,
              eta: float | None) -> str:
    return (f"step {step:,}/{total:,} (epoch {epoch}/{epochs}): loss {loss:.4f}, lr {lr:.2e}, {tps:,.0f} tokens/s"
            + (f", {fmt_duration(eta)} to go" if eta is not None else ""))


def time_line(clock: Clock) -> str:
    eta, tps = clock.eta(), clock.tokens_per_second()
    return (f"time: about {fmt_duration(eta or 0.0)} for the remaining {clock.total_steps - clock.step:,} steps "
            f"({clock.seconds_per_step():.2f} s/step" + (f", {tps:,.0f} tokens/s" if tps else "") + ", measured)")


def banner(lines: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        log.info("%s %s", (f"{key}:" if key else "").ljust(width + 1), value)  # "": goes on the line above


def predicted_tokens(ds: Any) -> int | None:
    """The tokens a dataset's samples predict, when it can say so cheaply (else None)."""
    if hasattr(ds, "num_targets"):
        return int(ds.num_targets)
    lengths = getattr(ds, "lengths", None)
    return int(sum(int(n) - 1 for n in lengths)) if lengths is not None else None


def data_summary(train: Any, val: Any) -> str:
    """Samples and predicted tokens of the two splits, from what the datasets can say cheaply."""
    parts = [f"{len(train):,} training samples"]
    t = predicted_tokens(train)
    if t is not None:
        parts[0] += f" ({fmt_count(t)} predicted tokens)"
    if val is not None:
        v = predicted_tokens(val)
        parts.append(f"{len(val):,} validation" + (f" ({fmt_count(v)} tokens)" if v is not None else ""))
    return ", ".join(parts)


def start_estimate(flops_per_step: float, flop_rate: float, total_steps: int, what: str) -> str:
    """The banner's ``time:`` line before the first step: an optimizer step's FLOPs at the device's
    measured matmul rate (``what``). A lower bound: a step also runs kernels slower than a matmul."""
    def short(s: float) -> str:
        if s < 1:
            return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.2g} ms"
        return f"{s:.2g} s" if s < 10 else fmt_duration(s)

    seconds = flops_per_step / flop_rate
    flop = f"{flops_per_step:.1e}".replace("e+0", "e").replace("e+", "e")
    steps = f"{total_steps:,} step{'s' if total_steps != 1 else ''}"
    return (f"at least ~{short(seconds)} per optimizer step, ~{short(seconds * total_steps)} for {steps} "
            f"({flop} FLOP per step at the {what} of {flop_rate / 1e9:,.0f} GFLOP/s); "
            "measured after the first steps")


def summary(result: Any, directory: str) -> list[str]:
    """The closing lines: losses, where the checkpoints are, and what to run next."""
    lines = []
    finite = [v for v in [*result.val_losses, result.best_val_loss] if isinstance(v, float) and math.isfinite(v)]
    if finite:
        lines.append(f"best validation loss {min(finite):.4f} (perplexity {math.exp(min(finite)):.3f})")
    best = result.best_checkpoint or (result.checkpoints[-1] if result.checkpoints else None)
    if best:
        lines.append(f"checkpoints in {directory}; next:")
        lines.append(f"  sab-omni generate --checkpoint {best} --prompt \"...\"")
        lines.append(f"  sab-omni eval --checkpoint {best}")
        lines.append(f"  sab-omni plot {directory}")
    return lines
