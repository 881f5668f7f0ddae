"""What many tests share: a tiny, fast training run (as command-line flags, or as a config and a
Trainer built without the CLI), and the precisions a CPU takes.

``tiny_run(epochs=2, seq_len=48)`` gives ``["--preset", "tiny", ...]`` with the overrides applied;
``None`` drops a flag. ``tiny_config(tmp_path, max_steps=3)`` is a RunConfig of a tiny run writing
into ``tmp_path / "ckpt"``, and ``trainer_for(cfg)`` the Trainer of its run on its synthetic data
(built: the folder locked, the model placed; nothing trained yet). Every test module builds its
runs from these.

``precision: auto`` is bf16 on a CPU with native bf16 (AVX-512 BF16 or AMX) and fp32 on others
(AVX2 only). A test that depends on the precision pins it; one that checks each path takes
:data:`CPU_PRECISIONS`, whose bf16 case runs where the CPU has it natively. ``SAB_CPU_NATIVE_BF16=0
python -m pytest`` runs the suite as an AVX2-only CPU would, on any CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sab_byon_omni.machine import cpu_has_native_bf16

if TYPE_CHECKING:
    from sab_byon_omni.config import RunConfig
    from sab_byon_omni.training.trainer import Trainer

needs_native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 on this CPU (AVX-512 BF16 "
                                       "or AMX; or SAB_CPU_NATIVE_BF16=0): precision auto is fp32 here")
CPU_PRECISIONS = [pytest.param("fp32", id="fp32"), pytest.param("bf16", id="bf16", marks=needs_native_bf16)]

# A run of a few seconds on one CPU core: the tiny preset (~0.1M parameters), fp32, no progress bar.
TINY_RUN: dict[str, Any] = dict(preset="tiny", epochs=1, num_samples=40, seq_len=32, batch_size=4,
                                gradient_accumulation_steps=1, learning_rate=3e-3, precision="fp32", device="cpu",
                                progress="false", log_interval=1)


def tiny_run(**overrides: Any) -> list[str]:
    """CLI flags of :data:`TINY_RUN` with ``overrides`` (a value of None leaves the flag out)."""
    flags: list[str] = []
    for key, value in {**TINY_RUN, **overrides}.items():
        if value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def tiny_config(tmp_path: Path, **train: Any) -> RunConfig:
    """A tiny run on 200 synthetic samples of 128 tokens, 8 x 2 per optimizer step, writing into
    ``tmp_path / "ckpt"``; ``train``: train-section overrides (``max_steps=3``, ``precision="fp32"``)."""
    from sab_byon_omni.config import build_config

    return build_config({
        "model": {"preset": "tiny"},
        "data": {"num_samples": 200, "seq_len": 128},
        "train": {"epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
                  "checkpoint_dir": str(Path(tmp_path) / "ckpt"), "progress": False, "log_interval": 1, **train},
    })


def trainer_for(cfg: RunConfig) -> Trainer:
    """The Trainer of ``cfg``'s run on its synthetic data (the run built; nothing trained yet)."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.data.factory import load_datasets
    from sab_byon_omni.training.build import build_run
    from sab_byon_omni.training.trainer import Trainer

    tok, train, val = load_datasets(cfg.data)
    sab = SABTranscendentV2(config=cfg, tokenizer=tok)
    return Trainer(build_run(sab.model, tok, train, val, sab.config))
