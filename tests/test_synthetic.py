import itertools
import math

import numpy as np
import pytest

from sab_byon_omni.data.synthetic import MODES, TEMPLATES, MultimodalConsciousnessDataset, sample_entropy
from sab_byon_omni.data.tokenizers import Char96Tokenizer


def make(seed=1, n=400):
    return MultimodalConsciousnessDataset(Char96Tokenizer(), num_samples=n, seq_len=1024, seed=seed)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = make(1), make(1), make(2)
    assert a.texts == b.texts and np.array_equal(a.tokens, b.tokens)
    assert a.texts != c.texts


def test_four_modes_after_the_guide_templates():
    ds = make(n=1000)
    assert set(ds.modes) == set(MODES) == {"text", "image", "doc", "code"}
    starts = {"text": "Consciousness is awareness", "image": "[IMAGE] Neural activation map",
              "doc": "[DOC] Research paper: 'Emergent Cognition'", "code": "[CODE] def fragmergent(t): return "}
    for mode, text in zip(ds.modes, ds.texts):
        assert text.startswith(starts[mode])
    counts = np.array([ds.modes.count(m) for m in MODES])
    assert counts.min() > 180  # roughly uniform


def test_samples_are_short_and_unpadded():
    ds = make()
    assert 40 < ds.lengths.mean() < 90
    assert all(len(ds[i]) == len(ds.texts[i]) for i in range(len(ds)))
    assert (ds.tokens > 0).all()  # no padding stored


def test_split_is_disjoint_and_complete():
    ds = make(n=100)
    train, val = ds.split(0.1)
    assert len(train) == 90 and len(val) == 10
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(100))


def test_entropy_floor_matches_the_template_information():
    ds = make(n=2000)
    n_targets = sum(int(n) - 1 for n in ds.lengths)
    first = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    info = sum(math.log(4) + sample_entropy(m) - first for m in ds.modes)
    assert ds.entropy_floor() == info / n_targets
    assert 0.05 < ds.entropy_floor() < 0.3


def test_every_filling_of_a_template_is_a_distinct_string():
    # injectivity makes the information count exact: log(#fillings) nats per sample of a mode
    for mode, (template, slots) in TEMPLATES.items():
        strings = {template.format(*choice) for choice in itertools.product(*slots)}
        assert len(strings) == math.prod(len(s) for s in slots)
        assert math.log(len(strings)) == pytest.approx(sample_entropy(mode), rel=1e-12)
