"""Device and precision, decided once: the device, one autocast context and one GradScaler."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sab_byon_omni.errors import SabError
from sab_byon_omni.machine import cpu_has_native_bf16

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
    except (RuntimeError, ValueError, TypeError):
        raise SabError(f"train.device={name[:40]!r} is not a valid torch device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise SabError(f"train.device={name[:40]!r}: training and sampling run on cpu, cuda or mps, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SabError(f"train.device={name!r} but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SabError(f"train.device={name!r} but MPS is not available")
    return device


def native_cuda_bf16(device: torch.device) -> bool:
    """bf16 in hardware (sm_80+). ``torch.cuda.is_bf16_supported()`` also counts emulation, so a
    T4 or V100 would pass and then run bf16 slowly, with attention falling back to the math kernel."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on bf16-capable GPUs, fp16 on older GPUs (T4, V100), bf16 on CPUs with native
    bf16 (AMX / AVX-512 BF16), fp32 elsewhere."""
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not native_cuda_bf16(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise SabError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no "
                           "native bf16 (it needs sm_80 or newer: A100, L4, H100...); use --precision fp16, which "
                           "trains with a GradScaler, or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if native_cuda_bf16(device) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def runs_natively(name: str, device: torch.device) -> bool:
    """Whether ``device`` computes in precision ``name`` in hardware: fp32 everywhere, fp16 and bf16
    (sm_80+) on CUDA, bf16 on CPUs with AVX-512 BF16 or AMX. Elsewhere it runs emulated, far slower."""
    if name == "fp32":
        return True
    if device.type == "cuda":
        return name == "fp16" or native_cuda_bf16(device)
    return device.type == "cpu" and name == "bf16" and cpu_has_native_bf16()


def trained_precision(trained: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) to score a model on ``device`` in: the one it was trained in (its
    ``train.precision``, ``auto`` resolved on this device), so that evaluation repeats the training
    loop's validation exactly; where this device lacks that precision in hardware, the device's own
    choice (``auto``), which differs from training's numbers by rounding (docs/DATA.md)."""
    if trained == "auto":
        name = resolve_precision("auto", device)
        return name, f"train.precision=auto on this {device.type}"
    if runs_natively(trained, device):
        return trained, f"train.precision={trained}"
    name = resolve_precision("auto", device)
    return name, f"train.precision={trained}, which this {device.type} has no native {trained} for"


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


def set_deterministic(device: torch.device) -> None:
    """Deterministic kernels everywhere, so that a resumed run is bitwise equal to an uninterrupted one.

    On CUDA, cuBLAS needs a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when its handle is
    created, so this must run before the first matmul), and attention's backward takes its
    deterministic path only when non-deterministic kernels are errors rather than warnings.
    """
    if device.type == "cuda":
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
            log.warning("deterministic is best-effort in this process: CUDA was already in use before "
                        "CUBLAS_WORKSPACE_CONFIG could be set (start the process with "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 for bitwise repeatable matmuls)")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cuda")


def set_fp32_matmul(device: torch.device, deterministic: bool) -> str:
    """On CUDA, fp32 matmuls on the TF32 tensor cores (``torch.set_float32_matmul_precision("high")``,
    about 8x the plain fp32 rate on A100/H100, a 10-bit mantissa for the products) unless the run is
    deterministic, which keeps full fp32 ("highest"). Returns the setting; the MFU peak of
    :func:`sab_byon_omni.machine.gpu_peak_tflops` follows it. A CPU is left as it is."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest" if deterministic else "high")
    return torch.get_float32_matmul_precision()


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: as they are), then restore the
    caller's number: torch's setting is process-wide."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
