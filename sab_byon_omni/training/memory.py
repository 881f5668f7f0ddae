"""Will it fit? The memory plan of a run, decided before anything is allocated on the device, and
the memory-saving measures it may switch on (activation checkpointing, a smaller micro-batch).

The arithmetic lives in :mod:`sab_byon_omni.estimate`; this module asks the device how much
memory there is and turns the estimate into a decision, or a SabError with settings that fit.
"""

from __future__ import annotations

import functools
import logging
import math
import resource
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sab_byon_omni.config import RunConfig, replace
from sab_byon_omni.device import runs_natively
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import PRECISION_BYTES, GiB, estimate, fmt_bytes, largest_micro_batch
from sab_byon_omni.machine import memory_budget
from sab_byon_omni.training.distributed import DistInfo, agree_min
from sab_byon_omni.training.optim import uses_fused_adamw

log = logging.getLogger(__name__)

CUDA_RESERVE = 1.0 * GiB  # CUDA context and allocator slack, not seen by max_memory_allocated
HEADROOM = 0.9  # use at most 90% of the device


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's ``max_memory_allocated``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. Patches ``forward`` so state-dict keys do not change."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def longest_sample(data: Any, seq_len: int) -> int:
    """The longest sample of a dataset when it says cheaply (``lengths``: synthetic data), else ``seq_len``."""
    lengths = getattr(data, "lengths", None)
    if lengths is not None and len(lengths):
        return max(2, min(int(max(lengths)), seq_len))
    return seq_len


def usable_bytes(model: nn.Module, device: torch.device) -> tuple[float, str]:
    """(bytes training may use on ``device``, a description of the device's memory)."""
    budget, what = memory_budget(device)
    if device.type == "cpu":  # the model already sits in RAM: count it as available again
        budget += sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    return budget * HEADROOM - (CUDA_RESERVE if device.type == "cuda" else 0), what


@dataclass
class MemoryPlan:
    """The run's config (micro-batch possibly changed), what it is expected to need, and the
    memory-for-speed trades the plan chose: ``memory_saving`` (``CausalTransformer.set_memory_saving``)
    and ``pass_rows``, the samples one forward/backward may take when the trainer regroups an
    accumulation window (0: as batched)."""

    cfg: RunConfig
    peak: float  # estimated peak bytes per process (nan: no estimate for this device)
    usable: float  # bytes the run may use
    what: str  # the memory it was measured against, in words
    memory_saving: bool = False
    why: str = ""  # why memory saving is on or off, in words
    pass_rows: int = 0  # most samples in one forward/backward when the trainer regroups a window (0: never)
    pass_positions: int = 0  # a regrouped pass closes once it pads to this many positions

    def describe(self) -> str:
        saving = f"memory saving {'on' if self.memory_saving else 'off'} ({self.why})"
        if not math.isfinite(self.peak):
            return f"no estimate for this device; {saving}"
        return f"estimated peak {fmt_bytes(self.peak)} of {fmt_bytes(self.usable)} usable ({self.what}); {saving}"


SAVING_CHOICES = {"auto": (False, True), "off": (False,), "on": (True,)}
# Real tokens per pass when the trainer regroups a window: on a CPU, 2-thread matmuls of ~1,000 rows
# run near their peak where the default job's 4 x ~72 do not, and more rows would pad more
# (docs/BENCHMARKS.md, "the default job"); a GPU wants far more rows.
PASS_POSITIONS = {"cpu": 1024, "cuda": 16384}


def plan_memory(model: nn.Module, train_data: Any, cfg: RunConfig, device: torch.device, precision: str,
                info: DistInfo) -> MemoryPlan:
    """Check that training ``cfg`` fits ``device`` before anything is allocated there. With
    ``train.auto_micro_batch=true`` pick the largest micro-batch that fits (dividing
    batch_size x gradient_accumulation_steps, which stays the same); with
    ``train.memory_saving=auto`` keep every activation (the faster step) unless that would not fit.
    Raises SabError with settings that would fit."""
    t, m = cfg.train, cfg.model
    choices = SAVING_CHOICES[t.memory_saving]
    if device.type not in ("cuda", "cpu") or m.vocab_size is None:
        return MemoryPlan(cfg, float("nan"), float("nan"), device.type, choices[0], "no estimate for this device"
                          if len(choices) > 1 else f"train.memory_saving={t.memory_saving}")
    usable, what = usable_bytes(model, device)
    # the same plan on every rank (the passes per window must agree: data/batching.py regroup), from the least room
    usable = agree_min(usable, info, device)
    seq = longest_sample(train_data, cfg.data.seq_len)
    kw = dict(precision=precision if precision in PRECISION_BYTES else "fp32", gpus=info.world,
              parallel=t.parallel if info.enabled else "ddp", device=device.type,
              fused_optimizer=uses_fused_adamw(device), activation_checkpointing=m.activation_checkpointing,
              lora_rank=t.lora_rank, lora_targets=t.lora_targets,
              lora_base_bytes=PRECISION_BYTES[precision] if precision in ("bf16", "fp16") and runs_natively(
                  precision, device) else 4)  # as build.lora_base_dtype holds the frozen base
    for saving in choices:
        fitted, e = _fit_micro_batch(cfg, seq, usable, what, info, dict(kw, memory_saving=saving))
        if e.peak <= usable or (not t.check_memory and saving == choices[-1]):
            why = (f"train.memory_saving={t.memory_saving}" if len(choices) == 1 else
                   "the run would not fit without it" if saving else "the run fits without it")
            rows = pass_rows(fitted, seq, usable, dict(kw, memory_saving=saving))
            return MemoryPlan(fitted, e.peak, usable, what, saving, why, rows, PASS_POSITIONS[device.type] if rows else 0)
    raise SabError(
        f"this run needs about {fmt_bytes(e.peak)} per process (weights {fmt_bytes(e.weights)}, gradients "
        f"{fmt_bytes(e.gradients)}, optimizer {fmt_bytes(e.optimizer)}, "
        f"activations {fmt_bytes(e.activations + max(e.logits, e.workspace))} "
        f"for micro-batch {fitted.train.batch_size} x {seq} tokens) but {what} leaves {fmt_bytes(usable)} usable; "
        f"settings that fit: {'; or '.join(_tips(fitted, seq, usable, kw))}; --check_memory false skips this check")


def pass_rows(cfg: RunConfig, seq: int, usable: float, kw: dict[str, Any]) -> int:
    """The most samples one forward/backward may take when the trainer regroups an accumulation
    window (:func:`~sab_byon_omni.data.batching.regroup`): the largest count up to the window whose
    estimate fits ``usable`` at ``seq`` tokens each. 0 (keep the configured micro-batches) with
    dropout, where the grouping decides which random numbers each sample gets, and with one
    micro-batch per step."""
    t, m = cfg.train, cfg.model
    window = t.batch_size * t.gradient_accumulation_steps
    if m.dropout > 0 or t.gradient_accumulation_steps < 2:
        return 0
    lo, hi = t.batch_size, window  # the configured micro-batch fits (the plan checked it)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate(m, seq, mid, **kw).peak <= usable else (lo, mid - 1)
    return lo if lo > t.batch_size else 0


def _fit_micro_batch(cfg: RunConfig, seq: int, usable: float, what: str, info: DistInfo,
                     kw: dict[str, Any]) -> tuple[RunConfig, Any]:
    """(the config, its estimate): with ``train.auto_micro_batch``, the largest micro-batch that fits."""
    t, m = cfg.train, cfg.model
    effective = t.batch_size * t.gradient_accumulation_steps
    if t.auto_micro_batch:
        mb = largest_micro_batch(m, seq, usable, effective, **kw)
        if mb:
            if (mb, effective // mb) != (t.batch_size, t.gradient_accumulation_steps) and info.is_main:
                log.info("micro-batch auto: %d x %d accumulation (effective batch %d) fits %s", mb, effective // mb,
                         effective, what)
            cfg = replace(cfg, batch_size=mb, gradient_accumulation_steps=effective // mb, auto_micro_batch=False)
    return cfg, estimate(m, seq, cfg.train.batch_size, **kw)


def _tips(cfg: RunConfig, seq: int, usable: float, kw: dict[str, Any]) -> list[str]:
    m, t = cfg.model, cfg.train
    effective = t.batch_size * t.gradient_accumulation_steps
    lean = dict(kw, memory_saving=t.memory_saving != "off")
    tips = []
    mb = largest_micro_batch(m, seq, usable, effective, **lean)
    if mb:
        tips.append(f"--batch_size {mb} --gradient_accumulation_steps {effective // mb} (or --auto-micro-batch true)")
    if t.memory_saving == "off" and largest_micro_batch(m, seq, usable, effective, **dict(kw, memory_saving=True)):
        tips.append("--memory_saving auto")
    if not m.activation_checkpointing:
        mb_ac = largest_micro_batch(m, seq, usable, effective, **dict(lean, activation_checkpointing=True))
        if mb_ac:
            tips.append(f"--activation_checkpointing true --batch_size {mb_ac} "
                        f"--gradient_accumulation_steps {effective // mb_ac}")
    return tips or ["more memory per device, or more processes with --parallel fsdp (see sab-omni estimate)"]
