"""Muon, an optimizer of its own for the hidden weight matrices (optim.py pairs it with AdamW).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch >= 2.9 ships it as
``torch.optim.Muon``) updates a matrix by the orthogonalised Nesterov momentum of its gradient:
five Newton-Schulz iterations map the momentum to a matrix with its singular vectors and its
singular values pushed towards 1, so each step moves the matrix's directions by similar amounts.
On this project's learning benchmark it is the largest single lever found (docs/RECIPES.md).

Why not ``torch.optim.Muon`` itself: it orthogonalises in bfloat16 always, which CPUs without
native bf16 run some 400x slower than fp32 (a 200-step run of preset small took over 17 minutes
instead of 4), and it does not exist before torch 2.9. The update here is the same algorithm (same
momentum, Nesterov step, Newton-Schulz coefficients, decoupled weight decay and
``sqrt(max(1, rows / cols))`` rate adjustment), with a matrix's rows optionally split into
blocks orthogonalised one by one (a fused qkv as its q, k and v), the iteration in bf16 only where
the device has it natively (:func:`newton_schulz_dtype`) and same-shape matrices stacked into one
call (:func:`shape_batches`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch

from sab_byon_omni.device import native_cuda_bf16
from sab_byon_omni.machine import cpu_has_native_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero
NS_STEPS = 5
MOMENTUM = 0.95
NS_DTYPE_ENV = "SAB_MUON_NS_DTYPE"
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Weights per stacked Newton-Schulz call, at most. On a GPU many matrices per call save kernel launches
# (bounded: 128 MiB in fp32). On a CPU a stack larger than a core's L2 cache (~1 MiB in fp32) ran 10-18%
# slower than one call per matrix, a smaller one up to 2.6x faster (tiny's matrices, bf16): levers.py muon.
BATCH_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Newton-Schulz in ``dtype`` on ``update`` (a matrix, or a batch of matrices along the first
    dimension), returned in ``update``'s dtype: the same singular vectors, and every singular value
    at least about 1/600 of the matrix's Frobenius norm mapped into roughly [0.68, 1.2]. The
    iteration multiplies a small singular value by at most 3.4445 per step (the quintic's slope at
    zero), so smaller ones stay small: 1e-4 of the norm ends near 0.05, 1e-3 near 0.47."""
    a, b, c = NS_COEFFICIENTS
    tall = update.size(-2) > update.size(-1)
    # iterate on the smaller Gram matrix, in a contiguous copy (bmm would copy a transposed view each time)
    x = (update.mT if tall else update).to(dtype, memory_format=torch.contiguous_format)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    batch = x.view(-1, *x.shape[-2:])
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, G = x x^T, with the sums inside the matmuls
        gram = torch.bmm(batch, batch.mT)
        batch = torch.baddbmm(batch, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), batch, beta=a)
    x = batch.view(x.shape)
    return (x.mT if tall else x).to(update.dtype)


def shape_batches(shapes: list[tuple[Any, ...]], max_elements: int | None = None) -> list[list[int]]:
    """Which matrices to orthogonalise in one call (modded-nanogpt's batching): indices into
    ``shapes``, each ``(device, dtype, k, rows, cols)`` for ``k`` matrices of ``rows x cols``, in
    batches of one device, dtype and shape (a tall matrix counts transposed, so ``rows x cols`` and
    ``cols x rows`` share one) of at most ``max_elements`` weights (default: the device's
    :data:`BATCH_ELEMENTS`; one matrix alone, if larger)."""
    by_shape: dict[tuple[Any, ...], list[list[int]]] = {}
    size: dict[tuple[Any, ...], int] = {}
    for i, (device, dtype, k, rows, cols) in enumerate(shapes):
        key, n = (device, dtype, min(rows, cols), max(rows, cols)), k * rows * cols
        limit = max_elements or BATCH_ELEMENTS.get(device.type, BATCH_ELEMENTS["cuda"])
        batches = by_shape.setdefault(key, [[]])
        if batches[-1] and size[key] + n > limit:
            batches.append([])
            size[key] = 0
        batches[-1].append(i)
        size[key] = size.get(key, 0) + n
    return [b for batches in by_shape.values() for b in batches]


def orthogonalize_stacked(updates: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """:func:`orthogonalize` of each of ``updates`` (``(k, rows, cols)`` batches of matrices of one
    shape, up to transposition) in one call: the tall ones go in transposed."""
    tall = [u.size(-2) > u.size(-1) for u in updates]
    together = orthogonalize(torch.cat([u.mT if t else u for u, t in zip(updates, tall)]), dtype=dtype)
    return [x.mT if t else x for x, t in zip(together.split([u.size(0) for u in updates]), tall)]


def orthogonalize_all(updates: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """:func:`orthogonalize` of each of ``updates`` (``(k, rows, cols)`` batches of matrices), one
    call per batch of :func:`shape_batches`. ``dtype``: that of the iteration (default:
    :func:`newton_schulz_dtype` of the matrices' device)."""
    out = list(updates)
    for members in shape_batches([(u.device, u.dtype, *u.shape) for u in updates]):
        batch = [updates[i] for i in members]
        for i, x in zip(members, orthogonalize_stacked(batch, dtype or newton_schulz_dtype(batch[0].device))):
            out[i] = x
    return out


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype Muon runs Newton-Schulz in on ``device``: bf16 where the device multiplies bf16
    natively (CUDA sm_80+, a CPU with AVX-512 BF16 or AMX: the checks ``precision: auto`` uses), fp32
    where bf16 would be emulated (T4, V100, AVX2-only CPUs: several times slower than fp32).
    ``SAB_MUON_NS_DTYPE=fp32`` (or ``bf16``) forces one, for benchmarks."""
    forced = os.environ.get(NS_DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in NS_DTYPES:
            raise ValueError(f"{NS_DTYPE_ENV}={forced[:20]!r} is not one of: {', '.join(NS_DTYPES)}")
        return NS_DTYPES[forced]
    native = native_cuda_bf16(device) if device.type == "cuda" else device.type == "cpu" and cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


def row_runs(split: int | Iterable[int], rows: int) -> list[tuple[int, int, int]]:
    """A matrix's row blocks as runs of equal blocks ``(first row, count, rows each)``: ``split`` is
    a number of equal blocks (3 for a fused qkv) or the blocks' sizes (``[q, kv, kv]`` with grouped
    key/value heads: two runs)."""
    sizes = [rows // split] * split if isinstance(split, int) else list(split)
    runs: list[tuple[int, int, int]] = []
    start = 0
    for size in sizes:
        if runs and runs[-1][2] == size:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, size)
        else:
            runs.append((start, 1, size))
        start += size
    return runs


def _check_split(group: dict[str, Any]) -> None:
    k = group["split"]
    sizes = [k] if isinstance(k, int) else list(k) if isinstance(k, (list, tuple)) else [None]
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise ValueError(f"Muon's split must be a positive integer or a list of row counts, got {k!r}")
    fits = (lambda n: n % k == 0) if isinstance(k, int) else (lambda n: n == sum(sizes))
    bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2 or not fits(p.shape[0])]
    if bad:
        raise ValueError(f"Muon updates 2-D matrices whose rows split into {k}; got {bad[0]}")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: Nesterov momentum (``momentum``), orthogonalised by
    :func:`orthogonalize`, applied at ``lr * sqrt(max(1, rows / cols))`` after the decoupled weight
    decay ``p -= lr * weight_decay * p``.

    A group's ``split`` (default 1) says its matrices' rows are that many equal blocks, each
    orthogonalised on its own (3 for a fused qkv), or lists the blocks' row counts when they differ
    (``[q, kv, kv]`` with grouped key/value heads). Other keys of a group are kept as they are (the
    ``muon`` mark of :class:`~sab_byon_omni.training.optim.MuonWithAdamW`'s groups). ``ns_dtype``:
    the dtype of the Newton-Schulz iteration (default: :func:`newton_schulz_dtype` of the
    parameters' device, asked at the first step there). The state of a parameter is its
    ``momentum_buffer``.

    ``process_group`` (DDP, where every rank holds the same gradients after the all-reduce): the
    ranks split the work as modded-nanogpt does. The shape batches go to the ranks by their cost
    (:func:`assign_owners`), each rank orthogonalises its share, and one all-gather hands every rank
    all the directions. Every rank still keeps every momentum buffer and applies every update, so
    its state is that of one rank alone, and a checkpoint of rank 0 holds all of it."""

    def __init__(self, params: Iterable[Any], lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = MOMENTUM, split: int | list[int] = 1, ns_dtype: torch.dtype | None = None,
                 process_group: Any = None) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, split=split))
        self.ns_dtype = ns_dtype
        self.process_group = process_group  # ranks that share the Newton-Schulz work (identical gradients: DDP)
        self.ns_dtypes: dict[torch.device, torch.dtype] = {}  # the default's choice per device, made once

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_split(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _nesterov(self, p: torch.Tensor, group: dict[str, Any], keep: bool = True) -> torch.Tensor | None:
        """The Nesterov momentum of ``p``'s gradient (its buffer updated; ``keep=False``: only that)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, beta = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - beta)
        return p.grad.lerp(buf, beta) if keep else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one unit per run of equal row blocks of a matrix: (parameter, group, first row, blocks, rows each)
        todo = [(p, g, *run) for g in self.param_groups for p in g["params"] if p.grad is not None
                for run in row_runs(g["split"], p.shape[0])]
        if not todo:
            return loss
        batches = shape_batches([(p.device, p.dtype, k, rows, p.shape[1]) for p, _, _, k, rows in todo])
        device = todo[0][0].device
        if device not in self.ns_dtypes:
            self.ns_dtypes[device] = newton_schulz_dtype(device)
        dtype = self.ns_dtype or self.ns_dtypes[device]
        world, rank = _world_and_rank(self.process_group)
        owners = assign_owners([_cost(todo[i] for i in b) for b in batches], world)
        owned = {id(todo[i][0]) for b, members in enumerate(batches) if owners[b] == rank for i in members}
        momenta: dict[int, torch.Tensor] = {}  # the Nesterov momentum of the matrices this rank orthogonalises
        for g in self.param_groups:  # every rank updates every buffer: each holds the whole state
            for p in g["params"]:
                if p.grad is not None:
                    direction = self._nesterov(p, g, keep=id(p) in owned)
                    if direction is not None:
                        momenta[id(p)] = direction
        directions: dict[int, list[torch.Tensor]] = {}
        for b, members in enumerate(batches):
            if owners[b] == rank:
                blocks = [momenta[id(p)][start:start + k * rows].view(k, rows, p.shape[1])
                          for p, _, start, k, rows in (todo[i] for i in members)]
                directions[b] = orthogonalize_stacked(blocks, dtype)
        momenta.clear()
        if world > 1:
            directions = _exchange(directions, batches, todo, owners, world, rank, dtype, self.process_group)
        decayed: set[torch.Tensor] = set()
        for b, members in enumerate(batches):
            for (p, group, start, k, rows), direction in zip((todo[i] for i in members), directions[b]):
                if p not in decayed:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # once per matrix, before its update
                    decayed.add(p)
                cols, lr = p.shape[1], group["lr"]
                p[start:start + k * rows].view(k, rows, cols).add_(direction.to(p.dtype),
                                                                   alpha=-lr * math.sqrt(max(1.0, rows / cols)))
            directions[b] = []
        return loss


def _world_and_rank(group: Any) -> tuple[int, int]:
    """(processes sharing the work, this one's rank): (1, 0) without a process group."""
    if group is None or not torch.distributed.is_initialized():
        return 1, 0
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def _cost(units: Iterable[tuple[Any, ...]]) -> int:
    """Newton-Schulz's multiply-adds of a batch, up to a constant: k x rows x cols x min(rows, cols) per unit."""
    return sum(k * rows * p.shape[1] * min(rows, p.shape[1]) for p, _, _, k, rows in units)


def assign_owners(costs: list[int], world: int) -> list[int]:
    """Which rank orthogonalises each batch: the costliest first, each to the least loaded rank so
    far (ties: the lower rank), a function of the costs alone, so every rank computes the same."""
    load = [0] * world
    owners = [0] * len(costs)
    for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[b] = r
        load[r] += costs[b]
    return owners


def _exchange(directions: dict[int, list[torch.Tensor]], batches: list[list[int]], todo: list[tuple[Any, ...]],
              owners: list[int], world: int, rank: int, dtype: torch.dtype, group: Any) -> dict[int, list[torch.Tensor]]:
    """Every batch's directions on every rank: each rank's own, flattened in ``dtype`` (the
    iteration's: no rounding, the directions were computed in it), in one all-gather, padded to the
    largest rank's share."""
    sizes = [sum(todo[i][3] * todo[i][4] * todo[i][0].shape[1] for i in m) for m in batches]
    share = [sum(n for b, n in enumerate(sizes) if owners[b] == r) for r in range(world)]
    device = todo[0][0].device
    flat = torch.zeros(max(share), dtype=dtype, device=device)
    mine = [x.reshape(-1) for b in sorted(directions) for x in directions[b]]
    if mine:
        torch.cat(mine, out=flat[:share[rank]])
    out = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(out, flat, group=group)
    offsets = [0] * world
    result: dict[int, list[torch.Tensor]] = {}
    for b, members in enumerate(batches):
        r, parts = owners[b], []
        for p, _, _, k, rows in (todo[i] for i in members):
            n = k * rows * p.shape[1]
            parts.append(out[r][offsets[r]:offsets[r] + n].view(k, rows, p.shape[1]))
            offsets[r] += n
        result[b] = parts
    return result
