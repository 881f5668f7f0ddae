"""``bench --breakdown``: where each model's training step spends its time, by kind of kernel.

One more step of each model runs under ``torch.profiler``; every op's self time (CPU time on a CPU,
device time on CUDA) falls in one class:

* ``matmul``: the dense products (``mm``, ``addmm``, ``bmm``...), the bulk of a step's FLOPs;
* ``attention``: ``scaled_dot_product_attention``'s kernels, forward and backward;
* ``optimizer``: the optimizer's and the gradient clipping's fused or ``_foreach`` kernels;
* ``other``: everything else (element-wise work, casts, copies, norms, the loss, autograd).

The first three are the same PyTorch kernels in ours and in a peer doing the same work, so they
bound what any implementation built on them can gain: the ``ceiling`` against a peer is the
peer's timed step (the median of the run, unprofiled) over ours' matmul, attention and optimizer
time alone, the speed-up a step whose ``other`` work took no time would reach. The profiler adds a
little to every op, most to the many small ones (so ``other`` looks larger than it is, the peer's
with its more and smaller ops the most): read the shares, and the ceiling, not the profiled totals.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

CLASSES = ("matmul", "attention", "optimizer", "other")
SHARED = ("matmul", "attention", "optimizer")  # the same kernels in any implementation of the same step
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv",
                        "aten::addmv", "aten::dot", "aten::_addmm_activation"})
OPTIMIZER_PREFIXES = ("aten::_fused_adam", "aten::_fused_sgd", "aten::_foreach_")
KINETO_NOISE = re.compile(r"^USDT:.*\bprofiler_(start|stop)\s*$")  # what libkineto writes to stderr per profile


def op_class(name: str) -> str:
    """The class of a profiler event named ``name`` (an ``aten::`` op or a recorded function)."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if name.startswith(OPTIMIZER_PREFIXES):
        return "optimizer"
    return "other"


def classify(events: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Milliseconds per class of ``(op name, self microseconds)`` pairs."""
    out = dict.fromkeys(CLASSES, 0.0)
    for name, us in events:
        out[op_class(name)] += us / 1e3
    return out


def profile_step(step: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Milliseconds per class of one call of ``step``, from ``torch.profiler``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with _without_kineto_noise(), profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]  # the kernels' own rows left out
    if cuda:  # each op's device time (its kernels'): the CPU only launches them
        return classify((e.key, e.self_device_time_total) for e in ops)
    return classify((e.key, e.self_cpu_time_total) for e in ops)


def ceiling(ours: dict[str, float], peer_step_s: float) -> float:
    """The speed-up over a peer whose step takes ``peer_step_s`` seconds of a step that ran ours'
    shared kernels (``ours``: ms per class) and nothing else."""
    return peer_step_s * 1e3 / sum(ours[c] for c in SHARED)


@contextlib.contextmanager
def _without_kineto_noise() -> Iterator[None]:
    """Keep libkineto's "USDT: ... profiler_start / profiler_stop" lines, written straight to file
    descriptor 2, out of the report; anything else written there meanwhile is passed on after."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not KINETO_NOISE.match(line.rstrip("\n"))]
            sys.stderr.write("".join(kept))
