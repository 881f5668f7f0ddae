"""torchrun integration: process-group set-up, model wrapping (DDP or FSDP2), sharded
checkpoints, and small collectives.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process group
(``nccl`` on CUDA, ``gloo`` on CPU). Without torchrun everything here is a no-op.

FSDP2 (``--parallel fsdp``) shards each block and the root with ``fully_shard``; its checkpoints
are directories written by ``torch.distributed.checkpoint`` (one shard file per rank plus
``meta.pt``, the rest of the guide's checkpoint dict), which ``sab-omni consolidate`` turns into
one ordinary checkpoint file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(world=world, rank=rank, local_rank=local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def wrap_fsdp(model: nn.Module, info: DistInfo, compute_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: ``fully_shard`` every block, then the root (embedding, final norm, tied head).

    Parameters, gradients and optimizer state are split across ranks; each block is all-gathered
    just before its forward and backward. ``compute_dtype`` (bf16/fp16, or None for fp32) is the
    MixedPrecisionPolicy's parameter dtype; gradients are reduced in fp32. Wrap *before* building
    the optimizer: fully_shard replaces the parameters with sharded DTensors.
    """
    if not info.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Any:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """No gradient all-reduce (DDP's ``no_sync``) or reduce-scatter (FSDP2's
    ``set_requires_gradient_sync(False)``) on non-final micro-steps; else a no-op."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    if skip and is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def local(t: Any) -> Any:
    """This rank's shard of a DTensor; anything else unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: Any) -> Any:
    """A DTensor (e.g. FSDP2's gradient norm) as an ordinary tensor; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ------------------------------------------------------------------------- sharded checkpoints
SHARDED_SUFFIX = ".dcp"
META = "meta.pt"


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                 info: DistInfo) -> Path:
    """All ranks write their shards of model and optimizer into the directory ``path`` (via a
    temporary sibling, renamed by rank 0 once every rank is done); ``meta`` (the checkpoint dict
    without the two state dicts) goes to ``path/meta.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from sab_byon_omni.training.checkpoint import atomic_save

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if info.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(info)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if info.is_main:
        atomic_save({**meta, "sharded": True}, tmp / META)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    barrier(info)
    return path


def read_sharded_meta(path: str | Path) -> dict[str, Any]:
    from sab_byon_omni.errors import SabError

    meta = Path(path) / META
    if not meta.is_file():
        raise SabError(f"{path}: not a sharded checkpoint (no {META})")
    try:
        return torch.load(meta, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged file
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise SabError(f"{meta}: not readable: {why}") from None


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 no_dist: bool = False) -> dict[str, Any]:
    """Load a sharded checkpoint into ``model`` (FSDP2-wrapped, or a plain module when
    ``no_dist``) and ``optimizer``; DCP reshards, so the number of ranks may differ from the
    saving run's. Returns the meta dict."""
    meta = read_sharded_meta(path)
    if no_dist:
        import warnings

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            return _load_sharded(path, model, optimizer, meta, no_dist)
    return _load_sharded(path, model, optimizer, meta, no_dist)


def _load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  meta: dict[str, Any], no_dist: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
        model.load_state_dict(state["model"])
        return meta
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta


def sharded_checkpoints(directory: str | Path) -> list[Path]:
    """``*.dcp`` checkpoint directories, oldest first (by their meta file's time)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.glob(f"*{SHARDED_SUFFIX}") if (p / META).is_file() and not p.name.startswith("best_model")]
    return sorted(found, key=lambda p: ((p / META).stat().st_mtime_ns, p.name))


def prune_sharded_steps(directory: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` ``step_*.dcp`` directories."""
    steps = [p for p in sharded_checkpoints(directory) if p.name.startswith("step_")]
    for p in steps[:max(len(steps) - keep_last, 0)]:
        shutil.rmtree(p, ignore_errors=True)


def memory_budget(device: torch.device) -> tuple[float, str]:
    """(bytes this process may use, a description): a CUDA device's total memory, or the
    available RAM (divided among the processes of this machine) on CPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return float(total), f"{torch.cuda.get_device_name(device)} ({total / 2**30:.1f} GiB)"
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        return float("inf"), "unknown RAM"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f" / {local} processes)" if local > 1 else ")"
    return available / local, f"available RAM ({available / 2**30:.1f} GiB{share}"


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
