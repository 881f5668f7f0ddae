"""Setting up a run, before the first step: device, processes, precision, the memory plan, the
model's wrapping, the optimizer, the resume point and the run folder.

Bad input is found here and reported as a SabError before anything is written; the run folder is
locked (one run per folder) before it is read, and removed again if this run created it and fails.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from sab_byon_omni.config import OPTIMIZERS, RunConfig
from sab_byon_omni.data.batching import micro_steps_per_epoch
from sab_byon_omni.data.tokenizers import Tokenizer, spec_equal
from sab_byon_omni.device import DTYPES, make_precision, resolve_device, set_deterministic
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.estimate import estimate, fmt_count
from sab_byon_omni.files import dcp
from sab_byon_omni.files.atomic import atomic_write_text
from sab_byon_omni.machine import device_name, give_back_freed_memory, measure_matmul_peak, set_freed_memory
from sab_byon_omni.training import distributed as D
from sab_byon_omni.training import trackers
from sab_byon_omni.training.checkpointer import LOCK_FILE, Checkpointer
from sab_byon_omni.training.console import data_summary, predicted_tokens, start_estimate
from sab_byon_omni.training.memory import (HEAP_REUSE_ROOM, apply_activation_checkpointing, keeps_freed_memory,
                                          peak_memory_mb, plan_memory)
from sab_byon_omni.training.metrics import METRICS_FILE, MetricsLog
from sab_byon_omni.training.optim import check_loaded_state, lr_names, make_optimizer, set_lr
from sab_byon_omni.training.recipe import learns_slowly, too_few_steps
from sab_byon_omni.training.state import TrainState, rank_rng, restore_rng

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
ARCH_KEYS = ("hidden", "n_heads", "n_layers", "ffn", "vocab_size", "tie_embeddings")


class RunSetup:
    """Everything a run needs before its first step, built in that order."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train_data: Any, cfg: RunConfig) -> None:
        self.raw, self.tokenizer, self.train_data = model, tokenizer, train_data
        self._place(cfg)
        self._plan_steps()
        self.tracker_names = trackers.check(self.cfg.train)  # a missing package: before anything is written
        t = self.cfg.train
        self.checkpointer = Checkpointer(t.checkpoint_dir, is_main=self.info.is_main, sharded=self.fsdp,
                                         keep_last=t.keep_last, barrier=lambda: D.barrier(self.info))
        self.created = not self.checkpointer.dir.exists()  # by this run: removed again if it fails before a save
        try:
            self.checkpointer.lock()
            self.resume_from, resumed = self._resume_point()
            self._build()
            self.state = TrainState()
            if self.resume_from is not None:
                self._restore(self.resume_from, resumed)
            self._sync_schedule()
            self._open_folder()
        except BaseException:
            self.close(failed=True)
            raise

    # ------------------------------------------------------------------------------- placement
    def _place(self, cfg: RunConfig) -> None:
        t = cfg.train
        self.device = resolve_device(t.device)
        self.info = D.init_distributed(self.device.type)
        if self.info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
        self.precision = make_precision(t.precision, self.device)
        self.fsdp = t.parallel == "fsdp" and self.info.enabled
        if self.fsdp and self.precision.name == "fp16":
            raise SabError("train.parallel=fsdp with precision fp16 needs a sharded gradient scaler, which is not "
                           "supported; use --precision bf16 on GPUs that have it (A100, H100, L4...), or --parallel "
                           "ddp with fp16 on older ones (T4, V100)")
        if t.parallel == "fsdp" and t.optimizer == "muon":
            raise SabError("train.optimizer=muon with train.parallel=fsdp is not supported (Muon orthogonalises whole "
                           "matrices, FSDP holds shards of them); use --parallel ddp, or --optimizer adamw")
        self.memory = plan_memory(self.raw, self.train_data, cfg, self.device, self.precision.name, self.info)
        self.cfg = self.memory.cfg
        # speed for memory only with room to spare (what keeps_freed_memory checks); process-wide
        self.allocator = ""
        if self.device.type == "cpu":
            keep = keeps_freed_memory(self.memory)
            self.allocator = set_freed_memory(keep) + ("" if keep else ": keeping freed memory needs room for "
                                                       f"{HEAP_REUSE_ROOM:g}x the estimated peak")

    def _plan_steps(self) -> None:
        t = self.cfg.train
        micro = micro_steps_per_epoch(len(self.train_data), t.batch_size, self.info.world)
        self.steps_per_epoch = math.ceil(micro / t.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise SabError(f"the training set ({len(self.train_data)} samples) is too small for "
                           f"{self.info.world} process(es)")
        self.total_steps = t.max_steps or self.steps_per_epoch * t.epochs

    def from_scratch_warnings(self) -> list[str]:
        """For a fresh model (no checkpoint, no ``init_from``): a rate the sweep showed to learn
        slowly (on your own data; on the synthetic data it is the guide's choice, which the banner
        mentions), or too few optimizer steps to learn much (docs/RECIPES.md)."""
        t = self.cfg.train
        if not self._fresh():
            return []
        capped = bool(t.max_steps) and t.max_steps == self.total_steps
        slow = None if self.cfg.data.dataset == "synthetic" else self._slow_rate()
        return [w for w in (slow, too_few_steps(self.total_steps, capped)) if w]

    def _fresh(self) -> bool:
        return self.resume_from is None and not self.cfg.train.init_from

    def _slow_rate(self) -> str | None:
        t = self.cfg.train
        tokens = t.batch_size * t.gradient_accumulation_steps * self.info.world * self.cfg.data.seq_len
        return learns_slowly(t.learning_rate, self.cfg.model, tokens) if self._fresh() else None

    def _build(self) -> None:
        t = self.cfg.train
        torch.manual_seed(t.seed)  # and Python's and numpy's generators, which checkpoints save as well
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        if t.deterministic:
            set_deterministic(self.device)
        meta = D.is_meta(self.raw)  # built on the meta device (FSDP): materialised after sharding
        if not meta:
            self.raw.to(self.device)
        self.raw.set_memory_saving(self.memory.memory_saving)
        if self.cfg.model.activation_checkpointing:
            apply_activation_checkpointing(self.raw)
        if self.fsdp:  # before the optimizer: fully_shard swaps in sharded parameters
            D.wrap_fsdp(self.raw, DTYPES[self.precision.name] if self.precision.name != "fp32" else None)
        if meta:
            D.materialize(self.raw, self.device, init_weights=self.resume_from is None)
        self.optimizer = make_optimizer(self.raw, t, self.device)
        self.scaler = self.precision.scaler()
        self.model = self.raw if self.fsdp else D.wrap_ddp(self.raw, self.info, self.device)
        if t.compile:
            self.model = torch.compile(self.model)

    # ------------------------------------------------------------------------------- resuming
    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from and its dict (tensors checked against their checksum)."""
        spec, ck = self.cfg.train.resume, self.checkpointer
        if spec == "none":
            ck.refuse_existing()
            return None, None
        if spec == "auto":
            newest = ck.read_newest()
            if newest is not None:
                return newest
            other = [p.name for p in ck.existing() if p.suffix in (".pt", dcp.SUFFIX) and p.suffix != ck.suffix]
            if other and not any(p.stem == "best_model" for p in map(Path, other)):
                kind = "sharded (FSDP)" if ck.suffix == ".pt" else "single-file"
                raise SabError(f"{ck.dir} holds only {kind} checkpoints ({other[-1]}); resume them with "
                               f"{'--parallel fsdp under torchrun, or sab-omni consolidate' if ck.suffix == '.pt' else '--parallel ddp'}")
            return None, None
        path = Path(spec)
        if self.fsdp and not dcp.is_sharded(path):
            raise SabError(f"train.resume={spec}: an FSDP run resumes from a sharded checkpoint directory "
                           "(*.dcp); resume this single-file checkpoint with --parallel ddp")
        return path, ck.read(path)  # fails early, with the file named

    def _restore(self, path: Path, ck: dict[str, Any]) -> None:
        self._check_compatible(ck, path)
        built = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            if dcp.is_sharded(path):  # DCP reshards: any number of processes, FSDP or not
                dcp.load(path, self.raw, self.optimizer, no_dist=not self.info.enabled)
                check_loaded_state(self.optimizer, built)
            else:
                self.raw.load_state_dict(ck["model_state_dict"])
                if "optimizer_state_dict" in ck:
                    self.optimizer.load_state_dict(ck["optimizer_state_dict"])
                    check_loaded_state(self.optimizer, built)
                elif self.info.is_main:  # weights only (an export, a consolidated file): documented, but say so
                    log.warning("%s holds no optimizer state: the optimizer starts fresh from its weights", path)
            if ck.get("scaler_state_dict"):
                self.scaler.load_state_dict(ck["scaler_state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise SabError(f"{path}: cannot resume from it ({type(e).__name__}: {first_line(e)})") from None
        if "rng_state" in ck:
            restore_rng(rank_rng(ck, self.info.rank, self.info.world), self.device, str(path))
        self.state = TrainState.from_checkpoint(ck, str(path), len(self.train_data))
        if not self.info.is_main:  # the epoch sums are global: one process carries them
            self.state.epoch_loss_sum, self.state.epoch_tokens = 0.0, 0
        self._check_schedule(ck.get("scheduler_state_dict"), path)
        if self.info.is_main:
            log.info("resumed from %s: epoch %d, step %s, sample %s of the epoch", path, self.state.epoch + 1,
                     f"{self.state.global_step:,}", f"{self.state.cursor:,}")

    def _check_compatible(self, ck: dict[str, Any], path: Path) -> None:
        mine, theirs = self.cfg.to_dict()["model"], ck["config"].get("model", {})
        theirs = theirs if isinstance(theirs, dict) else {}
        if any(mine.get(k) != theirs.get(k) for k in ARCH_KEYS):
            raise SabError(f"{path}: its model ({', '.join(f'{k}={theirs.get(k)}' for k in ARCH_KEYS)}) differs from "
                           f"this run's; resume with the run's own settings: --config {path.parent / CONFIG_FILE}")
        saved = ck["config"].get("train", {})
        theirs_opt = saved.get("optimizer", "adamw") if isinstance(saved, dict) else "adamw"
        if theirs_opt != self.cfg.train.optimizer:
            again = f"resume with --optimizer {theirs_opt}, or " if theirs_opt in OPTIMIZERS else ""
            raise SabError(f"{path}: it was trained with optimizer {bounded(theirs_opt)}, this run asks for "
                           f"{bounded(self.cfg.train.optimizer)}; {again}start a new run from its weights with "
                           f"--init_from {path}")
        spec = ck.get("tokenizer")
        if isinstance(spec, dict) and not spec_equal(spec, self.tokenizer.to_spec()):
            raise SabError(f"{path}: its tokenizer ({spec.get('name')}) differs from this run's ({self.tokenizer.name}); "
                           f"resume with the run's own settings: --config {path.parent / CONFIG_FILE}")

    def _check_schedule(self, sched: Any, path: Path) -> None:
        """Warn when the resumed run plans another length than the saved one (a cosine decay then
        follows the new plan from here on)."""
        if (isinstance(sched, dict) and sched.get("total_steps") not in (None, self.total_steps) and self.info.is_main
                and self.cfg.train.lr_schedule != "constant"):
            log.warning("%s was planned for %s optimizer steps, this run for %s: the learning-rate schedule follows "
                        "the new plan from here on", path.name, sched.get("total_steps"), f"{self.total_steps:,}")

    def _sync_schedule(self) -> None:
        self.raw.on_step(self.state.global_step)
        set_lr(self.optimizer, self.state.global_step, self.cfg.train, self.total_steps)

    # ------------------------------------------------------------------------------- the folder
    def _open_folder(self) -> None:
        ck = self.checkpointer
        if self.resume_from is not None and self.cfg.train.resume not in ("none", "auto"):
            ck.set_aside(ck.newer_than(self.state.global_step),
                         f"this run resumes from {self.resume_from} at step {self.state.global_step}, and --resume "
                         "auto would otherwise prefer them later", copies=(ck.dir / METRICS_FILE,))
        ck.clean()
        self.metrics = MetricsLog(ck.dir, self.info.is_main, trackers.open_all(self.tracker_names, ck.dir, self.cfg,
                                                                                self.info.is_main))
        self.metrics.reconcile(self.state.global_step)
        if self.info.is_main:
            text = (f"# The resolved configuration of this run. `sab-omni train --config {ck.dir / CONFIG_FILE}` "
                    "continues it.\n" + yaml.safe_dump({**self.cfg.to_dict(), "train": {**self.cfg.to_dict()["train"],
                                                                                         "resume": "auto"}},
                                                       sort_keys=False))
            atomic_write_text(ck.dir / CONFIG_FILE, text, what="config")

    def close(self, failed: bool = False) -> None:
        """Release the folder lock; after a failure, first remove the folder if this run created it
        and saved nothing in it. (The process group stays: a program may train again in it;
        ``sab-omni train`` leaves it when the run ends.)"""
        if hasattr(self, "checkpointer"):
            if failed and self.created and self.info.is_main:
                _remove_if_unused(self.checkpointer.dir)
            self.checkpointer.unlock()
        if getattr(self, "allocator", ""):
            give_back_freed_memory()  # the process need not hold the run's peak afterwards

    # ------------------------------------------------------------------------------- during the run
    def agree(self, norm: torch.Tensor, stop: bool) -> tuple[float, int]:
        """(gradient norm, a stop signal any process received or 0): one host sync, one tiny
        collective under torchrun so that every process stops at the same step."""
        if not self.info.enabled:
            return float(norm), 0
        import torch.distributed as dist

        flags = torch.stack([norm.detach().float().reshape(()), torch.tensor(float(stop), device=norm.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        value, any_stop = flags.tolist()
        return value, 15 if any_stop else 0  # SIGTERM: what torchrun sends

    def check_finite(self, name: str) -> None:
        """Refuse to save non-finite weights (every process checks its own shard)."""
        params = [D.local(p).detach() for p in self.raw.parameters()]
        finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if self.fsdp:
            finite = D.all_reduce_sum([float(not finite)], self.info, self.device)[0] == 0
        if not finite:
            raise SabError(f"the weights are non-finite at step {self.state.global_step}: not saving {name} "
                           f"(earlier checkpoints are intact); lower {lr_names(self.cfg.train)} or use fp32")

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.device)

    def oom_message(self, step: int) -> str:
        t = self.cfg.train
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        smaller, more = max(t.batch_size // 2, 1), t.gradient_accumulation_steps * (2 if t.batch_size > 1 else 1)
        return (f"out of memory on {self.device} at step {step + 1} with train.batch_size={t.batch_size}: use a smaller "
                f"batch with more accumulation, e.g. --batch_size {smaller} --gradient_accumulation_steps {more} "
                "(same effective batch), or --activation_checkpointing true or a shorter --seq_len; "
                "--resume auto continues from the last checkpoint")

    def banner_lines(self, notes: list[tuple[str, str]], val_data: Any) -> list[tuple[str, str]]:
        m, d, t = self.cfg.model, self.cfg.data, self.cfg.train
        n = sum(p.numel() for p in self.raw.parameters())
        eff = t.batch_size * t.gradient_accumulation_steps * self.info.world
        start = f"resuming from {self.resume_from} (step {self.state.global_step:,})" if self.resume_from else "new run"
        return [
            ("run folder", f"{self.checkpointer.dir} ({start})"),
            ("data", f"{d.dataset}: {data_summary(self.train_data, val_data)}"),
            ("tokenizer", f"{self.tokenizer.name}, {self.tokenizer.vocab_size:,} ids"),
            ("model", f"{m.preset}: hidden {m.hidden}, {m.n_layers} layers, {m.n_heads} heads, FFN {m.ffn}; "
                      f"{n:,} parameters" + (f" (the name '3b' is historical: {fmt_count(n)})" if m.preset == "3b" else "")),
            ("device", f"{self.device} ({device_name(self.device)}), {self.precision.name}, {torch.get_num_threads()} thread(s), "
                       f"{self.info.world} process(es)" + (" with FSDP" if self.fsdp else "")),
            ("batch", f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation"
                      + (f" x {self.info.world} processes" if self.info.enabled else "")
                      + f" = {eff} samples per optimizer step (up to {eff * d.seq_len:,} tokens)"),
            ("steps", f"{self.steps_per_epoch:,} per epoch x {t.epochs} epoch(s)"
                      + (f", stopping at step {t.max_steps:,}" if t.max_steps else "")
                      + f": {self.total_steps:,} optimizer steps"),
            ("schedule", (f"Muon peak lr {t.muon_learning_rate:g} for the blocks' matrices after "
                          f"{t.muon_warmup_steps} warmup steps, " if t.optimizer == "muon" else "")
                         + f"AdamW peak lr {t.learning_rate:g}" + (" for the rest" if t.optimizer == "muon" else "")
                         + (f" after {t.warmup_steps} warmup steps" if t.warmup_steps else "") + f", {t.lr_schedule}"
                         + f", weight decay {t.weight_decay:g}, clip {t.max_grad_norm:g}"),
            *([("", slow)] if (slow := self._slow_rate()) and d.dataset == "synthetic" else []),
            ("memory", self.memory.describe() + (f"; allocator: {self.allocator}" if self.allocator else "")),
            ("validation", self._validation_plan(val_data)),
            *notes,
            ("time", self.start_time()),
        ]

    def _validation_plan(self, val_data: Any) -> str:
        t = self.cfg.train
        if val_data is None or not len(val_data):
            return "none (no validation data, so no best_model.pt)"
        every = {0: "", 1: "every step, "}.get(t.eval_interval, f"every {t.eval_interval:,} steps, ")
        when = every + "at each epoch's end and at the last step"
        on = (f"the first {t.eval_batches:,} batch{'es' if t.eval_batches > 1 else ''} of {t.batch_size}"
              if t.eval_batches else "all")
        return f"{when}, on {on} of {len(val_data):,} samples; the best so far is saved as best_model.pt"

    def start_time(self) -> str:
        """The ``time:`` banner line before the first step: the FLOPs of one optimizer step (this
        process's share, from the estimator) at this device's measured matmul rate."""
        m, t = self.cfg.model, self.cfg.train
        later = "measured after the first steps"
        targets = predicted_tokens(self.train_data)
        mean = targets / len(self.train_data) if targets and len(self.train_data) else self.cfg.data.seq_len - 1
        try:
            est = estimate(m, seq_len=max(2, round(mean) + 1), micro_batch=t.batch_size, precision=self.precision.name,
                           gpus=self.info.world, parallel="fsdp" if self.fsdp else "ddp", device=self.device.type)
            rate = _matmul_rate(self.precision.name, str(self.device), torch.get_num_threads())
        except (SabError, RuntimeError, KeyError):
            return later
        if not rate > 0:
            return later
        flops = est.hardware_flops_per_token * mean * t.batch_size * t.gradient_accumulation_steps
        return start_estimate(flops, rate, self.total_steps - self.state.global_step,
                              f"measured {self.precision.name} matmul rate")


@functools.lru_cache(maxsize=8)
def _matmul_rate(precision: str, device: str, threads: int) -> float:
    """This device's square-matmul FLOP/s in ``precision``, measured once per process (~0.5 s)."""
    dev = torch.device(device)
    sizes = (1024, 2048, 4096) if dev.type == "cuda" else (256, 512, 1024)
    return measure_matmul_peak(DTYPES[precision], dev, budget_s=0.4, sizes=sizes)


def _remove_if_unused(d: Path) -> None:
    """Undo the creation of a run folder by a run that failed before it saved a checkpoint: only
    what every run writes at its start (lock, config.yaml, metrics.jsonl) may be there."""
    try:
        if {p.name for p in d.iterdir()} <= {LOCK_FILE, CONFIG_FILE, METRICS_FILE}:
            shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass
