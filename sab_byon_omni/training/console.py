"""What a run tells the person watching it: a start banner, a line every ``log_interval`` steps and
at each evaluation, a time estimate for the whole run, advice when it runs out of memory, and a
closing summary.

Everything goes through ``logging`` (logger ``sab_byon_omni.training.console``); the handler from
:func:`install_handler` writes through ``tqdm.write`` so that lines never break a progress bar.
The CLI installs that handler before it knows what it will run: this module imports torch only in
the functions that need it (a wrong path is an error line before torch is loaded).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import (PRECISION_BYTES, estimate, fmt_count, fmt_duration, perplexity, plural,
                                    step_seconds)
from sab_byon_omni.training.recipe import learns_slowly, too_few_steps

if TYPE_CHECKING:
    import torch

    from sab_byon_omni.training.build import Run

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
    return (f"time: about {fmt_duration(eta or 0.0)} for the remaining {plural(clock.total_steps - clock.step, 'step')} "
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


def start_estimate(seconds: float, flops_per_step: float, flop_rate: float, total_steps: int, what: str) -> str:
    """The banner's ``time:`` line before the first step: ``seconds`` per optimizer step (from
    :func:`~sab_byon_omni.estimate.step_seconds`), its FLOPs and the measured matmul rate (``what``)."""
    def short(s: float) -> str:
        if s < 1:
            return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.2g} ms"
        return f"{s:.2g} s" if s < 10 else fmt_duration(s)

    flop = f"{flops_per_step:.1e}".replace("e+0", "e").replace("e+", "e")
    return (f"about {short(seconds)} per optimizer step, ~{short(seconds * total_steps)} for "
            f"{plural(total_steps, 'step')} (estimated: {flop} FLOP per step at the {what} of "
            f"{flop_rate / 1e9:,.0f} GFLOP/s, plus each op's overhead and the memory traffic, measured here); "
            "measured after the first steps")


def nothing_to_train(run: Run) -> str | None:
    """What to say when a resumed run has no step left (None when it has): at which step it is, and
    how to train it further."""
    t, st = run.cfg.train, run.state
    if not (st.epoch >= t.epochs or (t.max_steps and st.global_step >= t.max_steps)):
        return None
    limit = (f"train.max_steps={t.max_steps:,}" if t.max_steps and st.global_step >= t.max_steps
             else f"train.epochs={t.epochs}")
    return (f"nothing to train: the run is already at step {st.global_step:,} of {run.total_steps:,} ({limit}); to "
            "train it further, resume with a higher --max_steps or --epochs (and --resume auto)")


def summary(result: Any, directory: str) -> list[str]:
    """The closing lines: losses, where the checkpoints are, and what to run next."""
    lines = []
    finite = [v for v in [*result.val_losses, result.best_val_loss] if isinstance(v, float) and math.isfinite(v)]
    if finite:
        lines.append(f"best validation loss {min(finite):.4f} (perplexity {perplexity(min(finite)):.3f})")
    best = result.best_checkpoint or (result.checkpoints[-1] if result.checkpoints else None)
    if best:
        lines.append(f"checkpoints in {directory}; next:")
        lines.append(f"  sab-omni generate --checkpoint {best} --prompt \"...\"")
        lines.append(f"  sab-omni eval --checkpoint {best}")
        lines.append(f"  sab-omni plot {directory}")
    return lines


# ------------------------------------------------------------------------------- the run's start
def banner_lines(run: Run, notes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The start banner: (key, text) lines; ``notes`` (which recipe, which weights) come before the time."""
    import torch

    from sab_byon_omni.machine import device_name

    m, d, t, info = run.cfg.model, run.cfg.data, run.cfg.train, run.info
    n = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    base = str(run.model.blocks[0].attn.qkv.weight.dtype).removeprefix("torch.") if t.lora_rank else ""
    eff = t.batch_size * t.gradient_accumulation_steps * info.world
    start = f"resuming from {run.resume_from} (step {run.state.global_step:,})" if run.resume_from else "new run"
    return [
        ("run folder", f"{run.checkpointer.dir} ({start})"),
        ("data", f"{d.dataset}: {data_summary(run.train_data, run.val_data)}"),
        ("tokenizer", f"{run.tokenizer.name}, {run.tokenizer.vocab_size:,} ids"),
        ("model", f"{model_label(run.cfg)}: hidden {m.hidden}, {m.n_layers} layers, {m.n_heads} heads, FFN {m.ffn}"
                  + "".join(f", {part}" for part in (*architecture_on(m), *levers_on(m))) + f"; {n:,} parameters" + (f" (the name '3b' is historical: {fmt_count(n)})" if m.preset == "3b" else "")
                  + (f"; LoRA rank {t.lora_rank} on {t.lora_targets}: {trainable:,} trainable, the rest frozen"
                     + (f" (projections held in {base})" if base != "float32" else "") if t.lora_rank else "")),
        ("device", f"{run.device} ({device_name(run.device)}), {run.precision.name}, "
                   f"{run.threads.describe() if run.threads else plural(torch.get_num_threads(), 'thread')}, {plural(info.world, 'process', 'processes')}"
                   + (" with FSDP" if run.fsdp else "")),
        ("batch", f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation"
                  + (f" x {info.world} processes" if info.enabled else "")
                  + f" = {eff} samples per optimizer step (up to {eff * d.seq_len:,} tokens)"),
        ("steps", f"{run.steps_per_epoch:,} per epoch x {plural(t.epochs, 'epoch')}"
                  + (f", stopping at step {t.max_steps:,}" if t.max_steps and t.max_steps == run.total_steps else
                     f" (train.max_steps={t.max_steps:,} is never reached: the epochs end first)" if t.max_steps else "")
                  + f": {run.total_steps:,} optimizer steps"),
        ("schedule", (f"Muon peak lr {t.muon_learning_rate:g} for the blocks' matrices after "
                      f"{t.muon_warmup_steps} warmup steps, " if t.optimizer == "muon" else "")
                     + f"AdamW peak lr {t.learning_rate:g}" + (" for the rest" if t.optimizer == "muon" else "")
                     + (f" after {t.warmup_steps} warmup steps" if t.warmup_steps else "") + f", {t.lr_schedule}"
                     + f", weight decay {t.weight_decay:g}, clip {t.max_grad_norm:g}"),
        *([("", slow)] if (slow := _slow_rate(run)) and d.dataset == "synthetic" else []),
        ("memory", run.memory.describe() + _process_memory(run.device)),
        ("validation", validation_plan(run)),
        *notes,
        ("time", start_time(run)),
    ]


def from_scratch_warnings(run: Run) -> list[str]:
    """For a fresh model (no checkpoint, no ``init_from``): a rate the sweep showed to learn
    slowly (on your own data; on the synthetic data it is the guide's choice, which the banner
    mentions), or too few optimizer steps to learn much (docs/RECIPES.md)."""
    t = run.cfg.train
    if not _fresh(run):
        return []
    capped = bool(t.max_steps) and t.max_steps == run.total_steps
    slow = None if run.cfg.data.dataset == "synthetic" else _slow_rate(run)
    return [w for w in (slow, too_few_steps(run.total_steps, capped)) if w]


def _fresh(run: Run) -> bool:
    return run.resume_from is None and not run.cfg.train.init_from


def _slow_rate(run: Run) -> str | None:
    t = run.cfg.train
    tokens = t.batch_size * t.gradient_accumulation_steps * run.info.world * run.cfg.data.seq_len
    return learns_slowly(t.learning_rate, run.cfg.model, tokens) if _fresh(run) else None


def validation_plan(run: Run) -> str:
    t, val = run.cfg.train, run.val_data
    if val is None or not len(val):
        return "none (no validation data, so no best_model.pt)"
    every = {0: "", 1: "every step, "}.get(t.eval_interval, f"every {t.eval_interval:,} steps, ")
    when = every + "at each epoch's end and at the last step"
    on = (f"the first {t.eval_batches:,} batch{'es' if t.eval_batches > 1 else ''} of {t.batch_size}"
          if t.eval_batches else "all")
    return f"{when}, on {on} of {len(val):,} samples; the best so far is saved as best_model.pt"


def _process_memory(device: torch.device) -> str:
    """On a CPU the estimate counts the run's tensors; the process (torch's libraries, the data, the
    model already built) holds memory of its own, which the peak RSS that ``bench`` reports includes."""
    if device.type != "cpu":
        return ""
    from sab_byon_omni.training.memory import peak_memory_mb

    return f"; this process holds {peak_memory_mb(device):,.0f} MB already (torch, the data, the model)"


def levers_on(m: Any) -> list[str]:
    """The speed-run options of the model that are on (docs/RECIPES.md, "Time to quality"), by name."""
    on = [name for name in ("qk_norm", "zero_init_proj", "value_embed", "unet_skips") if getattr(m, name)]
    if m.mlp == "relu2":
        on.append("mlp relu2")
    if m.logit_softcap:
        on.append(f"logit_softcap {m.logit_softcap:g}")
    if m.document_mask_id is not None:
        on.append(f"document_mask_id {m.document_mask_id}")
    return on


def architecture_on(m: Any) -> list[str]:
    """The architecture options that differ from the SAB model's (an open model's: RMSNorm, SwiGLU,
    grouped-query heads...), in a few words each."""
    on = ["RMSNorm"] if m.norm == "rmsnorm" else []
    on += ["SwiGLU"] if m.mlp == "swiglu" else []
    on += [f"{m.kv_heads} key/value head{'s' * (m.kv_heads != 1)}"] if m.kv_heads != m.n_heads else []
    on += ["learned positions"] if m.positions == "learned" else []
    on += ["parallel residual"] if m.parallel_residual else []
    return on


def model_label(cfg: Any) -> str:
    """The model's name in the banner: its preset when it is one (the preset's five dimensions, our
    own family), else ``custom (family llama, from SmolLM2-135M-Instruct.Q4_1.gguf)``."""
    from pathlib import Path

    from sab_byon_omni.config import PRESET_FIELDS, PRESETS

    m = cfg.model
    if m.family == "sab" and all(getattr(m, k) == PRESETS[m.preset][k] for k in PRESET_FIELDS):
        return m.preset
    source = cfg.train.init_from
    return f"custom (family {m.family}" + (f", from {Path(source).name or source}" if source else "") + ")"


def start_time(run: Run) -> str:
    """The ``time:`` banner line before the first step: one optimizer step (this process's share)
    from the estimator's FLOPs and per-step costs, at this device's measured rates."""
    import torch

    from sab_byon_omni.machine import busy_machine

    m, t, name = run.cfg.model, run.cfg.train, run.precision.name
    later = "measured after the first steps"
    if nothing_to_train(run):
        return "no step left to train"
    targets = predicted_tokens(run.train_data)
    mean = targets / len(run.train_data) if targets and len(run.train_data) else run.cfg.data.seq_len - 1
    try:
        est = estimate(m, seq_len=max(2, round(mean) + 1), micro_batch=t.batch_size, precision=name,
                       gpus=run.info.world, parallel="fsdp" if run.fsdp else "ddp", device=run.device.type)
        rate = _matmul_rate(name, str(run.device), torch.get_num_threads())
        op_s, bandwidth = _op_costs(str(run.device), torch.get_num_threads())
    except (SabError, RuntimeError, KeyError):
        return later
    if not rate > 0:
        return later
    flops = est.hardware_flops_per_token * mean * t.batch_size * t.gradient_accumulation_steps
    seconds = step_seconds(m, mean * t.batch_size, t.gradient_accumulation_steps, flops, rate, op_s, bandwidth,
                           PRECISION_BYTES[name])
    busy = busy_machine() if run.device.type == "cpu" else ""
    return (start_estimate(seconds, flops, rate, run.total_steps - run.state.global_step,
                           f"measured {name} matmul rate") + (f"; {busy}" if busy else ""))


@functools.lru_cache(maxsize=8)
def _op_costs(device: str, threads: int) -> tuple[float, float]:
    """Seconds per eager op and elementwise bytes per second here, measured once per process (~0.15 s)."""
    import torch

    from sab_byon_omni.machine import measure_op_costs

    return measure_op_costs(torch.device(device))


@functools.lru_cache(maxsize=8)
def _matmul_rate(precision: str, device: str, threads: int) -> float:
    """This device's square-matmul FLOP/s in ``precision``, measured once per process (~0.5 s)."""
    import torch

    from sab_byon_omni.device import DTYPES
    from sab_byon_omni.machine import measure_matmul_peak

    dev = torch.device(device)
    sizes = (1024, 2048, 4096) if dev.type == "cuda" else (256, 512, 1024)
    return measure_matmul_peak(DTYPES[precision], dev, budget_s=0.4, sizes=sizes)


def oom_message(run: Run, step: int) -> str:
    """What to do when step ``step + 1`` ran out of memory: a smaller micro-batch, the same effective batch."""
    import torch

    t = run.cfg.train
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    smaller, more = max(t.batch_size // 2, 1), t.gradient_accumulation_steps * (2 if t.batch_size > 1 else 1)
    return (f"out of memory on {run.device} at step {step + 1} with train.batch_size={t.batch_size}: use a smaller "
            f"batch with more accumulation, e.g. --batch_size {smaller} --gradient_accumulation_steps {more} "
            "(same effective batch), or --activation_checkpointing true or a shorter --seq_len; "
            "--resume auto continues from the last checkpoint")
