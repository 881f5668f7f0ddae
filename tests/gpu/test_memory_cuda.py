"""The estimator against the CUDA caching allocator: within 10% of ``max_memory_allocated`` for
Lightweight and for the 1b preset, in bf16, measured over real Trainer steps."""

from __future__ import annotations

import gc

import pytest
import torch

from sab_byon_omni.benchmark.common import BenchOptions, random_batch
from sab_byon_omni.benchmark.train import OursStep
from sab_byon_omni.config import replace
from sab_byon_omni.estimate import estimate, fmt_bytes

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset, vocab, seq_len, batch", [("lightweight", 96, 1024, 16), ("1b", 50_000, 2048, 2)])
def test_estimated_peak_is_within_10_percent_of_max_memory_allocated(cuda_only, tmp_path, preset, vocab, seq_len,
                                                                     batch):
    opts = BenchOptions.for_preset(preset=preset, seq_len=seq_len, batch_size=batch, precision="bf16",
                                   vocab_size=vocab, device="cuda")
    cfg = replace(opts.run, checkpoint_dir=str(tmp_path / "ck"))
    gc.collect()  # earlier tests' models, so that the peak is this run's alone
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(cuda_only)
    step = OursStep(cfg, random_batch(batch, seq_len, vocab, 1))
    for _ in range(3):  # AdamW's state exists from the first step on
        step()
    torch.cuda.synchronize(cuda_only)
    measured = torch.cuda.max_memory_allocated(cuda_only)
    e = estimate(cfg.model, seq_len, batch, "bf16", device="cuda", fused_optimizer=True)
    assert abs(e.peak - measured) <= 0.10 * measured, \
        f"{preset}: estimated {fmt_bytes(e.peak)}, measured {fmt_bytes(measured)} ({e.peak / measured - 1:+.1%})"
