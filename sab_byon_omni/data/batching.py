"""Batches from any indexable dataset of 1-D token arrays: dynamic padding, a loss mask, a
seeded per-epoch order, a global data cursor, and disjoint shards across processes.

The cursor counts samples of the epoch's order consumed by *all* processes together, so a run
saved with N processes can resume with M and continue over exactly the remaining samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenDataset(Protocol):
    """A sample is a 1-D array of ids (every token after the first is a target), or a (2, L) array
    of ids and labels (``IGNORE_INDEX`` where a token is no target: chat data's prompts)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...


def row_targets(row: np.ndarray) -> int:
    """The targets of one sample (see :class:`TokenDataset`)."""
    if row.ndim == 2:
        return int((row[1, 1:] != IGNORE_INDEX).sum())
    return max(len(row) - 1, 0)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, padded with pad_id
    labels: torch.Tensor  # (B, T) int64, = input_ids with padding set to IGNORE_INDEX
    n_targets: int  # tokens that contribute to the loss (labels[:, 1:] != IGNORE_INDEX)
    cursor: int  # the global cursor after this micro-step (all ranks together)
    global_targets: int = -1  # n_targets summed over every process's part of this micro-step
    lengths: tuple[int, ...] = ()  # each row's length before padding (known to collate: no device read)

    def __post_init__(self) -> None:
        if self.global_targets < 0:
            self.global_targets = self.n_targets
        if not self.lengths:
            self.lengths = tuple((self.labels != IGNORE_INDEX).sum(1).tolist())

    def to(self, device: torch.device) -> "Batch":
        """On CUDA, copied from pinned memory without blocking the host."""
        if device.type != "cuda":
            return Batch(self.input_ids.to(device), self.labels.to(device), self.n_targets, self.cursor,
                         self.global_targets, self.lengths)
        return Batch(self.input_ids.pin_memory().to(device, non_blocking=True),
                     self.labels.pin_memory().to(device, non_blocking=True), self.n_targets, self.cursor,
                     self.global_targets, self.lengths)


def collate(rows: Sequence[np.ndarray], pad_id: int, cursor: int = 0, global_targets: int = -1) -> Batch:
    """Pad to the longest row of this batch (never to seq_len) and mask the padding (and, for rows
    of ids and labels, the tokens their labels ignore)."""
    lengths = [r.shape[-1] for r in rows]
    width = max(lengths)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :lengths[i]] = r[0] if r.ndim == 2 else r
        labels[i, :lengths[i]] = r[1] if r.ndim == 2 else r
    n_targets = sum(row_targets(r) for r in rows)
    return Batch(torch.from_numpy(ids), torch.from_numpy(labels), n_targets, cursor, global_targets, tuple(lengths))


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool, lengths: np.ndarray | None = None,
                bucket: int = 0) -> np.ndarray:
    """The visiting order of an epoch: a pure function of its arguments (not of the batch size or
    the number of processes, so a resumed run continues exactly, whatever its geometry).

    With ``bucket`` > 1 (and ``lengths``), each run of ``bucket`` consecutive samples of the shuffled
    order is sorted by length, so consecutive micro-batches hold samples of similar length and pad
    little. A run is visited short to long: with ``bucket`` equal to the samples of one optimizer
    step (the default job: 4 x 16 = 64) that order is invisible, since the step sums the window.
    """
    if not shuffle:
        return np.arange(n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None or bucket <= 1:
        return order
    runs = [order[i:i + bucket] for i in range(0, n, bucket)]
    return np.concatenate([r[np.argsort(lengths[r], kind="stable")] for r in runs])


def micro_steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Micro-steps in an epoch: chunks of world*batch_size; a last chunk is dropped only if some
    process would get no sample from it."""
    per_step = batch_size * world
    full, rest = divmod(n, per_step)
    return full + (1 if rest >= world else 0)


def iterate_batches(dataset: TokenDataset, batch_size: int, *, pad_id: int, epoch: int = 0, seed: int = 0,
                    shuffle: bool = True, start: int = 0, world: int = 1, rank: int = 0,
                    bucket: int = 0) -> Iterator[Batch]:
    """This rank's micro-batches of one epoch, beginning at global cursor ``start``.

    Every micro-step takes the next ``world * batch_size`` samples of the epoch order and splits
    them into ``world`` near-equal disjoint parts; rank r gets part r. ``bucket``: see
    :func:`epoch_order` (for datasets with a ``lengths`` array, such as the synthetic one).
    """
    per_step = batch_size * world
    lengths = getattr(dataset, "lengths", None)  # variable-length datasets (synthetic) say it cheaply
    order = epoch_order(len(dataset), epoch, seed, shuffle, lengths if bucket > 1 else None, bucket)
    cursor = start
    while len(order) - cursor >= world and cursor < len(order):
        chunk = order[cursor:cursor + per_step]
        parts = np.array_split(chunk, world)
        cursor += len(chunk)
        rows = [dataset[int(i)] for i in parts[rank]]
        total = -1
        if world > 1:  # every process knows the whole step's token count: no collective needed
            targets = getattr(dataset, "targets", None)  # per sample, where labels ignore some tokens
            size = ((lambda i: int(targets[i])) if targets is not None else
                    (lambda i: max(int(lengths[i]) - 1, 0)) if lengths is not None else
                    (lambda i: row_targets(dataset[int(i)])))
            total = sum(size(i) for r, part in enumerate(parts) if r != rank for i in part)
            total += sum(row_targets(row) for row in rows)
        yield collate(rows, pad_id, cursor, total)


def regroup(window: Sequence[Batch], max_rows: int, pass_positions: int, pad_id: int, world: int = 1,
            batch_size: int = 0) -> list[Batch]:
    """The samples of an accumulation window as fewer, larger micro-batches: an execution detail
    of one optimizer step, whose gradient is the sum over the whole window (the same up to float
    rounding, in any grouping). Enough passes for about ``pass_positions`` real tokens each (never
    more passes than the window has micro-batches), of at most ``max_rows`` rows; the rows are
    sorted by length and cut where the padding is least (:func:`least_padding_cuts`). A window
    that would not shrink, or ``max_rows`` < 2, stays as it is.

    With ``world`` > 1 processes the number of passes comes from facts every process shares (the
    window's tokens over all processes, per process, and ``batch_size``, the configured rows per
    micro-batch of one process), never from this process's own samples: every pass communicates
    under FSDP (and DDP's last one), so processes that ran different numbers of passes would wait
    for each other forever."""
    lengths = np.array([n for b in window for n in b.lengths], dtype=np.int64)
    if world > 1:
        if batch_size < 1:
            raise ValueError("regroup over several processes needs the configured batch_size")
        tokens, rows_bound = -(-sum(b.global_targets for b in window) // world), batch_size * len(window)
    else:
        tokens, rows_bound = int(lengths.sum()), len(lengths)
    passes = max(-(-tokens // max(pass_positions, 1)), -(-rows_bound // max(max_rows, 1)))
    if max_rows < 2 or passes >= len(window):
        return list(window)
    rows = [torch.stack((b.input_ids[i, :n], b.labels[i, :n])) for b in window for i, n in enumerate(b.lengths)]
    order = np.argsort(lengths, kind="stable")
    cuts = least_padding_cuts(lengths[order], passes, max_rows)
    cursor = window[-1].cursor
    return [collate([rows[i].numpy() for i in order[a:b]], pad_id, cursor) for a, b in zip(cuts, cuts[1:])]


def least_padding_cuts(sorted_lengths: np.ndarray, groups: int, max_rows: int) -> list[int]:
    """Cut points ``[0, ..., n]`` that split ascending lengths into ``groups`` runs of at most
    ``max_rows`` with the fewest padded positions (each run pads to its last, longest row): a
    dynamic program over (runs, rows), O(groups x n x max_rows)."""
    n = len(sorted_lengths)
    cost = np.full((groups + 1, n + 1), np.inf)
    cost[0, 0] = 0.0
    back = np.zeros((groups + 1, n + 1), dtype=np.int64)
    for g in range(1, groups + 1):
        for j in range(g, n + 1):
            i = np.arange(max(g - 1, j - max_rows), j)  # the previous cut; the run is rows i .. j-1
            total = cost[g - 1, i] + (j - i) * sorted_lengths[j - 1]
            k = int(np.argmin(total))
            cost[g, j], back[g, j] = total[k], i[k]
    cuts = [n]
    for g in range(groups, 0, -1):
        cuts.append(int(back[g, cuts[-1]]))
    return cuts[::-1]
