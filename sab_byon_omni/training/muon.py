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
import typing
from collections.abc import Iterable
from typing import Any

import torch

from sab_byon_omni.config.schema import MUON_NS_STEPS, NsCoefficients
from sab_byon_omni.device import native_cuda_bf16
from sab_byon_omni.estimate import MUON_BATCH_ELEMENTS
from sab_byon_omni.machine import cpu_has_native_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero
NS_STEPS = 5
# The Polar Express schedule (Amsel, Persson, Musco and Gower 2025, "The Polar Express: Optimal Matrix Sign
# Methods and Their Application to the Muon Algorithm", arXiv:2505.16932): one odd quintic per iteration,
# each the minimax-optimal one for the interval of singular values the previous ones leave. These are the
# coefficients modded-nanogpt uses (KellerJordan/modded-nanogpt, train_gpt.py, `polar_express_coeffs`:
# "computed for num_iters=5, safety_factor=2e-2, cushion=2"), with its normalisation: the matrix divided by
# (1 + 2e-2) x its Frobenius norm + 1e-6 before the first iteration (the safety factor: bf16 rounding must
# not push a singular value past the interval the polynomials were fitted on). Fewer steps take the first
# ones; more repeat the last, as the paper's reference code does.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
POLAR_EXPRESS_SAFETY = 2e-2
NS_SCHEDULES = typing.get_args(NsCoefficients)  # train.muon_ns_coefficients: quintic, polar_express
NS_SCHEDULE = "quintic"
NS_STEPS_RANGE = MUON_NS_STEPS  # train.muon_ns_steps' range: at least one iteration; beyond 20 only the cost grows
MOMENTUM = 0.95
NS_DTYPE_ENV = "SAB_MUON_NS_DTYPE"
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Weights per stacked Newton-Schulz call, at most. On a GPU many matrices per call save kernel launches
# (bounded: 128 MiB in fp32). On a CPU a stack larger than a core's L2 cache (~1 MiB in fp32) ran 10-18%
# slower than one call per matrix, a smaller one up to 2.6x faster (tiny's matrices, bf16): levers.py muon.
# (The memory estimate counts one such batch's temporaries: it lives in estimate.py for that.)
BATCH_ELEMENTS = MUON_BATCH_ELEMENTS


def ns_coefficients(schedule: str = NS_SCHEDULE, steps: int = NS_STEPS) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` Newton-Schulz iterations, ``x <- a x + b (x x^T) x + c (x x^T)^2 x``:
    ``quintic``, Keller Jordan's :data:`NS_COEFFICIENTS` every time; ``polar_express``,
    :data:`POLAR_EXPRESS`'s per-iteration ones (the first ``steps``, the last repeated beyond five)."""
    if schedule == "quintic":
        return [NS_COEFFICIENTS] * steps
    if schedule == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]
    raise ValueError(f"Muon's Newton-Schulz coefficients {str(schedule)[:40]!r} are not one of: {', '.join(NS_SCHEDULES)}")


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32, schedule: str = NS_SCHEDULE) -> torch.Tensor:
    """Newton-Schulz in ``dtype`` on ``update`` (a matrix, or a batch of matrices along the first
    dimension), returned in ``update``'s dtype: the same singular vectors, the singular values
    pushed towards 1. ``schedule``: the coefficients (:func:`ns_coefficients`).

    ``quintic``, 5 steps: every singular value at least about 1/600 of the matrix's Frobenius norm
    ends in roughly [0.68, 1.2]. The iteration multiplies a small singular value by at most 3.4445
    per step (the quintic's slope at zero), so smaller ones stay small: 1e-4 of the norm ends near
    0.05, 1e-3 near 0.47. ``polar_express``, 5 steps: every singular value at least 1/1000 of the
    norm ends in roughly [0.85, 1.15] (its first step's slope at zero is 8.16: the small ones grow
    faster). Fewer steps of either leave a wider band (polar_express's first four were fitted for a
    fifth to follow: after four the largest reach about 1.6)."""
    coefficients = ns_coefficients(schedule, steps)
    tall = update.size(-2) > update.size(-1)
    # iterate on the smaller Gram matrix, in a contiguous copy (bmm would copy a transposed view each time)
    x = (update.mT if tall else update).to(dtype, memory_format=torch.contiguous_format)
    if schedule == "polar_express":  # its safety factor (see POLAR_EXPRESS), as modded-nanogpt normalises
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * (1 + POLAR_EXPRESS_SAFETY) + 1e-6)
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    batch = x.view(-1, *x.shape[-2:])
    for a, b, c in coefficients:  # x <- a x + (b G + c G^2) x, G = x x^T, with the sums inside the matmuls
        gram = torch.bmm(batch, batch.mT)
        batch = torch.baddbmm(batch, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), batch, beta=a)
    x = batch.view(x.shape)
    return (x.mT if tall else x).to(update.dtype)


def newton_schulz_flops(k: int, rows: int, cols: int, steps: int = NS_STEPS) -> int:
    """FLOPs of :func:`orthogonalize` on ``k`` matrices of ``rows x cols`` (a multiply-add is 2):
    per iteration on the ``m x n`` wide form (``m = min(rows, cols)``), ``G = x x^T`` (2 m^2 n),
    ``G G`` (2 m^3) and the product with ``x`` (2 m^2 n)."""
    m, n = min(rows, cols), max(rows, cols)
    return k * steps * (4 * m * m * n + 2 * m ** 3)


def shape_batches(shapes: list[tuple[Any, ...]], max_elements: int | None = None) -> list[list[int]]:
    """Which matrices to orthogonalise in one call (modded-nanogpt's batching): indices into
    ``shapes``, each ``(device, dtype, k, rows, cols)`` for ``k`` matrices of ``rows x cols`` (and
    optionally a sixth item, the Newton-Schulz schedule: only equal ones share a call), in
    batches of one device, dtype and shape (a tall matrix counts transposed, so ``rows x cols`` and
    ``cols x rows`` share one) of at most ``max_elements`` weights (default: the device's
    :data:`BATCH_ELEMENTS`; one matrix alone, if larger)."""
    by_shape: dict[tuple[Any, ...], list[list[int]]] = {}
    size: dict[tuple[Any, ...], int] = {}
    for i, (device, dtype, k, rows, cols, *schedule) in enumerate(shapes):
        key, n = (device, dtype, min(rows, cols), max(rows, cols), *schedule), k * rows * cols
        limit = max_elements or BATCH_ELEMENTS.get(device.type, BATCH_ELEMENTS["cuda"])
        batches = by_shape.setdefault(key, [[]])
        if batches[-1] and size[key] + n > limit:
            batches.append([])
            size[key] = 0
        batches[-1].append(i)
        size[key] = size.get(key, 0) + n
    return [b for batches in by_shape.values() for b in batches]


def orthogonalize_stacked(updates: list[torch.Tensor], dtype: torch.dtype, steps: int = NS_STEPS,
                          schedule: str = NS_SCHEDULE) -> list[torch.Tensor]:
    """:func:`orthogonalize` of each of ``updates`` (``(k, rows, cols)`` batches of matrices of one
    shape, up to transposition) in one call: the tall ones go in transposed."""
    tall = [u.size(-2) > u.size(-1) for u in updates]
    together = orthogonalize(torch.cat([u.mT if t else u for u, t in zip(updates, tall)]), steps=steps, dtype=dtype,
                             schedule=schedule)
    return [x.mT if t else x for x, t in zip(together.split([u.size(0) for u in updates]), tall)]


def orthogonalize_all(updates: list[torch.Tensor], dtype: torch.dtype | None = None, steps: int = NS_STEPS,
                      schedule: str = NS_SCHEDULE) -> list[torch.Tensor]:
    """:func:`orthogonalize` of each of ``updates`` (``(k, rows, cols)`` batches of matrices), one
    call per batch of :func:`shape_batches`. ``dtype``: that of the iteration (default:
    :func:`newton_schulz_dtype` of the matrices' device)."""
    out = list(updates)
    for members in shape_batches([(u.device, u.dtype, *u.shape) for u in updates]):
        batch = [updates[i] for i in members]
        for i, x in zip(members, orthogonalize_stacked(batch, dtype or newton_schulz_dtype(batch[0].device), steps,
                                                       schedule)):
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


def check_schedule(group: dict[str, Any]) -> None:
    """A ValueError unless ``group``'s Newton-Schulz schedule (absent: the defaults) is one Muon runs."""
    steps, schedule = group.get("ns_steps", NS_STEPS), group.get("ns_coefficients", NS_SCHEDULE)
    if not isinstance(steps, int) or isinstance(steps, bool) or not NS_STEPS_RANGE[0] <= steps <= NS_STEPS_RANGE[1]:
        raise ValueError(f"Muon's ns_steps must be an integer in [{NS_STEPS_RANGE[0]}, {NS_STEPS_RANGE[1]}], "
                         f"got {str(steps)[:20]}")
    if schedule not in NS_SCHEDULES:
        raise ValueError(f"Muon's ns_coefficients {str(schedule)[:40]!r} are not one of: {', '.join(NS_SCHEDULES)}")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: Nesterov momentum (``momentum``), orthogonalised by
    :func:`orthogonalize`, applied at ``lr * sqrt(max(1, rows / cols))`` after the decoupled weight
    decay ``p -= lr * weight_decay * p``.

    A group's ``split`` (default 1) says its matrices' rows are that many equal blocks, each
    orthogonalised on its own (3 for a fused qkv), or lists the blocks' row counts when they differ
    (``[q, kv, kv]`` with grouped key/value heads). Other keys of a group are kept as they are (the
    ``muon`` mark of :class:`~sab_byon_omni.training.optim.MuonWithAdamW`'s groups). ``ns_dtype``:
    the dtype of the Newton-Schulz iteration (default: :func:`newton_schulz_dtype` of the
    parameters' device, asked at the first step there). A group's ``ns_steps`` (default 5) and
    ``ns_coefficients`` (``quintic``, the default, or ``polar_express``: :func:`ns_coefficients`)
    are its Newton-Schulz schedule; they are saved in the state dict's groups, and a state dict
    saved before they existed loads with the defaults. The state of a parameter is its
    ``momentum_buffer``.

    ``process_group`` (DDP, where every rank holds the same gradients after the all-reduce): the
    ranks split the work as modded-nanogpt does. The shape batches go to the ranks by their cost
    (:func:`assign_owners`), each rank orthogonalises its share, and one all-gather hands every rank
    all the directions. Every rank still keeps every momentum buffer and applies every update, so
    its state is that of one rank alone, and a checkpoint of rank 0 holds all of it."""

    def __init__(self, params: Iterable[Any], lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = MOMENTUM, split: int | list[int] = 1, ns_dtype: torch.dtype | None = None,
                 process_group: Any = None, ns_steps: int = NS_STEPS, ns_coefficients: str = NS_SCHEDULE) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, split=split,
                                      ns_steps=ns_steps, ns_coefficients=ns_coefficients))
        self.ns_dtype = ns_dtype
        self.process_group = process_group  # ranks that share the Newton-Schulz work (identical gradients: DDP)
        self.ns_dtypes: dict[torch.device, torch.dtype] = {}  # the default's choice per device, made once

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_split(self.param_groups[-1])
            check_schedule(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``load_state_dict`` ends here: a group saved before the schedule was a setting takes the
        defaults (what that version ran), and a loaded schedule is checked."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("ns_steps", NS_STEPS)
            group.setdefault("ns_coefficients", NS_SCHEDULE)
            check_schedule(group)

    def flops_per_step(self) -> int:
        """Newton-Schulz FLOPs of one step over every trainable matrix (all ranks together: under a
        process group each rank does about its share, :func:`assign_owners`)."""
        return sum(newton_schulz_flops(k, rows, p.shape[1], g["ns_steps"]) for g in self.param_groups for p in g["params"]
                   if p.requires_grad for _, k, rows in row_runs(g["split"], p.shape[0]))

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
        batches = shape_batches([(p.device, p.dtype, k, rows, p.shape[1], g["ns_steps"], g["ns_coefficients"])
                                 for p, g, _, k, rows in todo])
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
                group = todo[members[0]][1]  # one schedule per batch (shape_batches)
                directions[b] = orthogonalize_stacked(blocks, dtype, group["ns_steps"], group["ns_coefficients"])
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
