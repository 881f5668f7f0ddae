"""Validation loss, perplexity and bits per byte over a whole token stream, with a sliding window.

A stream of ``N`` tokens is scored as ``N - 1`` next-token predictions (token 0 has no context).
Windows of ``seq_len`` tokens start at ``0, stride, 2*stride, ...``; each window scores only the
targets that no earlier window scored, so every prediction is counted exactly once and each one
after the first window sees at least ``seq_len - stride`` tokens of context. ``stride = seq_len - 1``
gives non-overlapping windows, the same numbers as the training loop's validation; a smaller
stride gives each prediction more context (a better estimate, ``seq_len / stride`` times the work).

Bits per byte = ``loss_nats * n_predicted_tokens / (ln 2 * n_utf8_bytes)``, where the bytes are
those of the evaluated text: unlike perplexity, it does not depend on the tokenizer, so a char96,
byte and BPE model can be compared on the same text.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sab_byon_omni.data.batching import IGNORE_INDEX, iterate_batches
from sab_byon_omni.estimate import perplexity
from sab_byon_omni.loss import model_loss


@dataclass
class EvalResult:
    loss_sum: float  # nats, summed over predictions
    n_tokens: int  # predictions scored
    n_bytes: int  # UTF-8 bytes of the evaluated text
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)  # inf past e^709 (it used to print e^700 for any loss above 700)

    @property
    def bits_per_byte(self) -> float:
        return self.loss_sum / (math.log(2) * self.n_bytes) if self.n_bytes else math.nan

    def __add__(self, other: "EvalResult") -> "EvalResult":
        return EvalResult(self.loss_sum + other.loss_sum, self.n_tokens + other.n_tokens,
                          self.n_bytes + other.n_bytes, self.seconds + other.seconds)

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.n_tokens, "bytes": self.n_bytes, "seconds": round(self.seconds, 3)}


def window_spans(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, first)``: feed tokens ``[begin, end)``, score targets ``first .. end-1``."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    if not 1 <= stride <= seq_len - 1:
        raise ValueError(f"stride={stride} must be in [1, seq_len - 1 = {seq_len - 1}]")
    scored, begin = 1, 0
    while scored < n_tokens:
        end = min(begin + seq_len, n_tokens)
        yield begin, end, scored
        scored = end
        begin += stride


@torch.no_grad()
def stream_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, stride: int, batch_size: int = 8,
                device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None
                ) -> tuple[float, int]:
    """(sum of next-token losses in nats, number of predictions) over the 1-D ``tokens``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    spans = list(window_spans(len(tokens), seq_len, stride)) if len(tokens) < 1 << 22 else None
    it = iter(spans) if spans is not None else window_spans(len(tokens), seq_len, stride)
    try:
        while True:
            chunk = [s for _, s in zip(range(batch_size), it)]
            if not chunk:
                break
            width = max(end - begin for begin, end, _ in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            labels = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
            for row, (begin, end, first) in enumerate(chunk):
                ids[row, :end - begin] = tokens[begin:end]
                labels[row, first - begin:end - begin] = ids[row, first - begin:end - begin]
                count += end - first
            ids_t, labels_t = torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device)
            with autocast if autocast is not None else contextlib.nullcontext():
                total += model_loss(model, ids_t, labels_t).double()
    finally:
        model.train(was_training)
    return float(total), count


def evaluate_stream(model: nn.Module, tokens: np.ndarray, n_bytes: int, seq_len: int, stride: int | None = None,
                    batch_size: int = 8, device: torch.device | str = "cpu",
                    autocast: contextlib.AbstractContextManager | None = None) -> EvalResult:
    """Loss, perplexity and bits per byte of ``model`` on a token stream of ``n_bytes`` bytes of text."""
    t0 = time.perf_counter()
    loss_sum, n = stream_loss(model, tokens, seq_len, stride or seq_len - 1, batch_size, device, autocast)
    return EvalResult(loss_sum, n, n_bytes, time.perf_counter() - t0)


@torch.no_grad()
def sample_loss(model: nn.Module, data: object, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                autocast: contextlib.AbstractContextManager | None = None, max_batches: int = 0, world: int = 1,
                rank: int = 0) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses as a float64 tensor on ``device``, predictions) over a dataset of
    samples (this process's share of it under torchrun; all of it unless ``max_batches``)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = iterate_batches(data, batch_size, pad_id=pad_id, shuffle=False, world=world, rank=rank)
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = batch.to(torch.device(device))
            with autocast if autocast is not None else contextlib.nullcontext():
                total += model_loss(model, batch.input_ids, batch.labels).double()
            count += batch.n_targets
    finally:
        model.train(was_training)
    return total, count


def evaluate_samples(model: nn.Module, data: object, n_bytes: int, batch_size: int = 8, pad_id: int = 0,
                     device: torch.device | str = "cpu",
                     autocast: contextlib.AbstractContextManager | None = None) -> EvalResult:
    """Loss, perplexity and bits per byte of ``model`` over a dataset of samples (e.g. the
    synthetic validation split) whose texts hold ``n_bytes`` UTF-8 bytes."""
    t0 = time.perf_counter()
    total, n = sample_loss(model, data, batch_size, pad_id, device, autocast)
    return EvalResult(float(total), n, n_bytes, time.perf_counter() - t0)
