"""``bench --mode train``: the real training step of a preset, against its peers.

The step timed is :meth:`Trainer.train_step`, the very code ``sab-omni train`` runs: forward,
``loss.model_loss``, backward, gradient clipping and the optimizer, under the run's precision.
FLOPs per token follow one formula (:func:`~sab_byon_omni.estimate.train_flops_per_token`) for
every model; MFU is against a matmul peak of the same dtype (measured in the run on CPUs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import tempfile
from pathlib import Path

import torch

from sab_byon_omni.benchmark.breakdown import profile_step
from sab_byon_omni.benchmark.common import (
    BenchOptions,
    best_peak,
    interleave,
    measured_peak,
    peak,
    random_batch,
    timed,
)
from sab_byon_omni.benchmark.isolated import isolated_peak_mb
from sab_byon_omni.benchmark.peers import PEER_STEPS, hf_peer_name
from sab_byon_omni.benchmark.results import Machine, Speed, TrainBench
from sab_byon_omni.config import RunConfig, replace
from sab_byon_omni.data.batching import Batch
from sab_byon_omni.data.tokenizers import Char96Tokenizer
from sab_byon_omni.device import Precision, intra_op_threads, make_precision, resolve_device
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import matmul_params, train_flops_per_token
from sab_byon_omni.machine import cpu_has_native_bf16, malloc_settings
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.build import build_run
from sab_byon_omni.training.memory import peak_memory_mb
from sab_byon_omni.training.muon import newton_schulz_dtype
from sab_byon_omni.training.optim import MuonWithAdamW, optimizer_name
from sab_byon_omni.training.trainer import Trainer

log = logging.getLogger(__name__)


class OursStep:
    """One optimizer step of this package's Trainer on a fixed batch."""

    def __init__(self, cfg: RunConfig, batch: Batch) -> None:
        torch.manual_seed(cfg.train.seed)
        with torch.device(resolve_device(cfg.train.device)):  # allocated there: a 1B model builds in seconds on a GPU
            self.model = CausalTransformer(cfg.model)
        rows = [r.numpy() for r in batch.input_ids]
        self.trainer = Trainer(build_run(self.model, Char96Tokenizer(), rows, None, cfg))
        self.window = [batch]

    def __call__(self) -> bool:
        """One step; False when it was skipped (non-finite gradients: fp16's GradScaler backing off)."""
        out = self.trainer.train_step(self.window)
        return out is not None and math.isfinite(out.grad_norm)

    def optimizer_kind(self) -> str:
        return optimizer_name(self.trainer.run.optimizer)


def _precision(name: str, device: torch.device) -> Precision:
    precision = make_precision(name, device)
    if device.type == "cpu" and precision.name != "fp32" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16/fp16 matmul (no AVX-512-BF16 or AMX): %s runs emulated and "
                    "far slower than fp32", precision.name)
    return precision


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one training step computes: ``tokens`` x ``flops_per_token`` of the model, against
    ``peak`` TFLOP/s (None: no MFU)."""

    tokens: int
    flops_per_token: float
    peak: float | None

    def speed(self, times: list[float], params: int, ns_flops: int = 0, ns_dtype: str = "",
              ns_peak: float | None = None) -> Speed:
        """The median step's speed. Muon's Newton-Schulz FLOPs (``ns_flops`` per step, run in
        ``ns_dtype`` whose peak is ``ns_peak``) count as work done: in TFLOP/s, and in MFU as the time
        they would take at their own dtype's peak (MFU = the step's time at the peaks / its time)."""
        step_s = statistics.median(times)
        model_flops = self.tokens * self.flops_per_token
        tflops = (model_flops + ns_flops) / step_s / 1e12
        mfu = tflops / self.peak if self.peak and not ns_flops else None
        if self.peak and ns_flops and ns_peak:
            mfu = (model_flops / (self.peak * 1e12) + ns_flops / (ns_peak * 1e12)) / step_s
        return Speed(step_s, times, self.tokens / step_s, tflops, mfu, params)


PROFILED_STEPS = 3  # --breakdown: the steps of each model profiled (at most --steps), their mean reported
NS_FIELDS = ("newton_schulz_flops", "newton_schulz_dtype", "newton_schulz_peak_tflops")  # newton_schulz_work's


def newton_schulz_work(step: OursStep, precision: str, device: torch.device,
                       top: float | None) -> tuple[int, str, float | None] | tuple[()]:
    """(Newton-Schulz FLOPs per step, the dtype they run in, that dtype's peak TFLOP/s) of ``step``'s
    Muon, or ``()`` without Muon. The peak is the run's own (``top``) when the dtypes agree, else the
    iteration dtype's: measured on a CPU, the data sheet's on CUDA (``--peak-tflops`` is the run
    dtype's, so it does not apply)."""
    optimizer = step.trainer.run.optimizer
    if not isinstance(optimizer, MuonWithAdamW):
        return ()
    dtype = optimizer.muon.ns_dtype or newton_schulz_dtype(device)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    ns_peak = top if name == precision else peak(name, device, None)[0]
    return optimizer.muon.flops_per_step(), name, ns_peak


def run_train_bench(opts: BenchOptions) -> TrainBench:
    """Time ``opts.steps`` training steps of ours and each peer (after ``opts.warmup``), interleaved."""
    with tempfile.TemporaryDirectory(prefix="sab_bench_") as tmp, intra_op_threads(opts.threads):
        cfg = replace(opts.run, checkpoint_dir=str(Path(tmp) / "ckpt"))
        m, t = cfg.model, cfg.train
        device = resolve_device(t.device)
        precision = _precision(t.precision, device)
        batch = random_batch(t.batch_size, cfg.data.seq_len, m.vocab_size, t.seed)
        flops_tok = train_flops_per_token(m, cfg.data.seq_len)
        peak_before = peak(precision.name, device, opts.peak_tflops)
        ours, runners, times_first, memory = _build_and_warm(opts, cfg, batch, precision, device)
        times = interleave(runners, opts.steps, device, opts.clock)
        profiled = min(opts.steps, PROFILED_STEPS)
        breakdown = {name: profile_step(fn, device, profiled) for name, fn in runners.items()} if opts.breakdown else {}
        memory = memory if memory is not None else peak_memory_mb(device)
        top, source = best_peak(peak_before, peak(precision.name, device, opts.peak_tflops))
        measured = top if source.startswith("measured") else measured_peak(precision.name, device)
        work, ns = StepWork(t.batch_size * cfg.data.seq_len, flops_tok, top), newton_schulz_work(ours, precision.name,
                                                                                                  device, top)

        def speed(name: str) -> Speed:
            model = ours.model if name == "ours" else runners[name].model
            return work.speed(times[name], sum(p.numel() for p in model.parameters()), *(ns if name == "ours" else ()))

        result = TrainBench(
            preset=m.preset + (f" with {', '.join(f'{k} {v}' for k, v in opts.model.items())}" if opts.model else ""),
            params=ours.model.num_parameters(), matmul_params=matmul_params(m),
            vocab_size=m.vocab_size, seq_len=cfg.data.seq_len, batch_size=t.batch_size, precision=precision.name,
            compile=t.compile, activation_checkpointing=m.activation_checkpointing, optimizer=ours.optimizer_kind(),
            steps=opts.steps, warmup=opts.warmup, machine=Machine.of(device), flops_per_token=flops_tok,
            peak_tflops=top, peak_source=source, ours=speed("ours"), peak_memory_mb=memory,
            memory_kind="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
            first_step_s=times_first[0] if times_first else None,
            peers={name: speed(name) for name in opts.compare}, measured_peak_tflops=measured,
            peer_names={name: hf_peer_name(m) for name in opts.compare if name == "hf"},
            allocator=malloc_settings() if device.type == "cpu" else "", clock=opts.clock, breakdown=breakdown,
            **dict(zip(NS_FIELDS, ns)))
        if t.compile and result.first_step_s is not None:
            result = dataclasses.replace(result, compile_s=max(result.first_step_s - result.ours.step_s, 0.0))
    if opts.isolated_memory:
        _add_isolated_memory(result, opts, device)
    return result


def _build_and_warm(opts: BenchOptions, cfg: RunConfig, batch: Batch, precision: Precision,
                    device: torch.device) -> tuple[OursStep, dict, list[float], float | None]:
    """(ours, every model's step by name, our warm-up times, our peak memory after them) with each
    model's ``opts.warmup`` steps run."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours = OursStep(cfg, batch)
    times_first = [timed(ours, device, opts.clock) for _ in range(opts.warmup)]
    # Memory now, before any peer exists (and after at least one step: optimizer state, gradients
    # and activations have peaked).
    memory = peak_memory_mb(device) if opts.warmup else None
    runners = {"ours": ours}
    for name in opts.compare:
        runners[name] = PEER_STEPS[name](cfg, batch, precision)
        for _ in range(opts.warmup):
            timed(runners[name], device)
    return ours, runners, times_first, memory


def _add_isolated_memory(result: TrainBench, opts: BenchOptions, device: torch.device) -> None:
    if device.type != "cpu":
        raise SabError("--isolated-memory measures peak RSS, a CPU figure")
    for name, s in (("ours", result.ours), *result.peers.items()):
        s.isolated_peak_mb, s.isolated_base_mb = isolated_peak_mb(name, opts.preset_spec())
