"""Building a run, once, before its first step: device, processes, precision, the memory plan, the
model's wrapping, the optimizer, the resume point and the run folder, into one frozen :class:`Run`
that the :class:`~sab_byon_omni.training.trainer.Trainer` then only reads.

Bad input is found here and reported as a SabError before anything is written; the run folder is
locked (one run per folder) before it is read, and removed again if this run created it and fails.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sab_byon_omni.config import RunConfig, TrainConfig
from sab_byon_omni.data.batching import micro_steps_per_epoch
from sab_byon_omni.data.tokenizers import Tokenizer
from sab_byon_omni.device import (
    DTYPES,
    Precision,
    make_precision,
    resolve_device,
    runs_natively,
    set_deterministic,
    set_fp32_matmul,
)
from sab_byon_omni.errors import SabError
from sab_byon_omni.machine import Threads, training_threads
from sab_byon_omni.model.lora import add_lora, largest_useful_rank
from sab_byon_omni.training import distributed as D
from sab_byon_omni.training import trackers
from sab_byon_omni.training.checkpointer import Checkpointer
from sab_byon_omni.training.memory import MemoryPlan, apply_activation_checkpointing, plan_memory
from sab_byon_omni.training.metrics import METRICS_FILE, MetricsLog
from sab_byon_omni.training.optim import make_optimizer
from sab_byon_omni.training.state import RngState, Schedule, TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """A training run as :func:`build_run` built it. Which objects it holds never changes; their
    contents do as it trains (the weights, the optimizer's moments, ``state``).

    ``cfg`` is the config the run uses: the one it was given, except that the memory plan may
    have changed the micro-batch (``train.auto_micro_batch``: ``batch_size`` and
    ``gradient_accumulation_steps``, their product kept). Its checkpoints and ``config.yaml``
    record it, and :class:`~sab_byon_omni.training.trainer.TrainResult` hands it back as ``config``."""

    cfg: RunConfig
    tokenizer: Tokenizer
    train_data: Any  # a TokenDataset, or any sequence of samples
    val_data: Any  # or None
    device: torch.device
    info: D.DistInfo
    precision: Precision
    fsdp: bool  # FSDP2: sharded parameters and checkpoints
    memory: MemoryPlan
    model: nn.Module  # the model trained (FSDP-sharded in place); its state_dict is the checkpoint's
    wrapped: nn.Module  # what the forward pass runs: the model under DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rng: RngState
    schedule: Schedule
    state: TrainState
    checkpointer: Checkpointer
    metrics: MetricsLog
    steps_per_epoch: int
    total_steps: int
    resume_from: Path | None  # the checkpoint it continued from (None: a new run)
    threads: Threads | None = None  # on a CPU: the torch threads it trains with (train.threads)

    def parts(self) -> dict[str, Any]:
        """The parts with state, by the checkpointer's names (what a checkpoint holds)."""
        return parts(self.model, self.optimizer, self.scaler, self.rng, self.schedule, self.state)

    def close(self, failed: bool = False) -> None:
        """The end of the run: the trackers closed and the folder's lock released (after a failure,
        the folder removed if this run created it and saved nothing in it). The process group stays:
        a program may train again in it; ``sab-omni train`` leaves it when the run ends."""
        self.metrics.close()
        self.checkpointer.release(failed)
        if self.threads is not None:  # torch's setting is process-wide: the caller's again
            torch.set_num_threads(self.threads.before)


def build_run(model: nn.Module, tokenizer: Tokenizer, train_data: Any, val_data: Any, cfg: RunConfig) -> Run:
    """The run of ``model`` trained on ``train_data`` (and validated on ``val_data``, or None) as
    ``cfg`` says, ready for its first step, resumed if ``train.resume`` finds a checkpoint. Its
    ``cfg`` is the config the run uses (see :class:`Run`)."""
    device, info, precision = _place(cfg.train)
    threads = _set_threads(cfg.train, device)
    fsdp = D.uses_fsdp(cfg.train.parallel, info)
    _refuse_unsupported(cfg.train, precision, fsdp)
    memory = plan_memory(model, train_data, cfg, device, precision.name, info)
    cfg = memory.cfg  # the config the run uses from here on: the plan's micro-batch (Run.cfg)
    t = cfg.train
    per_epoch = steps_per_epoch(len(train_data), t.batch_size, t.gradient_accumulation_steps, info.world)
    # the run ends at whichever comes first: max_steps, or the last epoch's end (the schedule plans for that)
    total_steps = min(t.max_steps, per_epoch * t.epochs) if t.max_steps else per_epoch * t.epochs
    tracker_names = trackers.check(t)  # a missing package: before anything is written
    checkpointer = Checkpointer(t.checkpoint_dir, info=info, sharded=fsdp, keep_last=t.keep_last)
    try:
        checkpointer.lock()
        point = checkpointer.resume_point(t.resume)
        wrapped, optimizer = _build_model(model, cfg, device, info, precision, memory, fsdp, fresh=point is None)
        state, scaler = TrainState(), precision.scaler()
        rng, schedule = RngState(device), Schedule(optimizer, model, t, total_steps, state)
        if point is not None:
            checkpointer.restore(*point, parts(model, optimizer, scaler, rng, schedule, state), cfg,
                                 tokenizer.to_spec(), len(train_data))
            if info.is_main:
                log.info("resumed from %s: epoch %d, step %s, sample %s of the epoch", point[0], state.epoch + 1,
                         f"{state.global_step:,}", f"{state.cursor:,}")
        schedule.set_step(state.global_step)
        metrics = _open_folder(checkpointer, cfg, point[0] if point else None, state.global_step, tracker_names)
    except BaseException:
        checkpointer.release(failed=True)
        raise
    return Run(cfg, tokenizer, train_data, val_data, device, info, precision, fsdp, memory, model, wrapped, optimizer,
               scaler, rng, schedule, state, checkpointer, metrics, per_epoch, total_steps, point[0] if point else None,
               threads)


def parts(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rng: RngState,
          schedule: Schedule, state: TrainState) -> dict[str, Any]:
    """The parts of a run that have state, by the names :class:`Checkpointer` composes a checkpoint of."""
    return {"model": model, "optimizer": optimizer, "scaler": scaler, "rng": rng, "schedule": schedule,
            "train_state": state}


def steps_per_epoch(samples: int, batch_size: int, accumulation: int, world: int) -> int:
    """Optimizer steps in an epoch of ``samples`` (the last one may take fewer micro-batches)."""
    return math.ceil(micro_steps_per_epoch(samples, batch_size, world) / accumulation)


def _place(t: TrainConfig) -> tuple[torch.device, D.DistInfo, Precision]:
    """The device, the process group (under torchrun: each process its own GPU) and the precision."""
    device = resolve_device(t.device)
    info = D.init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return device, info, make_precision(t.precision, device)


def _set_threads(t: TrainConfig, device: torch.device) -> Threads | None:
    """On a CPU, torch's threads for the run (:func:`~sab_byon_omni.machine.training_threads`); a
    number above this process's cores is lowered with one warning. Elsewhere torch's setting stays."""
    if device.type != "cpu":
        return None
    threads = training_threads(t.threads)
    if threads.why:
        log.warning("%s", threads.why)
    torch.set_num_threads(threads.n)
    return threads


def _refuse_unsupported(t: TrainConfig, precision: Precision, fsdp: bool) -> None:
    if fsdp and precision.name == "fp16":
        raise SabError("train.parallel=fsdp with precision fp16 needs a sharded gradient scaler, which is not "
                       "supported; use --precision bf16 on GPUs that have it (A100, H100, L4...), or --parallel "
                       "ddp with fp16 on older ones (T4, V100)")
    if fsdp and t.lora_rank:
        raise SabError("train.lora_rank > 0 with train.parallel=fsdp is not supported (FSDP shards parameters of "
                       "one dtype, LoRA keeps a frozen base beside fp32 adapters); use --parallel ddp")
    if t.parallel == "fsdp" and t.optimizer == "muon":
        raise SabError("train.optimizer=muon with train.parallel=fsdp is not supported (Muon orthogonalises whole "
                       "matrices, FSDP holds shards of them); use --parallel ddp, or --optimizer adamw")


def _build_model(model: nn.Module, cfg: RunConfig, device: torch.device, info: D.DistInfo, precision: Precision,
                 memory: MemoryPlan, fsdp: bool, fresh: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Seed every generator, place and wrap ``model``, build its optimizer: (what the forward runs,
    the optimizer). ``fresh``: initialise a meta-built model's weights (else a resume loads them)."""
    t = cfg.train
    torch.manual_seed(t.seed)  # and Python's and numpy's generators, which checkpoints save as well
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    if t.deterministic:
        set_deterministic(device)
    set_fp32_matmul(device, t.deterministic)  # TF32 for fp32 matmuls on CUDA, unless deterministic
    meta = D.is_meta(model)  # built on the meta device (FSDP): materialised after sharding
    if not meta:
        model.to(device)
    if t.lora_rank:
        if t.lora_rank > (useful := largest_useful_rank(model, t.lora_targets)):
            raise SabError(f"train.lora_rank={t.lora_rank} exceeds the smallest adapted projection's dimension "
                           f"({useful}): a rank above it adds parameters and nothing else; use at most {useful}")
        add_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_targets, lora_base_dtype(precision))
    model.set_memory_saving(memory.memory_saving)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:  # torchtitan's order: activation checkpointing, compile, fully_shard
        compile_blocks(model)
    if fsdp:  # before the optimizer: fully_shard swaps in sharded parameters
        D.wrap_fsdp(model, DTYPES[precision.name] if precision.name != "fp32" else None)
    if meta:
        D.materialize(model, device, init_weights=fresh)
    optimizer = make_optimizer(model, t, device, process_group=None if fsdp else D.data_parallel_group(info))
    wrapped = model if fsdp else D.wrap_ddp(model, info, device)
    return wrapped, optimizer


def lora_base_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype a LoRA run holds its frozen base weights in: the autocast dtype where the device
    multiplies in it natively (bf16 on CPUs with AVX-512 BF16 / AMX and CUDA sm_80+, fp16 on a T4),
    halving their memory with no cast per step; None (as loaded, fp32) otherwise."""
    if precision.name in ("bf16", "fp16") and runs_natively(precision.name, precision.device):
        return DTYPES[precision.name]
    return None


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block's forward in place, as torchtitan does: the blocks are the work,
    all of one code, so they share one graph; fully_shard's hooks and DDP stay outside the compiled
    code (they run around each block's forward); the parameter names do not change. Shapes are
    dynamic from the first call: batches of another length or size (variable-length data, the
    epoch's last batch) reuse that graph instead of recompiling (``tests/test_run.py`` counts)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)


def _open_folder(ck: Checkpointer, cfg: RunConfig, resume_from: Path | None, step: int,
                 tracker_names: list[str]) -> MetricsLog:
    """Open the run folder for writing: set aside the checkpoints past an explicit resume point,
    remove what an interrupted save left, reconcile metrics.jsonl with the step the run starts
    from, write config.yaml. Returns the run's metrics log."""
    if resume_from is not None and cfg.train.resume not in ("none", "auto"):
        ck.set_aside(ck.newer_than(step), f"this run resumes from {resume_from} at step {step}, and --resume "
                     "auto would otherwise prefer them later", copies=(ck.dir / METRICS_FILE,))
    ck.clean()
    metrics = MetricsLog(ck.dir, ck.is_main, trackers.open_all(tracker_names, ck.dir, cfg, ck.is_main))
    metrics.reconcile(step)
    ck.write_config(cfg)
    return metrics
