"""``bench --breakdown``: where each model's training step spends its time, by kind of kernel.

A few more steps of each model run under ``torch.profiler``; every op's self time (CPU time on a
CPU, device time on CUDA) falls in one class, by the op and where it was called from:

* ``matmul``: the dense products (``mm``, ``addmm``, ``bmm``...), the bulk of a step's FLOPs;
* ``attention``: ``scaled_dot_product_attention`` and everything it runs, forward and backward;
* ``optimizer``: everything inside the optimizer's step (fused or foreach AdamW, with the
  per-tensor ops a CPU's foreach runs; Muon's Newton-Schulz) and the gradient clipping's
  ``_foreach`` kernels;
* ``other``: everything else (element-wise work, casts, copies, norms, the loss, autograd).

The first three are the same PyTorch kernels in ours and in a peer doing the same work, so they
bound what any implementation built on them can gain: the ``ceiling`` against a peer is the
speed-up a step whose ``other`` work took no time would reach, the timed ratio (medians of the
run, unprofiled) divided by the share of ours' profiled step those kernels take (so it is never
below the ratio). Shares come from the mean of the profiled steps, and the profiler adds a
little to every op, most to the many small ones (so ``other`` looks somewhat larger than it is,
and the ceiling somewhat higher): read the shares and the ceiling, not the profiled totals, which
also move with the machine's load.
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

from sab_byon_omni.model.ops import NORM_SCOPE

CLASSES = ("matmul", "attention", "optimizer", "other")
SHARED = ("matmul", "attention", "optimizer")  # the same kernels in any implementation of the same step
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv",
                        "aten::addmv", "aten::dot", "aten::_addmm_activation"})
OPTIMIZER_PREFIXES = ("Optimizer.step#", "aten::_fused_adam", "aten::_fused_sgd", "aten::_foreach_")
KINETO_NOISE = re.compile(r"^USDT:.*\bprofiler_(start|stop)\s*$")  # what libkineto writes to stderr per profile


def op_class(name: str) -> str:
    """The class of an op named ``name`` taken alone (an ``aten::`` op or a recorded function)."""
    if name.startswith(OPTIMIZER_PREFIXES):
        return "optimizer"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    return "matmul" if name in MATMUL_OPS else "other"


def event_class(event: Any) -> str:
    """The class of a profiler event in its call tree: everything inside an optimizer's step (its
    ``Optimizer.step#`` scope: the fused or foreach kernels and the per-tensor ops a CPU's foreach
    runs, Muon's Newton-Schulz products) is ``optimizer``, everything inside attention is
    ``attention``, everything inside a norm of ``model.ops`` (its matrix-vector sums) ``other``;
    otherwise the op's own class."""
    node, found = event, op_class(event.name)
    while node is not None:
        cls = op_class(node.name)
        if cls == "optimizer":
            return cls
        if node.name == NORM_SCOPE:
            return "other"
        found = "attention" if cls == "attention" else found
        node = node.cpu_parent
    return found


def tally(pairs: Iterable[tuple[str, float]], steps: int = 1) -> dict[str, float]:
    """Milliseconds per class and step of ``(class, self microseconds)`` pairs over ``steps`` steps."""
    out = dict.fromkeys(CLASSES, 0.0)
    for cls, us in pairs:
        out[cls] += us / 1e3 / steps
    return out


def profile_step(step: Callable[[], Any], device: torch.device, steps: int = 1) -> dict[str, float]:
    """Milliseconds per class of a call of ``step``, the mean of ``steps`` calls under ``torch.profiler``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU])
    with _without_kineto_noise():
        prof.start()
    try:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        with _without_kineto_noise():
            prof.stop()
    ops = [e for e in prof.events() if e.device_type == DeviceType.CPU]  # a kernel's own rows left out
    # on CUDA each op's device time (its kernels'): the CPU only launches them
    return tally(((event_class(e), e.self_device_time_total if cuda else e.self_cpu_time_total) for e in ops),
                 steps)


def shared_share(ours: dict[str, float]) -> float:
    """The share of a profiled step (ms per class) in the kernels every implementation shares."""
    return sum(ours[c] for c in SHARED) / sum(ours.values())


def ceiling(ours: dict[str, float], ours_step_s: float, peer_step_s: float) -> float:
    """The speed-up over a peer (timed step ``peer_step_s``) of ours (``ours_step_s``, ``ours``: its
    profiled ms per class) if all its work outside the shared kernels took no time."""
    return peer_step_s / (ours_step_s * shared_share(ours))


@contextlib.contextmanager
def _without_kineto_noise() -> Iterator[None]:
    """Keep libkineto's "USDT: ... profiler_start / profiler_stop" lines, written straight to file
    descriptor 2 as the profiler starts and stops (nothing else runs meanwhile), out of the
    report; anything else written there meanwhile is passed on after, as far as stderr takes it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        try:
            os.dup2(caught.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not KINETO_NOISE.match(line.rstrip("\n"))]
            try:
                sys.stderr.write("".join(kept))
            except (OSError, ValueError):  # a full or closed stderr: the report still goes to stdout
                pass
