"""Training samples from a token stream: windows of ``seq_len`` tokens with stride ``seq_len - 1``.

Consecutive windows share one token, so every token after the first is a target exactly once per
epoch and no window is padded. This is nanoGPT's ``x = ids[i:i+T], y = ids[i+1:i+T+1]`` with
``T = seq_len - 1``, because the loss shifts the labels inside the model's window.
"""

from __future__ import annotations

import math

import numpy as np


class TokenWindows:
    """Windows of ``seq_len`` tokens with stride ``seq_len - 1`` over a 1-D array of ids.

    ``drop_last=True`` (training) keeps full windows only, so nothing is ever padded; the at most
    ``seq_len - 2`` targets after the last full window are not visited. ``drop_last=False``
    (validation) adds one shorter window so every token after the first is a target.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, drop_last: bool = True) -> None:
        if seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, seq_len - 1
        targets = max(len(tokens) - 1, 0)
        self.n = targets // self.stride if drop_last else math.ceil(targets / self.stride)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.stride
        return np.asarray(self.tokens[start:start + self.seq_len], dtype=np.int64)

    @property
    def num_targets(self) -> int:
        return min(self.n * self.stride, max(len(self.tokens) - 1, 0))
