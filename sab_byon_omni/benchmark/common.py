"""What every benchmark mode shares: the options, timing (interleaved, so a busy machine slows
every model alike), thread settings and the peak an MFU is measured against."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sab_byon_omni.config import PRESETS, RunConfig, build_config
from sab_byon_omni.data.batching import Batch, collate
from sab_byon_omni.device import DTYPES, resolve_device
from sab_byon_omni.errors import SabError
from sab_byon_omni.machine import device_name, gpu_peak_tflops, measure_matmul_peak, sync

PEERS = ("hf", "minimal")
CLOCKS = ("wall", "cpu")


@dataclass
class BenchOptions:
    """What to benchmark: ``run`` is the RunConfig ``sab-omni train`` would use (model, sequence,
    micro-batch, precision, device, compile); the rest is about the measurement."""

    run: RunConfig
    steps: int = 3
    warmup: int = 1
    compare: tuple[str, ...] = field(default_factory=tuple)
    peak_tflops: float | None = None
    threads: int | None = None
    isolated_memory: bool = False  # also each model's peak RSS in a fresh process (benchmark/isolated.py)
    clock: str = "wall"  # wall: seconds on the wall clock; cpu: this process's CPU seconds (a CPU shared with others)
    model: dict[str, Any] = field(default_factory=dict)  # the model fields given over the preset's
    breakdown: bool = False  # also profile a few steps of each model by kind of kernel (benchmark/breakdown.py)

    @classmethod
    def for_preset(cls, preset: str = "lightweight", seq_len: int = 1024, batch_size: int = 4,
                   precision: str = "auto", vocab_size: int = 96, device: str = "auto", compile: bool = False,
                   activation_checkpointing: bool = False, seed: int = 1234, optimizer: str = "adamw",
                   model: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                   **bench: Any) -> "BenchOptions":
        """``model``: further model fields over the preset's (``--model.n_kv_heads 3``...): any
        architecture, e.g. an open model's (docs/BENCHMARKS.md); ``train``: the optimizer's own
        fields (``--train.muon_ns_steps 3``), so that a Muon schedule can be timed."""
        if preset not in PRESETS:
            raise SabError(f"--preset={preset!r} is not one of: {', '.join(PRESETS)}")
        for name, value in (("seq-len", seq_len), ("batch-size", batch_size), ("vocab-size", vocab_size),
                            ("steps", bench.get("steps", 3))):
            if value < 1:
                raise SabError(f"--{name}={value} must be at least 1")
        if vocab_size < 2:  # random rows draw ids from [0, vocab_size): one id has nothing to predict
            raise SabError(f"--vocab-size={vocab_size} must be at least 2")
        if seq_len < 2:
            raise SabError(f"--seq-len={seq_len} must be at least 2 (one input and one target)")
        run = build_config({
            "model": {"preset": preset, "vocab_size": vocab_size, "activation_checkpointing": activation_checkpointing,
                      **(model or {})},
            "data": {"seq_len": seq_len},
            "train": {"batch_size": batch_size, "gradient_accumulation_steps": 1, "precision": precision,
                      "device": device, "compile": compile, "progress": False, "seed": seed, "optimizer": optimizer,
                      **(train or {})},
        }, source="bench")
        if seq_len > run.model.max_seq_len:
            whose = "--model.max_seq_len" if "max_seq_len" in (model or {}) else f"the {preset} preset's max_seq_len"
            raise SabError(f"--seq-len={seq_len} exceeds {whose}={run.model.max_seq_len}")
        return cls(run=run, model=dict(model or {}), **bench).checked()

    def checked(self) -> "BenchOptions":
        if self.steps < 1:
            raise SabError(f"--steps={self.steps} must be at least 1")
        if self.warmup < 0:
            raise SabError(f"--warmup={self.warmup} must not be negative")
        if self.threads is not None and self.threads < 1:
            raise SabError(f"--threads={self.threads} must be at least 1")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise SabError(f"--peak-tflops={self.peak_tflops} must be positive")
        for peer in self.compare:
            if peer not in PEERS:
                raise SabError(f"--compare {peer!r} is not one of: {', '.join(PEERS)}")
        if self.clock not in CLOCKS:
            raise SabError(f"--clock={self.clock!r} is not one of: {', '.join(CLOCKS)}")
        if self.clock == "cpu" and resolve_device(self.run.train.device).type != "cpu":
            raise SabError("--clock cpu counts this process's CPU seconds, a measure of CPU work; on "
                           f"{resolve_device(self.run.train.device).type} use the wall clock (the default)")
        if self.isolated_memory and self.run.train.device not in ("auto", "cpu"):
            raise SabError("--isolated-memory measures peak RSS, a CPU figure; on CUDA the table's memory is "
                           "max_memory_allocated already")
        return self

    def preset_spec(self) -> dict[str, Any]:
        """The :meth:`for_preset` keywords that rebuild this run (for a measuring subprocess)."""
        m, t = self.run.model, self.run.train
        return dict(preset=m.preset, seq_len=self.run.data.seq_len, batch_size=t.batch_size, precision=t.precision,
                    vocab_size=m.vocab_size, device=t.device, compile=t.compile,
                    activation_checkpointing=m.activation_checkpointing, seed=t.seed, threads=self.threads,
                    warmup=self.warmup, optimizer=t.optimizer, model=self.model,
                    train=dict(muon_ns_steps=t.muon_ns_steps, muon_ns_coefficients=t.muon_ns_coefficients))


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> Batch:
    """Full-length rows of random non-padding ids (every position is a real token)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, vocab_size, seq_len, dtype=np.int64) for _ in range(batch_size)]
    return collate(rows, pad_id=0)


def timed_call(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> tuple[float, Any]:
    """(seconds ``fn()`` took on ``device``, what it returned). ``clock="cpu"``: the CPU seconds this
    process spent in it instead (all its threads): on a CPU shared with other jobs, the work of the
    call, not how long it waited for a core."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync(device)
    t0 = now()
    out = fn()
    sync(device)
    return now() - t0, out


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    return timed_call(fn, device, clock)[0]


def interleave(runners: dict[str, Callable[[], Any]], steps: int, device: torch.device,
               clock: str = "wall") -> dict[str, list[float]]:
    """``steps`` timed calls of each runner, alternating which goes first (ABBA) so that a slow
    spell on a shared machine hits all of them. A call that returns False did not do the work (a
    training step fp16's GradScaler skipped: no optimizer step, a shorter time): it is not counted,
    and the runner goes on until ``steps`` calls counted (at most ``3 x steps`` calls)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    calls = dict.fromkeys(runners, 0)
    names = list(runners)
    i = 0
    while any(len(times[n]) < steps and calls[n] < 3 * steps for n in names):
        for name in (names if i % 2 == 0 else names[::-1]):
            if len(times[name]) < steps and calls[name] < 3 * steps:
                seconds, out = timed_call(runners[name], device, clock)
                calls[name] += 1
                if out is not False:
                    times[name].append(seconds)
        i += 1
    for name in names:
        if not times[name]:
            raise SabError(f"every one of {name}'s {calls[name]} timed training steps was skipped by the "
                           "GradScaler (non-finite gradients): no speed to report; use bf16 or fp32")
    return times


def peak(precision: str, device: torch.device, override: float | None) -> tuple[float | None, str]:
    """Peak TFLOP/s for MFU and where it came from: the user's, a GPU's data sheet, or a CPU
    matmul measured now in the run's dtype."""
    if override is not None:
        return override, "user (--peak-tflops)"
    if device.type == "cuda":
        return gpu_peak_tflops(device_name(device), precision)
    return measure_matmul_peak(DTYPES[precision], device) / 1e12, f"measured {precision} matmul, this run"


def measured_peak(precision: str, device: torch.device) -> float:
    """The run dtype's square-matmul rate (TFLOP/s) measured on this device now: what its kernels
    really reach (on an H100 SXM about 800 of the data sheet's 989 bf16 TFLOP/s)."""
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048)
    return measure_matmul_peak(DTYPES[precision], device, sizes=sizes) / 1e12


def best_peak(*measured: tuple[float | None, str]) -> tuple[float | None, str]:
    """The higher of peaks measured before and after the timed steps (a quiet moment's)."""
    values = [m for m in measured if m[0] is not None]
    return max(values, key=lambda m: m[0]) if values else measured[0]


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each layer of a peer as ``train.compile`` compiles ours (each block's forward,
    shapes dynamic), so that ``bench --compile`` compares like with like: the layers are the
    model's largest ``nn.ModuleList`` (``model.layers``, GPT-2's ``transformer.h``...)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise SabError(f"--compile: no list of layers in the {type(model).__name__} peer to compile")
    for layer in max(lists, key=len):
        layer.forward = torch.compile(layer.forward, dynamic=True)


class PeerStep:
    """A peer's training step the textbook way: loss, scaled backward, unscale, clip, step, zero.
    A subclass builds ``model``, ``optimizer``, ``scaler``, ``precision``, ``max_norm``, ``batch``
    and says how its model gives the loss (:meth:`loss`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: Batch
    max_norm: float

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self) -> bool:
        """One step; False when the GradScaler skipped it (its scale went down: non-finite gradients)."""
        with self.precision.autocast():
            loss = self.loss()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm))
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return scale is None or self.scaler.get_scale() >= scale
