"""torchrun integration: process-group set-up, model wrapping (DDP or FSDP2), and the few collectives.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process group
(``nccl`` on CUDA, ``gloo`` on CPU). Without torchrun everything here is a no-op. This module is
the one place that reads where a process stands among the others (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``: :func:`launch_info`). FSDP2's sharded checkpoints are read and written by
:mod:`sab_byon_omni.files.dcp`.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sab_byon_omni.errors import SabError


@dataclass(frozen=True)
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launch_info() -> DistInfo:
    """This process's place among the processes torchrun started (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``), read from the environment without joining anything; one process without torchrun."""
    world = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    if world == 1:
        return DistInfo()
    return DistInfo(world=world, rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started."""
    return launch_info().enabled


def uses_fsdp(parallel: str, info: DistInfo) -> bool:
    """FSDP2 (sharded parameters, gradients, optimizer state and checkpoints): asked for
    (``train.parallel: fsdp``) and more than one process to shard over."""
    return parallel == "fsdp" and info.enabled


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if there is one."""
    info = launch_info()
    if not info.enabled:
        return info
    local_rank = info.local_rank
    if not dist.is_initialized():
        # the first step compiles, reads data and (FSDP) materialises the model: a long wait at start
        timeout = wait_limits().start
        step_wait_limit()  # a bad value stops the run now, not after its first step
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return info


START_TIMEOUT_ENV = "SAB_DIST_TIMEOUT_S"  # collectives until the first step is done, and around saves
STEP_TIMEOUT_ENV = "SAB_DIST_STEP_TIMEOUT_S"  # collectives after it
START_TIMEOUT_S, STEP_TIMEOUT_S = 3600.0, 600.0


@dataclass(frozen=True)
class WaitLimits:
    """How long a collective may wait for the other processes (torchtitan's pattern): ``start``
    until the first optimizer step is done (compiling, reading data, building the model all take
    their time on some rank first) and around saves (a big single-file checkpoint written by rank 0
    keeps the others waiting); ``step`` after that, so that a stuck or dead rank stops the run
    within minutes instead of an hour."""

    start: datetime.timedelta
    step: datetime.timedelta


def _seconds(env: str, default: float) -> datetime.timedelta:
    raw = os.environ.get(env, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not 1 <= value < 1e8:
        raise SabError(f"{env}={raw[:20]!r} must be a number of seconds from 1 to 100,000,000 (about 3 years)")
    return datetime.timedelta(seconds=value)


def wait_limits() -> WaitLimits:
    """The limits from ``SAB_DIST_TIMEOUT_S`` (default an hour) and ``SAB_DIST_STEP_TIMEOUT_S``
    (default 10 minutes; never longer than the first)."""
    start = _seconds(START_TIMEOUT_ENV, START_TIMEOUT_S)
    return WaitLimits(start, min(step_wait_limit(), start))


def step_wait_limit() -> datetime.timedelta:
    return _seconds(STEP_TIMEOUT_ENV, STEP_TIMEOUT_S)


def set_wait_limit(limit: datetime.timedelta, info: DistInfo) -> None:
    """Every later collective of the default process group may wait ``limit`` (torchtitan shortens
    it the same way, with the same private torch call; gloo and NCCL both take it)."""
    if info.enabled and dist.is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(limit, dist.group.WORLD)


@contextlib.contextmanager
def long_waits(info: DistInfo, after: datetime.timedelta | None) -> Any:
    """The start's long limit inside (a save), ``after`` again once done (None: leave it long)."""
    if not info.enabled or after is None:
        yield
        return
    set_wait_limit(wait_limits().start, info)
    try:
        yield
    finally:
        set_wait_limit(after, info)


def shutdown() -> None:
    """Leave the process group (the trainer calls this when it joined one)."""
    if dist.is_initialized():
        try:  # leave together: a rank that tears gloo down while a peer still talks to it can abort the peer
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: leave anyway
            pass
        dist.destroy_process_group()


def data_parallel_group(info: DistInfo) -> Any:
    """The process group whose ranks hold the same gradients after DDP's all-reduce (all of them),
    or None in a single process."""
    return dist.group.WORLD if info.enabled and dist.is_initialized() else None


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    # the model's buffers (RoPE tables) are the same on every rank by construction: no broadcast per
    # forward (torch >= 2.13 names it forward_sync_buffers and deprecates broadcast_buffers; the one
    # sync at init it keeps copies equal tables); the gradients live in DDP's all-reduce buckets
    # instead of a second fp32 copy
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **no_sync)


def wrap_fsdp(model: nn.Module, compute_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: ``fully_shard`` every block, then the root (embedding, final norm, tied head).

    Parameters, gradients and optimizer state are split across ranks; each block is all-gathered
    just before its forward and backward. ``compute_dtype`` (bf16/fp16, or None for fp32) is the
    MixedPrecisionPolicy's parameter dtype; gradients are reduced in fp32. Wrap *before* building
    the optimizer: fully_shard replaces the parameters with sharded DTensors. Any process group
    will do, a world of one included (the GPU check runs FSDP2 so on one GPU).
    """
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_meta(model: nn.Module) -> bool:
    """A model built on the meta device (shapes only), to be materialised after sharding."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, init_weights: bool = True) -> None:
    """Allocate a meta-built model (FSDP2-sharded or not) on ``device`` and give it the values a
    normal build with the same seed has: each rank draws only the rows of its own shards (see
    :mod:`sab_byon_omni.model.init`), so neither the host nor the GPU ever holds the whole model.
    ``init_weights=False`` (a resume loads them next) sets only the buffers."""
    from sab_byon_omni.model.init import init_rows

    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keep each Parameter object: ties survive
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if init_weights:
        for index, p, std in model.init_plan():
            local, start = _local_rows(p)
            init_rows(local, p.shape, model.init_seed, index, std, start)
    model.reset_buffers()


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part of ``p``, its first row in the full parameter): FSDP2 shards dim 0 in
    ``torch.chunk`` pieces; a plain tensor is all of itself."""
    if not hasattr(p, "device_mesh"):
        return p, 0
    from torch.distributed.tensor import Shard

    local = p.to_local()
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(f"materialising a DTensor placed {p.placements} on a {mesh.ndim}-d mesh")
    rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    if local.shape[0] != min(chunk, rows - start):
        raise RuntimeError(f"unexpected FSDP shard: {tuple(local.shape)} of {tuple(p.shape)} on rank {rank}/{world}")
    return local, start


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` on non-final micro-steps (gradients all-reduced once per optimizer step).

    FSDP2 reduce-scatters on every micro-step instead: skipping it
    (``set_requires_gradient_sync(False)``) would keep every block's *unsharded* fp32 gradients
    until the last micro-step, 4 bytes x all parameters per rank (~30 GB for the 3b preset), which
    is exactly what sharding is for avoiding; the memory estimate counts sharded gradients.
    """
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def local(t: Any) -> Any:
    """This rank's shard of a DTensor; anything else unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: Any) -> Any:
    """A DTensor (e.g. FSDP2's gradient norm) as an ordinary tensor; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def agree_min(value: float, info: DistInfo, device: torch.device) -> float:
    """The smallest of every rank's ``value`` (one collective; ``value`` without torchrun): a plan
    that must be the same on every rank, made from what each rank measured."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without torchrun)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


STOP_SIGNAL = 15  # SIGTERM: what torchrun sends, and what a stop another process received is reported as


def agree(norm: torch.Tensor, stop: bool, info: DistInfo) -> tuple[float, int]:
    """(gradient norm, a stop signal any process received or 0): the optimizer step's one host
    synchronisation, with under torchrun one tiny collective so that every process stops at the
    same step."""
    if not info.enabled:
        return float(norm), 0
    flags = torch.stack([norm.detach().float().reshape(()), torch.tensor(float(stop), device=norm.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    value, any_stop = flags.tolist()
    return value, STOP_SIGNAL if any_stop else 0


def all_finite(model: nn.Module, info: DistInfo, device: torch.device, sharded: bool) -> bool:
    """Whether every weight of ``model`` is finite (each process checks its own shard; ``sharded``:
    FSDP, where the answer is agreed over all processes)."""
    params = [local(p).detach() for p in model.parameters()]
    finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    if sharded:
        finite = all_reduce_sum([float(not finite)], info, device)[0] == 0
    return finite
