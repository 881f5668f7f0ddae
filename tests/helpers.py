"""What many tests share: the command line of a tiny, fast training run.

``tiny_run(epochs=2, seq_len=48)`` gives ``["--preset", "tiny", ...]`` with the overrides applied;
``None`` drops a flag. Every test module builds its runs from this one place."""

from __future__ import annotations

from typing import Any

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
