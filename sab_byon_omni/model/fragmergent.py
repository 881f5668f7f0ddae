"""Fragmergent modulation of the token embeddings.

    phi(t) = lambda * exp(-alpha * t) * sin(omega * t)
    hidden <- hidden * (1 + strength * phi(t))

``t`` depends on the mode:

* ``step``  (default): t = optimizer step mod 100, set by the trainer through :meth:`set_step`.
  Same seed, same run: reproducible, and a resumed run continues the same sequence.
* ``clock``: t = wall-clock seconds mod 100, read at every forward (the original guide's
  behaviour; two identical runs differ).
* ``fixed``: t = a configured constant.
* ``off``  : no modulation.

One scalar multiplies every position at once: no Python loop over tokens.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

PERIOD = 100.0


def phi(t: torch.Tensor | float, alpha: float = 0.02, lambda_: float = 0.2, omega: float = 2.0) -> torch.Tensor | float:
    """phi(t) = lambda * exp(-alpha t) * sin(omega t): elementwise for a tensor, a float for a float."""
    if isinstance(t, torch.Tensor):
        return lambda_ * torch.exp(-alpha * t) * torch.sin(omega * t)
    return lambda_ * math.exp(-alpha * t) * math.sin(omega * t)


class Fragmergent(nn.Module):
    def __init__(self, mode: str = "step", t: float = 0.0, alpha: float = 0.02, lambda_: float = 0.2,
                 omega: float = 2.0, strength: float = 0.1) -> None:
        super().__init__()
        self.mode, self.fixed_t = mode, float(t)
        self.alpha, self.lambda_, self.omega, self.strength = alpha, lambda_, omega, strength
        # The optimizer step the modulation follows in "step" mode. Persistent, so a saved model
        # samples with the same modulation it last trained with.
        self.register_buffer("step", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        self.step.fill_(float(step))

    def current_t(self) -> torch.Tensor | float:
        if self.mode == "step":
            return torch.remainder(self.step, PERIOD)
        if self.mode == "clock":
            return time.time() % PERIOD
        return self.fixed_t

    def scale(self) -> torch.Tensor | float:
        """The factor 1 + strength * phi(t): a 0-d tensor in step mode, a float otherwise."""
        return 1.0 + self.strength * phi(self.current_t(), self.alpha, self.lambda_, self.omega)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        s = self.scale()
        if isinstance(s, torch.Tensor):
            s = s.to(x.dtype)
        return x * s

    def extra_repr(self) -> str:
        return f"mode={self.mode}, alpha={self.alpha}, lambda={self.lambda_}, omega={self.omega}, strength={self.strength}"
