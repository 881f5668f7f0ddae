"""The guide's synthetic multimodal dataset, seeded and with a known entropy floor.

Each sample is one of four modes (text, image, doc, code) built from a template whose slots are
filled uniformly at random from fixed lists. Because the fillers are drawn independently and every
filled template is a distinct string, the information content of a sample is exactly
``log 4 + sum(log len(slot list))`` nats, which gives the lowest loss any model can reach on it
(see :meth:`MultimodalConsciousnessDataset.entropy_floor`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from sab_byon_omni.data.tokenizers import Tokenizer

SUBJECTS = ("self", "time", "memory", "pattern", "meaning", "space", "emotion", "identity")
PROCESSES = ("recursion", "resonance", "integration", "feedback", "prediction", "attention", "synthesis", "emergence")
SUBSTRATES = ("neural fields", "silicon lattices", "quantum foam", "social networks",
              "cortical columns", "dream states", "living cells", "language")
SIZES = ("32", "64", "128", "256")
COORDS = tuple(str(i) for i in range(16))
LEVELS = tuple(f"0.{i}" for i in range(1, 10))
SECTIONS = tuple(str(i) for i in range(1, 10))
TOPICS = ("self-organisation", "phase transitions", "information flow", "binding problems",
          "criticality", "global workspaces", "predictive coding", "symbol grounding")
FUNCS = ("sin", "cos", "tanh", "exp")
DIGITS = tuple(str(i) for i in range(1, 10))

# mode -> (template, slot lists in order)
TEMPLATES: dict[str, tuple[str, tuple[Sequence[str], ...]]] = {
    "text": ("Consciousness is awareness of {} emerging from {} in {}.", (SUBJECTS, PROCESSES, SUBSTRATES)),
    "image": ("[IMAGE] Neural activation map {}x{}: peak at ({},{}), intensity {}.",
              (SIZES, SIZES, COORDS, COORDS, LEVELS)),
    "doc": ("[DOC] Research paper: 'Emergent Cognition', section {}: {} meets {}.", (SECTIONS, TOPICS, TOPICS)),
    "code": ("[CODE] def fragmergent(t): return {}({}*t) + {}", (FUNCS, DIGITS, DIGITS)),
}
MODES = tuple(TEMPLATES)


def sample_entropy(mode: str) -> float:
    """Nats of information in one sample of ``mode`` (given the mode)."""
    return sum(math.log(len(slot)) for slot in TEMPLATES[mode][1])


class MultimodalConsciousnessDataset:
    """``num_samples`` synthetic samples, token ids stored flat; deterministic for a seed.

    ``ds[i]`` is a 1-D int64 array of token ids (unpadded, at most ``seq_len`` long).
    """

    def __init__(self, tokenizer: Tokenizer, num_samples: int = 5000, seq_len: int = 1024, seed: int = 1234) -> None:
        rng = random.Random(seed)
        self.modes: list[str] = []
        self.texts: list[str] = []
        for _ in range(num_samples):
            mode = rng.choice(MODES)
            template, slots = TEMPLATES[mode]
            self.modes.append(mode)
            self.texts.append(template.format(*(rng.choice(s) for s in slots)))
        ids = [x[:seq_len] for x in tokenizer.encode_batch(self.texts)]
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate([np.zeros(0, dtype=np.int64), *ids])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def split(self, val_fraction: float) -> tuple["Subset", "Subset"]:
        """(train, validation): the last ``val_fraction`` of the (already random) samples is held out."""
        n_val = max(1, int(round(len(self) * val_fraction)))
        if n_val >= len(self):
            raise ValueError("validation split leaves no training samples")
        return Subset(self, np.arange(0, len(self) - n_val)), Subset(self, np.arange(len(self) - n_val, len(self)))

    def entropy_floor(self, indices: Sequence[int] | None = None) -> float:
        """The lowest achievable mean loss (nats per predicted token) on these samples.

        Valid for the char96 and byte tokenizers, where a sample's first character is never
        predicted: its share of the information (which of 'C' or '[' starts it) is subtracted.
        """
        idx = range(len(self)) if indices is None else indices
        first = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)  # H('C' vs '[')
        info = sum(math.log(4) + sample_entropy(self.modes[i]) - first for i in idx)
        targets = sum(int(self.lengths[i]) - 1 for i in idx)
        return info / targets


class Subset:
    """A view of some rows of a dataset."""

    def __init__(self, base: MultimodalConsciousnessDataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.base[int(self.indices[i])]

    @property
    def lengths(self) -> np.ndarray:
        return self.base.lengths[self.indices]

    @property
    def num_tokens(self) -> int:
        return int(self.base.lengths[self.indices].sum())

    def entropy_floor(self) -> float:
        return self.base.entropy_floor(self.indices)
