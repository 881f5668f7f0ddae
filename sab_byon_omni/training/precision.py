"""Device and precision, decided once: one autocast context and one GradScaler."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sab_byon_omni.errors import SabError

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SabError(f"train.device={name!r} is not a valid torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SabError(f"train.device={name!r} but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SabError(f"train.device={name!r} but MPS is not available")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX (where bf16 matmuls beat fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on bf16-capable GPUs, fp16 on older GPUs (T4, V100), bf16 on CPUs with native
    bf16 (AMX / AVX-512 BF16), fp32 elsewhere."""
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SabError("train.precision=bf16 but this GPU does not support bf16; use fp16")
        return name
    if device.type == "cuda":  # native bf16 only: a T4 (sm_75) "supports" it by slow emulation
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


@dataclass
class Precision:
    name: str
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16; otherwise its methods pass straight through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def make_precision(name: str, device: torch.device) -> Precision:
    return Precision(resolve_precision(name, device), device)
