"""The training loop: accumulation normalised by real tokens, clipping, one precision policy, a
pure-function learning-rate schedule, evaluation, checkpoints, exact resume, rank-0 I/O."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import resource
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sab_byon_omni.config import RunConfig
from sab_byon_omni.data.batching import IGNORE_INDEX, Batch, TokenDataset, iterate_batches, micro_steps_per_epoch
from sab_byon_omni.data.tokenizers import Tokenizer, spec_equal
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import plan_memory
from sab_byon_omni.training import checkpoint as ckpt_io
from sab_byon_omni.training import distributed as D
from sab_byon_omni.training.precision import DTYPES, Precision, make_precision, resolve_device

log = logging.getLogger(__name__)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1 (the guide's shift), ignoring padding.

    Shifting the labels left (instead of slicing the logits) gives the same value without copying
    the logits.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def lr_at(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): a pure function, so resume is exact."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.learning_rate
    span = max(total_steps - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    floor = t.learning_rate * t.min_lr_ratio
    return floor + (t.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and the embedding); never norms or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    # Fused AdamW: one kernel per step. On CPU it measured 3.2x faster than foreach for Lightweight
    # (benchmarks/levers.py optimizer, docs/BENCHMARKS.md).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                             fused=fused or None, foreach=None if fused else True)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. Patches ``forward`` so state-dict keys do not change."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenDataset, batch_size: int, pad_id: int, precision: Precision,
             info: D.DistInfo = D.DistInfo(), max_batches: int = 0) -> float:
    """Mean loss per predicted token over ``data`` (all of it unless ``max_batches``)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=precision.device)
    count = 0
    batches = iterate_batches(data, batch_size, pad_id=pad_id, shuffle=False, world=info.world, rank=info.rank)
    for batch in itertools.islice(batches, max_batches or None):
        batch = batch.to(precision.device)
        with precision.autocast():
            total += causal_lm_loss(model(batch.input_ids), batch.labels).double()
        count += batch.n_targets
    model.train(was_training)
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
    tokens: int = 0
    seconds: float = 0.0
    skipped_steps: int = 0
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Trainer:
    """Trains ``model`` in place on ``train_data``; see :meth:`fit`."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train_data: TokenDataset,
                 val_data: TokenDataset | None, cfg: RunConfig) -> None:
        self.raw, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.train_data, self.val_data = train_data, val_data
        t = cfg.train
        self.device = resolve_device(t.device)
        self.info = D.init_distributed(self.device.type)
        if self.info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
        self.precision = make_precision(t.precision, self.device)
        self.fsdp = t.parallel == "fsdp" and self.info.enabled
        if self.fsdp and self.precision.name == "fp16":
            raise SabError("train.parallel=fsdp with precision fp16 needs a sharded gradient scaler, which is not "
                           "supported; use --precision bf16 (or fp32)")
        if t.check_memory or t.micro_batch_size == "auto":
            self.cfg = cfg = plan_memory(model, train_data, cfg, self.device, self.precision.name, self.info)
            t = cfg.train
        self.dir = Path(t.checkpoint_dir)
        self.resume_from = self._resume_path()  # validated before anything is written
        self.steps_per_epoch = math.ceil(
            micro_steps_per_epoch(len(train_data), t.batch_size, self.info.world) / t.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise SabError(f"the training set ({len(train_data)} samples) is too small for "
                           f"{self.info.world} process(es)")
        self.total_steps = t.max_steps or self.steps_per_epoch * t.epochs
        self._stop_signal: int | None = None
        self.skipped_total = self._skipped_in_a_row = 0

    # ----------------------------------------------------------------------------------- set-up
    def _resume_path(self) -> Path | None:
        spec = self.cfg.train.resume
        if spec == "none":
            existing = (ckpt_io.checkpoint_files(self.dir) + list(self.dir.glob("best_model.pt"))
                        + D.sharded_checkpoints(self.dir))
            if existing:
                raise SabError(f"{self.dir} already holds checkpoints ({existing[-1].name}); pass --resume auto "
                               "to continue that run, or choose another --checkpoint_dir")
            return None
        if spec == "auto":
            if self.fsdp:
                sharded = D.sharded_checkpoints(self.dir)
                return sharded[-1] if sharded else None
            return ckpt_io.latest_checkpoint(self.dir)
        if Path(spec).is_dir():
            D.read_sharded_meta(spec)  # fail early, with the directory named
            return Path(spec)
        if self.fsdp:
            raise SabError(f"train.resume={spec}: an FSDP run resumes from a sharded checkpoint directory "
                           "(*.dcp); resume this single-file checkpoint with --parallel ddp")
        ckpt_io.load_checkpoint(spec, mmap=True)  # fail early, with the file named (mapped: no full read)
        return Path(spec)

    def _setup(self) -> None:
        t = self.cfg.train
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.raw.to(self.device)
        if self.cfg.model.activation_checkpointing:
            apply_activation_checkpointing(self.raw)
        if self.fsdp:  # before the optimizer: fully_shard swaps in sharded parameters
            D.wrap_fsdp(self.raw, self.info, DTYPES.get(self.precision.name) if self.precision.name != "fp32" else None)
        self.optimizer = make_optimizer(self.raw, self.cfg, self.device)
        self.scaler = self.precision.scaler()
        self.model = self.raw if self.fsdp else D.wrap_ddp(self.raw, self.info, self.device)
        if t.compile:
            self.model = torch.compile(self.model)
        self.state = {"epoch": 0, "cursor": 0, "global_step": 0, "best_val_loss": math.inf,
                      "train_losses": [], "val_losses": []}
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.raw.fragmergent.set_step(self.state["global_step"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.state["global_step"], self.cfg, self.total_steps)
        n = sum(p.numel() for p in self.raw.parameters())
        if self.info.is_main:
            log.info("model: preset %s, %s parameters%s; device %s, precision %s, %d process(es)",
                     self.cfg.model.preset, f"{n:,}", _preset_note(self.cfg.model.preset, n), self.device,
                     self.precision.name, self.info.world)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SabError(f"cannot create train.checkpoint_dir {self.dir}: {e.strerror or e}") from None

    def _load(self, path: Path) -> None:
        sharded = path.is_dir()
        ck = D.read_sharded_meta(path) if sharded else ckpt_io.load_checkpoint(path)
        mine = self.cfg.to_dict()["model"]
        theirs = ck["config"].get("model", {}) if isinstance(ck["config"], dict) else {}
        arch = ("hidden", "n_heads", "n_layers", "ffn", "vocab_size", "tie_embeddings")
        if any(mine.get(k) != theirs.get(k) for k in arch):
            raise SabError(f"{path}: its model ({', '.join(f'{k}={theirs.get(k)}' for k in arch)}) differs from this run's")
        if "tokenizer" in ck and not spec_equal(ck["tokenizer"], self.tokenizer.to_spec()):
            raise SabError(f"{path}: its tokenizer ({ck['tokenizer'].get('name')}) differs from this run's "
                           f"({self.tokenizer.name})")
        try:
            if sharded:  # DCP reshards: any number of processes, FSDP or not
                D.load_sharded(path, self.raw, self.optimizer, no_dist=not self.info.enabled)
            else:
                self.raw.load_state_dict(ck["model_state_dict"])
            if "optimizer_state_dict" in ck:
                self.optimizer.load_state_dict(ck["optimizer_state_dict"])
            if ck.get("scaler_state_dict"):
                self.scaler.load_state_dict(ck["scaler_state_dict"])
            if "rng_state" in ck:
                ckpt_io.restore_rng(ck["rng_state"])
            data = ck.get("data_state", {"epoch": ck["epoch"], "cursor": 0})
            hist = ck.get("history", {})
            own = self.info.is_main  # the epoch sums are global: one rank carries them
            self.state.update(epoch=int(data["epoch"]), cursor=int(data["cursor"]), global_step=int(ck["global_step"]),
                              best_val_loss=ck.get("best_val_loss", math.inf),
                              epoch_loss_sum=float(data.get("epoch_loss_sum", 0.0)) if own else 0.0,
                              epoch_tokens=int(data.get("epoch_tokens", 0)) if own else 0,
                              train_losses=list(hist.get("train_loss", [])), val_losses=list(hist.get("val_loss", [])))
            self.skipped_total = int(data.get("skipped_steps", 0))  # the "skipped" metric carries on
            self._skipped_in_a_row = int(data.get("skipped_in_a_row", 0))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise SabError(f"{path}: cannot resume from it ({type(e).__name__}: {first})") from None
        if self.info.is_main:
            ckpt_io.remove_stale_temps(self.dir)
            _trim_metrics(self.dir / "metrics.jsonl", self.state["global_step"])
        if self.info.is_main:
            log.info("resumed from %s: epoch %d, step %d, sample %d of the epoch", path, data["epoch"] + 1,
                     ck["global_step"], data["cursor"])

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` epochs (or ``train.max_steps``), from a checkpoint if resuming."""
        self._setup()
        t, st = self.cfg.train, self.state
        result = TrainResult(train_losses=st["train_losses"], val_losses=st["val_losses"])
        self.metrics = _Metrics(self.dir, self.info.is_main, t.tensorboard)
        start = time.perf_counter()
        with _StopOnSignal(self):
            try:
                while st["epoch"] < t.epochs and not self._done(result):
                    self._run_epoch(result)
            except _OOM:
                raise SabError(self._oom_message()) from None
            except RuntimeError as e:  # the CPU allocator's out-of-memory is a plain RuntimeError
                if "can't allocate memory" not in str(e):
                    raise
                raise SabError(self._oom_message()) from None
        result.seconds = time.perf_counter() - start
        result.global_step = st["global_step"]
        best = self.dir / ("best_model.dcp" if self.fsdp else "best_model.pt")
        result.best_checkpoint = str(best) if best.exists() else None
        self.metrics.close()
        return result

    def _oom_message(self) -> str:
        t = self.cfg.train
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        smaller, more = max(t.batch_size // 2, 1), t.gradient_accumulation_steps * (2 if t.batch_size > 1 else 1)
        return (f"out of memory on {self.device} at step {self.state['global_step'] + 1} with train.batch_size="
                f"{t.batch_size}: use a smaller batch with more accumulation, e.g. --batch_size {smaller} "
                f"--gradient_accumulation_steps {more} (same effective batch), or --activation_checkpointing true "
                "or a shorter --seq_len; --resume auto continues from the last checkpoint")

    def _done(self, result: TrainResult) -> bool:
        return result.stopped_early or bool(self.cfg.train.max_steps and self.state["global_step"] >= self.cfg.train.max_steps)

    def _run_epoch(self, result: TrainResult) -> None:
        t, st, info = self.cfg.train, self.state, self.info
        epoch = st["epoch"]
        batches = self.epoch_batches(epoch, st["cursor"])
        done_steps = round(st["cursor"] / (t.batch_size * info.world * t.gradient_accumulation_steps))
        bar = _progress(self.steps_per_epoch, done_steps, f"epoch {epoch + 1}/{t.epochs}", info.is_main and t.progress)
        # the epoch's loss so far (global sums; restored on resume so the epoch mean is exact)
        epoch_loss = torch.tensor(st.get("epoch_loss_sum", 0.0), dtype=torch.float64, device=self.device)
        epoch_tokens = int(st.get("epoch_tokens", 0))
        log_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        log_tokens = 0
        log_t0 = time.perf_counter()
        self.model.train()
        while window := list(itertools.islice(batches, t.gradient_accumulation_steps)):
            loss_sum, n_tokens, grad_norm = self.train_step(window)
            st["global_step"] += 1
            st["cursor"] = window[-1].cursor
            if math.isfinite(grad_norm):  # a skipped (non-finite) step stays out of the loss means
                epoch_loss += loss_sum
                log_loss += loss_sum
                epoch_tokens += n_tokens
                log_tokens += n_tokens
            result.tokens += n_tokens
            bar.update(1)
            done_steps += 1
            step = st["global_step"]
            last = done_steps >= self.steps_per_epoch or self._stop_signal is not None or self._done(result)
            if step % t.log_interval == 0 or (last and log_tokens):
                loss = self._global_mean(log_loss, log_tokens)
                tps = log_tokens / (time.perf_counter() - log_t0)
                self.metrics.write(step=step, epoch=epoch + 1, loss=loss, lr=lr_at(step - 1, self.cfg, self.total_steps),
                                   grad_norm=grad_norm, tokens_per_s=tps * info.world,
                                   memory_mb=peak_memory_mb(self.device), skipped=self.skipped_total)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps * info.world:,.0f}")
                log_loss.zero_()
                log_tokens, log_t0 = 0, time.perf_counter()
            if t.eval_interval and step % t.eval_interval == 0 and self.val_data is not None:
                self.metrics.write(step=step, epoch=epoch + 1, val_loss=self._evaluate())
            saved = bool(t.save_every and step % t.save_every == 0)
            if saved:
                self._keep_epoch_sums(epoch_loss, epoch_tokens)
                self._save(self.dir / f"step_{step}.pt", loss=self._global_mean(epoch_loss, epoch_tokens))
                if info.is_main:
                    ckpt_io.prune_step_checkpoints(self.dir, t.keep_last)
            if self._stop_signal is not None or self._done(result):
                result.stopped_early = self._stop_signal is not None
                path = self.dir / f"step_{step}{D.SHARDED_SUFFIX if self.fsdp else '.pt'}"
                if not saved:  # a signal or train.max_steps: keep the work done so far
                    self._keep_epoch_sums(epoch_loss, epoch_tokens)
                    self._save(path, loss=self._global_mean(epoch_loss, epoch_tokens))
                    if info.is_main:
                        ckpt_io.prune_step_checkpoints(self.dir, t.keep_last)
                result.checkpoints.append(str(path))
                if result.stopped_early:
                    log.warning("stopped by signal %d; saved %s (resume with --resume auto)", self._stop_signal, path)
                bar.close()
                return
        bar.close()
        result.skipped_steps = self.skipped_total
        train_loss = self._global_mean(epoch_loss, epoch_tokens) if epoch_tokens else float("nan")
        val_loss = self._evaluate() if self.val_data is not None else float("nan")
        st["train_losses"].append(train_loss)
        st["val_losses"].append(val_loss)
        st["epoch"], st["cursor"] = epoch + 1, 0
        st["epoch_loss_sum"], st["epoch_tokens"] = 0.0, 0
        path = self._save(self.dir / f"epoch_{epoch + 1}.pt", loss=train_loss, val_loss=val_loss)
        result.checkpoints.append(str(path))
        if math.isfinite(val_loss) and val_loss < st["best_val_loss"]:
            st["best_val_loss"] = val_loss
            self._save(self.dir / "best_model.pt", loss=train_loss, val_loss=val_loss)
        self.metrics.write(step=st["global_step"], epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss)
        if info.is_main:
            log.info("epoch %d/%d: train loss %.4f, validation loss %.4f, saved %s", epoch + 1, t.epochs,
                     train_loss, val_loss, path)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This process's micro-batches of ``epoch`` from global cursor ``start``."""
        t, d = self.cfg.train, self.cfg.data
        return iterate_batches(self.train_data, t.batch_size, pad_id=self.tokenizer.pad_id, epoch=epoch,
                               seed=d.data_seed, shuffle=d.shuffle, start=start, world=self.info.world,
                               rank=self.info.rank, bucket=d.length_bucketing)

    def train_step(self, window: list) -> tuple[torch.Tensor, int, float]:
        """One optimizer step over an accumulation window: (loss sum as a tensor, this rank's target
        tokens, gradient norm). ``sab-omni bench`` times exactly this."""
        loss_sum, n_tokens = self._accumulate(window)
        return loss_sum, n_tokens, self._optimizer_step()

    def _accumulate(self, window: list) -> tuple[torch.Tensor, int]:
        """Forward and backward over one accumulation window. The loss is summed per token and
        divided by the real tokens of the whole window on all ranks, so the gradient equals that of
        one big batch. No host synchronisation happens here."""
        local = sum(b.n_targets for b in window)
        n_tokens = int(D.all_reduce_sum([float(local)], self.info, self.device)[0]) if self.info.enabled else local
        scale = self.info.world / max(n_tokens, 1)  # DDP averages gradients over ranks
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(window):
            batch = batch.to(self.device)
            with D.no_sync(self.model, skip=i < len(window) - 1), self.precision.autocast():
                loss_sum = causal_lm_loss(self.model(batch.input_ids), batch.labels)
            self.scaler.scale(loss_sum * scale).backward()
            total += loss_sum.detach().double()
        return total, local

    def _optimizer_step(self) -> float:
        """Unscale, clip, step (or skip a non-finite step), update the schedule. Returns the grad norm."""
        t = self.cfg.train
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        norm_value = float(D.full_value(norm))  # one host sync per optimizer step
        if math.isfinite(norm_value):
            self.scaler.step(self.optimizer)
            self._skipped_in_a_row = 0
        else:
            self.skipped_total += 1
            self._skipped_in_a_row += 1
            fp16_calibrating = self.precision.name == "fp16" and self.scaler.get_scale() >= 1.0
            log.warning("non-finite gradient at step %d: skipped (%d in a row)", self.state["global_step"] + 1,
                        self._skipped_in_a_row)
            if self._skipped_in_a_row >= t.max_nonfinite_steps and not fp16_calibrating:
                raise SabError(f"{self._skipped_in_a_row} optimizer steps in a row had non-finite gradients; "
                               "stopping without saving them (lower train.learning_rate or use fp32/bf16)")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        next_step = self.state["global_step"] + 1
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(next_step, self.cfg, self.total_steps)
        self.raw.fragmergent.set_step(next_step)
        return norm_value

    def _keep_epoch_sums(self, loss_sum: torch.Tensor, n_tokens: int) -> None:
        """Store the epoch's global loss sum and token count so far, for the next checkpoint."""
        s, n = D.all_reduce_sum([loss_sum.item(), float(n_tokens)], self.info, self.device)
        self.state["epoch_loss_sum"], self.state["epoch_tokens"] = (s, int(n)) if self.info.is_main else (0.0, 0)

    def _global_mean(self, loss_sum: torch.Tensor, n_tokens: int) -> float:
        s, n = D.all_reduce_sum([loss_sum.item(), float(n_tokens)], self.info, self.device)
        return s / max(n, 1.0)

    def _evaluate(self) -> float:
        return evaluate(self.model, self.val_data, self.cfg.train.batch_size, self.tokenizer.pad_id,
                        self.precision, self.info, self.cfg.train.eval_batches)

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, path: Path, loss: float, val_loss: float | None = None) -> Path:
        st = self.state
        params = [D.local(p).detach() for p in self.raw.parameters()]
        finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if self.fsdp:  # every rank checks its own shard; all must agree before the collective save
            finite = D.all_reduce_sum([float(not finite)], self.info, self.device)[0] == 0
        if not finite:
            raise SabError(f"the weights are non-finite at step {st['global_step']}: not saving {path} "
                           "(earlier checkpoints are intact); lower train.learning_rate or use fp32")
        ck = {
            "format": ckpt_io.FORMAT,
            "epoch": st["epoch"],
            "loss": loss,
            "val_loss": val_loss,
            "global_step": st["global_step"],
            "config": self.cfg.to_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "scheduler_state_dict": {"name": self.cfg.train.lr_schedule, "step": st["global_step"],
                                     "total_steps": self.total_steps},
            "rng_state": ckpt_io.capture_rng(),
            "data_state": {"epoch": st["epoch"], "cursor": st["cursor"], "world_size": self.info.world,
                           "epoch_loss_sum": float(st.get("epoch_loss_sum", 0.0)),
                           "epoch_tokens": int(st.get("epoch_tokens", 0)),
                           "skipped_steps": self.skipped_total, "skipped_in_a_row": self._skipped_in_a_row},
            "tokenizer": self.tokenizer.to_spec(),
            "history": {"train_loss": list(st["train_losses"]), "val_loss": list(st["val_losses"])},
            "best_val_loss": st["best_val_loss"] if val_loss is None else min(st["best_val_loss"], val_loss),
            "torch_version": str(torch.__version__),
        }
        if self.fsdp:
            path = D.save_sharded(path.with_suffix(D.SHARDED_SUFFIX), self.raw, self.optimizer, ck, self.info)
            if self.info.is_main and path.name.startswith("step_"):
                D.prune_sharded_steps(self.dir, self.cfg.train.keep_last)
            return path
        ck["model_state_dict"] = self.raw.state_dict()
        ck["optimizer_state_dict"] = self.optimizer.state_dict()
        if self.info.is_main:
            ckpt_io.atomic_save(ck, path)
        D.barrier(self.info)
        return path


def _preset_note(preset: str, n: int) -> str:
    if preset == "3b":
        return f" (the name '3b' is historical: this preset has {n / 1e9:.2f}B parameters)"
    return ""


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows written after the checkpoint (steps a crash threw away, and
    a line cut short by it), so metrics.jsonl reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        log.info("metrics.jsonl: dropped %d row(s) after step %d (work lost with the interruption)", dropped, step)


class _Metrics:
    """metrics.jsonl (and TensorBoard, optionally) in the run directory, rank 0 only."""

    def __init__(self, directory: Path, enabled: bool, tensorboard: bool) -> None:
        self.path, self.enabled, self.tb = directory / "metrics.jsonl", enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SabError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(directory / "tb"))

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        row["time"] = time.time()
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full or read-only disk: stop with one line, checkpoints untouched
            raise SabError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.old: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.trainer._stop_signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
