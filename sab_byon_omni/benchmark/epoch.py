"""``bench --mode epoch``: optimizer steps of a real job (its config, data, batching and
accumulation), projected to the first epoch and set against the epoch's matmul bound: its real
tokens x FLOPs per token / the matmul peak measured in the run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sab_byon_omni.benchmark.common import best_peak, peak, timed
from sab_byon_omni.benchmark.results import EpochBench, Machine
from sab_byon_omni.config import load_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.batching import IGNORE_INDEX, Batch
from sab_byon_omni.data.factory import load_datasets
from sab_byon_omni.device import intra_op_threads
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import train_flops_per_token
from sab_byon_omni.training.build import build_run
from sab_byon_omni.training.optim import MuonWithAdamW
from sab_byon_omni.training.trainer import Trainer


def _real(windows: list[list[Batch]]) -> int:
    """Non-padding input positions."""
    return sum(int((b.labels != IGNORE_INDEX).sum()) for w in windows for b in w)


def run_epoch_bench(config: str | None, overrides: dict[str, Any], steps: int, warmup: int,
                    n_threads: int | None = None, peak_tflops: float | None = None) -> EpochBench:
    """Time the first ``warmup + steps`` optimizer steps of the job and project its epoch."""
    if steps < 1 or warmup < 0:
        raise SabError(f"--steps={steps} must be at least 1 and --warmup={warmup} not negative")
    with tempfile.TemporaryDirectory(prefix="sab_bench_") as tmp, intra_op_threads(n_threads):
        cfg = load_config(config, {**overrides, "train.checkpoint_dir": str(Path(tmp) / "ckpt"),
                                   "train.resume": "none", "train.progress": "false"})
        tokenizer, train, _ = load_datasets(cfg.data)
        sab = SABTranscendentV2(config=cfg, tokenizer=tokenizer)
        run = build_run(sab.model, tokenizer, train, None, sab.config)
        trainer = Trainer(run)
        t, d = run.cfg.train, run.cfg.data
        if run.info.enabled:
            raise SabError("--mode epoch runs in one process")
        batches = list(trainer.epoch_batches(0))
        windows = [batches[i:i + t.gradient_accumulation_steps]
                   for i in range(0, len(batches), t.gradient_accumulation_steps)]
        if warmup + steps > len(windows):
            raise SabError(f"--warmup + --steps = {warmup + steps} exceeds the epoch's {len(windows)} optimizer steps")
        device, precision = run.device, run.precision
        peak_before = peak(precision.name, device, peak_tflops)
        for w in windows[:warmup]:
            timed(lambda w=w: trainer.train_step(w), device)
        timed_windows = windows[warmup:warmup + steps]
        seconds = sum(timed(lambda w=w: trainer.train_step(w), device) for w in timed_windows)
        top, source = best_peak(peak_before, peak(precision.name, device, peak_tflops))
        epoch_real = _real(windows)
        mean_len = epoch_real / sum(b.input_ids.shape[0] for w in windows for b in w)
        flops_tok = train_flops_per_token(run.cfg.model, round(mean_len))
        tps = _real(timed_windows) / seconds
        bound = epoch_real * flops_tok / (top * 1e12) if top else None
        # Muon's Newton-Schulz iterations: work of the optimizer, apart from the model's FLOPs
        ns_flops = run.optimizer.muon.flops_per_step() if isinstance(run.optimizer, MuonWithAdamW) else 0
        return EpochBench(
            config=config or "(defaults)", preset=run.cfg.model.preset, precision=precision.name,
            batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
            length_bucket_size=d.length_bucket_size, machine=Machine.of(device), optimizer_steps_per_epoch=len(windows),
            steps=steps, warmup=warmup, epoch_real_tokens=epoch_real,
            epoch_positions=sum(b.input_ids.numel() for w in windows for b in w), mean_sample_len=mean_len,
            flops_per_token=flops_tok, peak_tflops=top, peak_source=source, tokens_per_s=tps, timed_s=seconds,
            epoch_s=epoch_real / tps, mfu=tps * flops_tok / (top * 1e12) if top else None, bound_s=bound,
            epoch_over_bound=(epoch_real / tps) / bound if bound else None, optimizer=t.optimizer,
            newton_schulz=f"{t.muon_ns_steps} x {t.muon_ns_coefficients}" if ns_flops else "",
            newton_schulz_flops=ns_flops)
