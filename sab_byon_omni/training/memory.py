"""Will it fit? The memory plan of a run, decided before anything is allocated on the device, and
the memory-saving measures it may switch on (activation checkpointing, a smaller micro-batch).

The arithmetic lives in :mod:`sab_byon_omni.estimate`; this module asks the device how much
memory there is and turns the estimate into a decision, or a SabError with settings that fit.
"""

from __future__ import annotations

import functools
import logging
import resource
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sab_byon_omni.config import RunConfig, replace
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import GiB, PRECISION_BYTES, estimate, fmt_bytes, largest_micro_batch
from sab_byon_omni.machine import memory_budget
from sab_byon_omni.training.distributed import DistInfo
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
    """The run's config (micro-batch possibly changed) and what it is expected to need."""

    cfg: RunConfig
    peak: float  # estimated peak bytes per process (nan: no estimate for this device)
    usable: float  # bytes the run may use
    what: str  # the memory it was measured against, in words


def plan_memory(model: nn.Module, train_data: Any, cfg: RunConfig, device: torch.device, precision: str,
                info: DistInfo) -> MemoryPlan:
    """Check that training ``cfg`` fits ``device`` before anything is allocated there, and with
    ``train.auto_micro_batch=true`` pick the largest micro-batch that fits (dividing
    batch_size x gradient_accumulation_steps, which stays the same). Raises SabError with settings
    that would fit."""
    t, m = cfg.train, cfg.model
    if device.type not in ("cuda", "cpu") or m.vocab_size is None:
        return MemoryPlan(cfg, float("nan"), float("nan"), device.type)
    usable, what = usable_bytes(model, device)
    seq = longest_sample(train_data, cfg.data.seq_len)
    kw = dict(precision=precision if precision in PRECISION_BYTES else "fp32", gpus=info.world,
              parallel=t.parallel if info.enabled else "ddp", device=device.type,
              fused_optimizer=uses_fused_adamw(device))
    effective = t.batch_size * t.gradient_accumulation_steps
    ac = m.activation_checkpointing
    if t.auto_micro_batch:
        mb = largest_micro_batch(m, seq, usable, effective, activation_checkpointing=ac, **kw)
        if mb:
            if (mb, effective // mb) != (t.batch_size, t.gradient_accumulation_steps) and info.is_main:
                log.info("micro-batch auto: %d x %d accumulation (effective batch %d) fits %s", mb, effective // mb,
                         effective, what)
            cfg = replace(cfg, batch_size=mb, gradient_accumulation_steps=effective // mb, auto_micro_batch=False)
            t = cfg.train
    e = estimate(m, seq, t.batch_size, activation_checkpointing=ac, **kw)
    if e.peak <= usable or not t.check_memory:
        return MemoryPlan(cfg, e.peak, usable, what)
    raise SabError(
        f"this run needs about {fmt_bytes(e.peak)} per process (weights {fmt_bytes(e.weights)}, gradients "
        f"{fmt_bytes(e.gradients)}, optimizer {fmt_bytes(e.optimizer)}, "
        f"activations {fmt_bytes(e.activations + max(e.logits, e.workspace))} "
        f"for micro-batch {t.batch_size} x {seq} tokens) but {what} leaves {fmt_bytes(usable)} usable; "
        f"settings that fit: {'; or '.join(_tips(cfg, seq, usable, effective, kw))}; --check_memory false skips "
        "this check")


def _tips(cfg: RunConfig, seq: int, usable: float, effective: int, kw: dict[str, Any]) -> list[str]:
    m = cfg.model
    tips = []
    mb = largest_micro_batch(m, seq, usable, effective, activation_checkpointing=m.activation_checkpointing, **kw)
    if mb:
        tips.append(f"--batch_size {mb} --gradient_accumulation_steps {effective // mb} (or --auto-micro-batch true)")
    if not m.activation_checkpointing:
        mb_ac = largest_micro_batch(m, seq, usable, effective, activation_checkpointing=True, **kw)
        if mb_ac:
            tips.append(f"--activation_checkpointing true --batch_size {mb_ac} "
                        f"--gradient_accumulation_steps {effective // mb_ac}")
    return tips or ["more memory per device, or more processes with --parallel fsdp (see sab-omni estimate)"]
