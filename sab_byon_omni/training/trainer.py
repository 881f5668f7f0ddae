"""The training loop. It reads one :class:`~sab_byon_omni.training.build.Run`, built once before
the first step, and hands each decision to a named part:

* :mod:`.build`         the run: device, processes, precision, memory plan, model, optimizer, resume;
* :mod:`.optim`         the optimizer and the learning-rate schedule (a pure function of the step);
* :mod:`.memory`        will it fit, and the micro-batch that does;
* :mod:`.distributed`   torchrun: DDP or FSDP2, and the few collectives;
* :mod:`.state`         the parts with state: ``TrainState`` (where the run is), the random generators, the schedule;
* :mod:`.checkpointer`  the checkpoint (a composition of the parts), validation, the resume point, pruning;
* :mod:`.metrics`       the rows of ``metrics.jsonl`` and the trackers;
* :mod:`.console`       what the person watching sees;
* :mod:`.signals`       Ctrl-C and SIGTERM.

One optimizer step sums the loss over the real tokens of its whole accumulation window (all
processes), so ``batch_size x gradient_accumulation_steps`` equals one big batch, exactly.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sab_byon_omni.config import RunConfig
from sab_byon_omni.data.batching import Batch, TokenDataset, iterate_batches, regroup
from sab_byon_omni.device import Precision
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import fmt_duration
from sab_byon_omni.evaluation import sample_loss
from sab_byon_omni.loss import model_loss
from sab_byon_omni.training import console
from sab_byon_omni.training import distributed as D
from sab_byon_omni.training.build import Run
from sab_byon_omni.training.checkpointer import CheckpointMeta
from sab_byon_omni.training.memory import peak_memory_mb, peak_reserved_mb
from sab_byon_omni.training.metrics import EpochRow, EvalRow, StepRow
from sab_byon_omni.training.optim import lr_at, lr_names
from sab_byon_omni.training.signals import StopRequest, signal_name
from sab_byon_omni.training.state import TrainState

log = logging.getLogger(__name__)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def evaluate(model: nn.Module, data: TokenDataset, batch_size: int, pad_id: int, precision: Precision,
             info: D.DistInfo = D.DistInfo(), max_batches: int = 0) -> float:
    """Mean loss per predicted token over ``data`` (all of it unless ``max_batches``), all processes."""
    total, count = sample_loss(model, data, batch_size, pad_id, precision.device, precision.autocast(), max_batches,
                               info.world, info.rank)
    loss_sum, n = D.all_reduce_sum([total.item(), float(count)], info, precision.device)
    return loss_sum / max(n, 1.0)


@dataclass
class TrainResult:
    """What a run produced: per-epoch mean losses, the files written, and throughput."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    best_checkpoint: str | None = None
    global_step: int = 0
    tokens: int = 0  # predicted tokens trained on in this process's run, all processes together
    seconds: float = 0.0
    skipped_steps: int = 0
    stopped_early: bool = False  # a signal (Ctrl-C, SIGTERM) stopped the run; it saved first
    stop_signal: int | None = None
    best_val_loss: float | None = None  # the lowest validation loss so far (best_model.pt's), if any
    last_loss: float | None = None  # the last logged training loss (a run ended inside an epoch has no epoch mean)
    start_step: int = 0  # the step the run started from (a resumed run's checkpoint's)
    config: RunConfig | None = None  # the config the run used: the memory plan may have changed its micro-batch

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # nats over this process's predicted tokens (on the device: no sync)
    local_tokens: int  # this process's predicted tokens
    tokens: int  # all processes' predicted tokens
    grad_norm: float  # non-finite: the step was skipped


class _Sums:
    """A running loss sum (a device tensor, so adding costs no sync) and its token count."""

    def __init__(self, device: torch.device, loss: float = 0.0, tokens: int = 0) -> None:
        self.loss = torch.tensor(loss, dtype=torch.float64, device=device)
        self.tokens = tokens

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens

    def global_totals(self, info: D.DistInfo) -> tuple[float, int]:
        s, n = D.all_reduce_sum([self.loss.item(), float(self.tokens)], info, self.loss.device)
        return s, int(n)

    def global_mean(self, info: D.DistInfo) -> float:
        s, n = self.global_totals(info)
        return s / n if n else math.nan


class _LogWindow:
    """The steps since the last metrics row: their losses, how many, since when, the last gradient norm."""

    def __init__(self, device: torch.device, loss: float = 0.0, tokens: int = 0, steps: int = 0) -> None:
        self.sums, self.t0, self.steps, self.last_norm = _Sums(device, loss, tokens), time.perf_counter(), steps, math.nan
        self.restored = tokens  # tokens of a resumed row trained before the resume (not in this process's speed)


class Trainer:
    """Trains the model of ``run`` (built by :func:`~sab_byon_omni.training.build.build_run`),
    reading the run and owning no copy of it: :meth:`fit` runs the loop; :meth:`train_step` is one
    optimizer step (what ``sab-omni bench`` times). ``notes``: (key, text) lines for the start banner
    (which recipe, which weights); ``resume_hint``: how the caller continues a stopped run."""

    def __init__(self, run: Run, notes: list[tuple[str, str]] | None = None,
                 resume_hint: str = 'continue with resume="auto"') -> None:
        self.run = run
        self.notes, self.resume_hint = list(notes or []), resume_hint
        # a second Ctrl-C inside a long torch call ends the process: a new folder with no checkpoint goes too
        self.stop = StopRequest(self._stop_message, on_hard_exit=run.checkpointer.remove_if_unused)
        self.agreed_stop = False  # under torchrun: a stop request every process knows of (from the last step)
        self.saved_step: int | None = None  # the step of the newest step checkpoint this run wrote
        self.clock = console.Clock(run.total_steps)  # measures from the end of the first step on
        self.window = _LogWindow(run.device)
        self.last_loss: float | None = None  # of the last metrics row
        self.wait_limit: datetime.timedelta | None = None  # under torchrun: collectives' limit after the first step

    @property
    def state(self) -> TrainState:
        return self.run.state

    @property
    def raw(self) -> nn.Module:
        """The model trained (``run.model``; ``run.wrapped`` is what the forward pass runs)."""
        return self.run.model

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This process's micro-batches of ``epoch`` from global cursor ``start``."""
        run = self.run
        t, d = run.cfg.train, run.cfg.data
        return iterate_batches(run.train_data, t.batch_size, pad_id=run.tokenizer.pad_id, epoch=epoch,
                               seed=d.data_seed, shuffle=d.shuffle, start=start, world=run.info.world,
                               rank=run.info.rank, bucket=d.length_bucket_size)

    # ------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` epochs (or ``train.max_steps``), from where the run was built to start."""
        run, st = self.run, self.run.state
        console.ensure_visible()
        if run.info.is_main:
            if console.log.isEnabledFor(logging.INFO):  # (its time estimate measures the device: not for -q)
                console.banner(console.banner_lines(run, self.notes))
            for warning in console.from_scratch_warnings(run):
                log.warning("%s", warning)
        result = TrainResult(train_losses=st.train_losses, val_losses=st.val_losses, config=run.cfg,
                             start_step=st.global_step)
        if run.info.is_main and (done := console.nothing_to_train(run)):
            log.info("%s", done)
        start = time.perf_counter()
        failed = True
        try:
            with self.stop, self._out_of_memory_as_error():
                while st.epoch < run.cfg.train.epochs and not self._should_stop():
                    self._run_epoch(result)
            failed = False
        finally:
            run.close(failed=failed)
        result.seconds = time.perf_counter() - start
        result.global_step, result.skipped_steps = st.global_step, st.skipped_steps
        result.stopped_early, result.stop_signal = self.stop.requested, self.stop.signum
        result.last_loss = self.last_loss
        best = run.checkpointer.path("best_model")
        result.best_checkpoint = str(best) if best.exists() else None
        result.best_val_loss = st.best_val_loss if math.isfinite(st.best_val_loss) else None
        if run.info.is_main:
            for line in console.summary(result, str(run.checkpointer.dir)):
                log.info("%s", line)
        return result

    def _should_stop(self) -> bool:
        return self._stopping() or self._at_max_steps()

    def _stopping(self) -> bool:
        """A signal asked to stop (under torchrun: one that every process knows of, so that all stop
        at the same step and take part in the same collectives)."""
        return self.agreed_stop if self.run.info.enabled else self.stop.requested

    def _at_max_steps(self) -> bool:
        t = self.run.cfg.train
        return bool(t.max_steps and self.state.global_step >= t.max_steps)

    def _run_epoch(self, result: TrainResult) -> None:
        run, st, t = self.run, self.run.state, self.run.cfg.train
        done = round(st.cursor / (t.batch_size * run.info.world * t.gradient_accumulation_steps))
        bar = console.progress_bar(run.steps_per_epoch, done, f"epoch {st.epoch + 1}/{t.epochs}",
                                   run.info.is_main and t.progress)
        epoch_sums = _Sums(run.device, st.epoch_loss_sum, st.epoch_tokens)
        self.window = _LogWindow(run.device, st.log_loss_sum, st.log_tokens, st.log_steps)  # a resumed row's start
        st.log_loss_sum, st.log_tokens, st.log_steps = 0.0, 0, 0
        run.wrapped.train()
        batches = self.epoch_batches(st.epoch, st.cursor)
        finished = True
        while window := list(itertools.islice(batches, t.gradient_accumulation_steps)):
            out = self.train_step(window)
            if out is None:  # stopped between micro-batches: the state is as before this window
                finished = False
                break
            self._record(out, window, epoch_sums, result)
            bar.update(1)
            self._after_step(epoch_sums, bar)
            if self._should_stop():  # a signal: a step checkpoint, even at an epoch's end; train.max_steps
                finished = not self._stopping() and self._epoch_ends()  # at an epoch's end: that epoch is done
                break
        bar.close()
        self._flush_log(bar)
        if finished:
            self._end_epoch(epoch_sums, result)
        else:
            self._save_stop(epoch_sums, result)

    def _record(self, out: StepOutput, window: list[Batch], sums: _Sums, result: TrainResult) -> None:
        st = self.state
        st.global_step += 1
        st.cursor = window[-1].cursor
        if math.isfinite(out.grad_norm):  # a skipped (non-finite) step stays out of the loss means
            sums.add(out.loss_sum, out.local_tokens)
            self.window.sums.add(out.loss_sum, out.local_tokens)
        self.window.last_norm = out.grad_norm
        self.window.steps += 1
        result.tokens += out.tokens
        self.clock.step_done(st.global_step, out.tokens)

    def _after_step(self, epoch_sums: _Sums, bar: Any) -> None:
        """The cadence of logging, evaluation and step checkpoints, in one place. A validation comes
        every ``eval_interval`` steps and at the last step of a run that ``max_steps`` ends (an epoch's
        end validates in :meth:`_end_epoch`), not after a signal: a stop should be quick."""
        run, st, t = self.run, self.run.state, self.run.cfg.train
        step = st.global_step
        if self.wait_limit is None and run.info.enabled:  # the first step is done: a hang shows sooner now
            self.wait_limit = D.wait_limits().step
            D.set_wait_limit(self.wait_limit, run.info)
            if run.info.is_main:
                log.info("collectives now wait at most %s for a process (%s; saves wait up to %s)",
                         fmt_duration(self.wait_limit.total_seconds()), D.STEP_TIMEOUT_ENV,
                         fmt_duration(D.wait_limits().start.total_seconds()))
        if step % t.log_interval == 0 or self._at_max_steps():
            self._flush_log(bar)
        if run.info.is_main and self.clock.ready_to_announce():
            self.clock.announced = True
            log.info("%s", console.time_line(self.clock))
        epoch_ends = self._epoch_ends()  # its validation comes in _end_epoch
        interval = bool(t.eval_interval) and step % t.eval_interval == 0
        if run.val_data is not None and (interval or self._at_max_steps()) and not epoch_ends and not self._stopping():
            self._validate(epoch_sums)
        if t.save_every and step % t.save_every == 0:
            self._save_step(epoch_sums)

    def _epoch_ends(self) -> bool:
        """The step just taken was the epoch's last (as iterate_batches ends an epoch)."""
        return len(self.run.train_data) - self.state.cursor < self.run.info.world

    def _validate(self, epoch_sums: _Sums) -> None:
        """A validation inside an epoch: its row, and best_model.pt if it is the best so far (saved
        before any step checkpoint of this step, the resume point: a kill in between redoes both)."""
        st, step = self.state, self.state.global_step
        val = self.evaluate()
        self.run.metrics.write(EvalRow(step=step, epoch=st.epoch + 1, val_loss=val))
        if self.run.info.is_main:
            log.info("step %s: validation loss %.4f", f"{step:,}", val)
        if math.isfinite(val) and val < st.best_val_loss:
            st.best_val_loss = val
            self._save_step(epoch_sums, "best_model", val_loss=val)

    def _flush_log(self, bar: Any) -> None:
        """A metrics row (and a console line) over the steps since the last one, if any."""
        w = self.window
        if not w.steps:
            return
        run, st, t = self.run, self.run.state, self.run.cfg.train
        loss, n = w.sums.global_totals(run.info)
        loss = loss / n if n else math.nan
        self.last_loss = loss if math.isfinite(loss) else self.last_loss
        tps = (n - w.restored) / max(time.perf_counter() - w.t0, 1e-9)
        lr = lr_at(st.global_step - 1, t, run.total_steps)
        run.metrics.write(StepRow(step=st.global_step, epoch=st.epoch + 1, loss=loss, lr=lr, grad_norm=w.last_norm,
                                  tokens_per_s=tps, memory_mb=peak_memory_mb(run.device), skipped=st.skipped_steps,
                                  muon_lr=lr_at(st.global_step - 1, t, run.total_steps, muon=True)
                                  if t.optimizer == "muon" else None, reserved_mb=peak_reserved_mb(run.device)))
        if run.info.is_main:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
            log.info("%s", console.step_line(st.global_step, run.total_steps, st.epoch + 1, t.epochs, loss, lr, tps,
                                             self.clock.eta()))
        self.window = _LogWindow(run.device)

    def _end_epoch(self, epoch_sums: _Sums, result: TrainResult) -> None:
        run, st, t = self.run, self.run.state, self.run.cfg.train
        train_loss = epoch_sums.global_mean(run.info)
        val_loss = self.evaluate() if run.val_data is not None else math.nan
        if run.val_data is not None and t.eval_interval and st.global_step % t.eval_interval == 0:
            run.metrics.write(EvalRow(step=st.global_step, epoch=st.epoch + 1, val_loss=val_loss))  # one evaluation
        st.train_losses.append(train_loss)
        st.val_losses.append(val_loss)
        st.epoch, st.cursor, st.epoch_loss_sum, st.epoch_tokens = st.epoch + 1, 0, 0.0, 0
        # best_model.pt and the epoch's row before epoch_N.pt, the resume point: a run killed in between
        # resumes before this epoch's end and writes all three again (else best_model.pt could be missing)
        if math.isfinite(val_loss) and val_loss < st.best_val_loss:
            st.best_val_loss = val_loss
            self.save_checkpoint("best_model", loss=train_loss, val_loss=val_loss)
        run.metrics.write(EpochRow(step=st.global_step, epoch=st.epoch, train_loss=train_loss, val_loss=val_loss))
        path = self.save_checkpoint(f"epoch_{st.epoch}", loss=train_loss, val_loss=val_loss)
        result.checkpoints.append(str(path))
        if run.info.is_main:
            log.info("epoch %d/%d: train loss %.4f, validation loss %.4f, saved %s", st.epoch, t.epochs, train_loss,
                     val_loss, path)

    def _save_step(self, epoch_sums: _Sums, name: str = "", val_loss: float | None = None) -> Path:
        """Save the state inside an epoch: ``step_N`` unless ``name`` says otherwise (``best_model``)."""
        st = self.state
        st.epoch_loss_sum, st.epoch_tokens = self._owned(epoch_sums.global_totals(self.run.info))
        st.log_loss_sum, st.log_tokens = self._owned(self.window.sums.global_totals(self.run.info))
        st.log_steps = self.window.steps
        mean = st.epoch_loss_sum / st.epoch_tokens if st.epoch_tokens else math.nan
        path = self.save_checkpoint(name or f"step_{st.global_step}", loss=mean, val_loss=val_loss)
        st.log_loss_sum, st.log_tokens, st.log_steps = 0.0, 0, 0
        if not name:
            self.saved_step = st.global_step
        return path

    def _save_stop(self, epoch_sums: _Sums, result: TrainResult) -> None:
        """A signal or train.max_steps: keep the work done so far in a step checkpoint."""
        st = self.state
        path = self.run.checkpointer.path(f"step_{st.global_step}")
        if self.saved_step != st.global_step:
            path = self._save_step(epoch_sums)
        result.checkpoints.append(str(path))
        if self.stop.requested and self.run.info.is_main:
            log.warning("stopped by %s at step %s; saved %s (%s)", signal_name(self.stop.signum), f"{st.global_step:,}",
                        path, self.resume_hint)

    def _owned(self, totals: tuple[float, int]) -> tuple[float, int]:
        """The epoch's global sums are carried by the main process only (they are summed on resume)."""
        return totals if self.run.info.is_main else (0.0, 0)

    # ------------------------------------------------------------------------------- one step
    def train_step(self, window: list[Batch]) -> StepOutput | None:
        """One optimizer step over an accumulation window. ``None`` if a stop request arrived
        between its micro-batches (single process only): the gradients and the random state are
        then reset to the window's start, so a resume redoes this step exactly."""
        run = self.run
        rng = run.rng.state_dict() if not run.info.enabled and run.cfg.model.dropout > 0 else None
        done = self.forward_backward(window)
        if done is None:
            run.optimizer.zero_grad(set_to_none=True)
            if rng is not None:
                run.rng.load_state_dict(rng)
            return None
        loss_sum, local = done
        norm = self.optimizer_step()
        return StepOutput(loss_sum, local, sum(b.global_targets for b in window), norm)

    def forward_backward(self, window: list[Batch]) -> tuple[torch.Tensor, int] | None:
        """Forward and backward over one accumulation window. The loss is summed per token and
        divided by the real tokens of the whole window on all processes (known from the data: no
        collective, no host synchronisation), so the gradient equals that of one big batch. That
        makes the micro-batches an execution detail: the memory plan may regroup the window's
        samples into fewer, larger passes (``MemoryPlan.pass_rows``), the same step up to rounding."""
        run = self.run
        scale = run.info.world / max(sum(b.global_targets for b in window), 1)  # DDP averages over ranks
        total = torch.zeros((), dtype=torch.float64, device=run.device)
        passes = regroup(window, run.memory.pass_rows, run.memory.pass_positions, run.tokenizer.pad_id,
                         run.info.world, run.cfg.train.batch_size)
        for i, batch in enumerate(passes):
            if i and self.stop.requested and not run.info.enabled:
                return None
            batch = batch.to(run.device)
            with D.no_sync(run.wrapped, skip=i < len(passes) - 1), run.precision.autocast():
                loss_sum = model_loss(run.wrapped, batch.input_ids, batch.labels)
            run.scaler.scale(loss_sum * scale).backward()
            total += loss_sum.detach().double()
        return total, sum(b.n_targets for b in window)

    def optimizer_step(self) -> float:
        """Unscale, clip, step (or skip a non-finite step), set the schedule's next step. Returns the
        gradient norm. One host synchronisation per optimizer step: the norm (with, under
        torchrun, every process's stop request, so that all stop at the same step)."""
        run, st, t = self.run, self.run.state, self.run.cfg.train
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        norm_value, stop = D.agree(D.full_value(norm), self.stop.requested, run.info)
        if stop and not self.stop.requested:
            self.stop.signum = stop
        self.agreed_stop = bool(stop)
        if math.isfinite(norm_value):
            run.scaler.step(run.optimizer)
            st.skipped_in_a_row = 0
        else:
            self._skip_step()
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.schedule.set_step(st.global_step + 1)
        return norm_value

    def _skip_step(self) -> None:
        run, st, t = self.run, self.run.state, self.run.cfg.train
        st.skipped_steps += 1
        st.skipped_in_a_row += 1
        fp16_calibrating = run.precision.name == "fp16" and run.scaler.get_scale() >= 1.0
        log.warning("non-finite gradient at step %d: skipped (%d in a row)", st.global_step + 1, st.skipped_in_a_row)
        if st.skipped_in_a_row >= t.max_nonfinite_steps and not fp16_calibrating:
            raise SabError(f"{st.skipped_in_a_row} optimizer steps in a row had non-finite gradients; "
                           f"stopping without saving them (lower {lr_names(t)} or use fp32/bf16)")

    def evaluate(self) -> float:
        """Mean validation loss per predicted token (``train.eval_batches`` batches, or all)."""
        run, t = self.run, self.run.cfg.train
        return evaluate(run.wrapped, run.val_data, t.batch_size, run.tokenizer.pad_id, run.precision, run.info,
                        t.eval_batches)

    # ------------------------------------------------------------------------------- saving
    def save_checkpoint(self, name: str, loss: float, val_loss: float | None = None) -> Path:
        """Save checkpoint ``name`` (``step_7``, ``epoch_1``, ``best_model``) of the run's parts.
        Non-finite weights are never saved (every process checks its own shard)."""
        run = self.run
        if not D.all_finite(run.model, run.info, run.device, run.fsdp):
            raise SabError(f"the weights are non-finite at step {run.state.global_step}: not saving "
                           f"{name}{run.checkpointer.suffix} (earlier checkpoints are intact); lower "
                           f"{lr_names(run.cfg.train)} or use fp32")
        meta = CheckpointMeta(run.cfg.to_dict(), run.tokenizer.to_spec())
        with D.long_waits(run.info, self.wait_limit):  # rank 0 may write a big file while the others wait
            return run.checkpointer.save(name, run.parts(), meta, loss, val_loss)

    # ------------------------------------------------------------------------------- signals, memory
    def _stop_message(self, signum: int) -> str:
        where = ("after this micro-batch (the unfinished step is redone on resume)" if not self.run.info.enabled
                 else "at the end of this optimizer step")
        return (f"\n{signal_name(signum)}: stopping {where}, then saving a checkpoint; "
                "press Ctrl-C again to stop at once without saving")

    @contextlib.contextmanager
    def _out_of_memory_as_error(self) -> Iterator[None]:
        try:
            yield
        except _OOM:
            raise SabError(console.oom_message(self.run, self.state.global_step)) from None
        except RuntimeError as e:  # the CPU allocator's out-of-memory is a plain RuntimeError
            if "can't allocate memory" not in str(e):
                raise
            raise SabError(console.oom_message(self.run, self.state.global_step)) from None
