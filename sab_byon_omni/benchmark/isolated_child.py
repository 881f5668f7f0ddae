"""The child process of ``bench --isolated-memory`` (see :mod:`sab_byon_omni.benchmark.isolated`):
builds one model's training step, runs it and prints its peak RSS. A module of its own so that
the measuring side never imports the training step it measures (no import cycle)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sab_byon_omni.benchmark.common import BenchOptions, random_batch
from sab_byon_omni.benchmark.isolated import current_rss_mb, peak_rss_mb, reset_peak_rss
from sab_byon_omni.benchmark.peers import PEER_STEPS
from sab_byon_omni.benchmark.train import OursStep
from sab_byon_omni.config import replace
from sab_byon_omni.device import intra_op_threads, make_precision, resolve_device


def child_main(arg: str) -> None:
    """In the child: build one model's step, run it, print peak and baseline RSS as JSON."""
    spec = json.loads(arg)
    name, warmup = spec.pop("name"), spec.pop("warmup", 1)
    opts = BenchOptions.for_preset(**spec)
    with tempfile.TemporaryDirectory(prefix="sab_bench_") as tmp, intra_op_threads(opts.threads):
        cfg = replace(opts.run, checkpoint_dir=str(Path(tmp) / "ckpt"))
        device = resolve_device(cfg.train.device)
        batch = random_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, cfg.train.seed)
        if name == "hf":
            import transformers  # noqa: F401  (imported before the baseline, like the package itself)
        base = current_rss_mb()
        reset_peak_rss()
        step = OursStep(cfg, batch) if name == "ours" else PEER_STEPS[name](cfg, batch, make_precision(
            cfg.train.precision, device))
        for _ in range(1 + warmup):
            step()
        peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "base_mb": base}))
