"""What many tests share: the command line of a tiny, fast training run, and the precisions a CPU
takes.

``tiny_run(epochs=2, seq_len=48)`` gives ``["--preset", "tiny", ...]`` with the overrides applied;
``None`` drops a flag. Every test module builds its runs from this one place.

``precision: auto`` is bf16 on a CPU with native bf16 (AVX-512 BF16 or AMX) and fp32 on others
(AVX2 only). A test that depends on the precision pins it; one that checks each path takes
:data:`CPU_PRECISIONS`, whose bf16 case runs where the CPU has it natively. ``SAB_CPU_NATIVE_BF16=0
python -m pytest`` runs the suite as an AVX2-only CPU would, on any CPU."""

from __future__ import annotations

from typing import Any

import pytest

from sab_byon_omni.machine import cpu_has_native_bf16

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
