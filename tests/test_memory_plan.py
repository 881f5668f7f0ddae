"""The memory plan's speed-for-memory choices: memory saving (GELU recompute, v copy) only when the
run would not fit without it, and the regrouping of an accumulation window into fewer, larger
passes, which must train the same model up to float rounding."""

import dataclasses

import numpy as np
import pytest
import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.batching import IGNORE_INDEX, collate, regroup
from sab_byon_omni.data.factory import load_datasets
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import estimate
from sab_byon_omni.training import console
from sab_byon_omni.training import memory as memory_mod
from sab_byon_omni.training.trainer import Trainer
from tests.helpers import tiny_config, trainer_for


def run_config(tmp_path, **train):
    """The plan's tests' tiny run: micro-batches of 2, 4 accumulated, fp32 on the CPU."""
    return tiny_config(tmp_path, **{"batch_size": 2, "gradient_accumulation_steps": 4, "precision": "fp32",
                                    "device": "cpu", **train})


def budget_between(monkeypatch, cfg, saving_fits: bool):
    """Make the device's memory fit the run with memory saving (and, unless ``saving_fits``, not at all)."""
    tok, train, _ = load_datasets(cfg.data)
    model = SABTranscendentV2(config=cfg, tokenizer=tok).model
    seq, kw = memory_mod.longest_sample(train, cfg.data.seq_len), dict(precision="fp32", device="cpu",
                                                                        fused_optimizer=True)
    on, off = (estimate(model.cfg, seq, cfg.train.batch_size, memory_saving=s, **kw).peak for s in (True, False))
    usable = (on + off) / 2 if saving_fits else on * 0.99
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(memory_mod, "memory_budget", lambda device: (usable / 0.9 - model_bytes, "a test device"))


def saving_on(trainer) -> bool:
    blocks = trainer.raw.blocks
    assert len({(b.attn.copy_v, b.mlp.recompute_gelu) for b in blocks}) == 1
    return blocks[0].mlp.recompute_gelu


def test_memory_saving_stays_off_when_the_run_fits(tmp_path):
    trainer = trainer_for(run_config(tmp_path))
    assert trainer.run.memory.memory_saving is False and not saving_on(trainer)
    banner = dict(console.banner_lines(trainer.run, []))
    assert "memory saving off (the run fits without it)" in banner["memory"]


def test_memory_saving_goes_on_when_the_run_would_not_fit_without_it(tmp_path, monkeypatch):
    cfg = run_config(tmp_path)
    budget_between(monkeypatch, cfg, saving_fits=True)
    trainer = trainer_for(cfg)
    assert trainer.run.memory.memory_saving is True and saving_on(trainer)
    assert "memory saving on (the run would not fit without it)" in dict(console.banner_lines(trainer.run, []))["memory"]


def test_memory_saving_off_that_cannot_fit_says_auto_would(tmp_path, monkeypatch):
    cfg = run_config(tmp_path, memory_saving="off")
    budget_between(monkeypatch, cfg, saving_fits=True)
    with pytest.raises(SabError, match="--memory_saving auto"):
        trainer_for(cfg)


def test_memory_saving_on_is_obeyed(tmp_path):
    trainer = trainer_for(run_config(tmp_path, memory_saving=True))  # YAML's `on` is the boolean true
    assert trainer.run.cfg.train.memory_saving == "on" and saving_on(trainer)
    assert "train.memory_saving=on" in trainer.run.memory.describe()


# ------------------------------------------------------------------------------- regrouping
def rows_of(batches):
    return sorted(tuple(b.input_ids[i][b.labels[i] != IGNORE_INDEX].tolist()) for b in batches
                  for i in range(b.input_ids.shape[0]))


def test_regroup_keeps_every_sample_in_fewer_passes_with_little_padding():
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 96, size=int(rng.integers(5, 60))) for _ in range(64)]
    window = [collate(rows[i:i + 4], pad_id=0, cursor=i + 4) for i in range(0, 64, 4)]
    passes = regroup(window, max_rows=64, pass_positions=256, pad_id=0)
    assert rows_of(passes) == rows_of(window)
    assert 1 < len(passes) < len(window) and all(p.cursor == 64 for p in passes)
    assert sum(p.n_targets for p in passes) == sum(b.n_targets for b in window)
    assert sum(p.input_ids.numel() for p in passes) < sum(b.input_ids.numel() for b in window)  # sorted: less padding
    assert all(p.input_ids.shape[0] <= 10 for p in regroup(window, 10, 10**6, 0))  # the memory cap
    assert regroup(window, 0, 256, 0) == window


def test_regroup_over_processes_runs_as_many_passes_on_every_rank_whatever_its_own_tokens():
    """Two ranks' parts of the same windows (one short-rowed, one long-rowed): each rank's own count
    would give them 1 and 2 passes (a deadlock under FSDP); the shared facts give both the same."""
    from sab_byon_omni.data.batching import iterate_batches

    class Data:
        lengths = np.array([20, 100] * 24)  # rank 0 gets the 20s, rank 1 the 100s (no shuffle)

        def __len__(self):
            return len(self.lengths)

        def __getitem__(self, i):
            return np.ones(int(self.lengths[i]), dtype=np.int64)

    windows = [list(iterate_batches(Data(), 1, pad_id=0, shuffle=False, world=2, rank=r))[:8] for r in (0, 1)]
    mine = [len(regroup(w, 8, 512, 0)) for w in windows]
    assert mine[0] != mine[1]  # the case that deadlocked: 1 pass of 160 tokens, 2 of 800
    shared = [len(regroup(w, 8, 512, 0, world=2, batch_size=1)) for w in windows]
    assert shared[0] == shared[1] == 1  # (19 + 99) x 8 targets over 2 ranks: 472, one pass of 512
    for w, passes in zip(windows, (regroup(w, 8, 512, 0, world=2, batch_size=1) for w in windows)):
        assert rows_of(passes) == rows_of(w)
    with pytest.raises(ValueError, match="batch_size"):
        regroup(windows[0], 8, 512, 0, world=2)


def test_the_cuts_pad_least_among_all_groupings():
    import itertools

    from sab_byon_omni.data.batching import least_padding_cuts

    rng = np.random.default_rng(1)
    for _ in range(20):
        lengths = np.sort(rng.integers(1, 50, size=int(rng.integers(3, 10))))
        n, groups = len(lengths), int(rng.integers(1, 4))
        max_rows = int(rng.integers(-(-n // groups), n + 1))

        def padded(cuts):
            return sum((b - a) * lengths[b - 1] for a, b in zip(cuts, cuts[1:]))

        options = [[0, *inner, n] for inner in itertools.combinations(range(1, n), groups - 1)]
        options = [c for c in options if all(0 < b - a <= max_rows for a, b in zip(c, c[1:]))]
        cuts = least_padding_cuts(lengths, groups, max_rows)
        assert cuts in options and padded(cuts) == min(map(padded, options))


def test_the_plan_regroups_only_without_dropout_and_with_accumulation(tmp_path):
    assert trainer_for(run_config(tmp_path / "a")).run.memory.pass_rows == 8  # the whole 2 x 4 window fits
    assert trainer_for(run_config(tmp_path / "b", gradient_accumulation_steps=1)).run.memory.pass_rows == 0
    cfg = build_config({**run_config(tmp_path / "c").to_dict(), "model": {"preset": "tiny", "dropout": 0.1}})
    assert trainer_for(cfg).run.memory.pass_rows == 0


def test_regrouped_steps_train_the_same_weights_as_the_configured_micro_batches(tmp_path):
    """The guide's geometry (micro-batches of 2, 8 accumulated) against the plan's regrouping,
    three optimizer steps: the same weights to float rounding."""
    weights = []
    for regrouped in (False, True):
        trainer = trainer_for(run_config(tmp_path / str(regrouped), gradient_accumulation_steps=8, max_steps=3))
        if not regrouped:  # the same run with the plan's regrouping off
            run = trainer.run
            trainer = Trainer(dataclasses.replace(run, memory=dataclasses.replace(run.memory, pass_rows=0)))
        assert trainer.run.memory.pass_rows == (16 if regrouped else 0)
        trainer.fit()
        weights.append([p.detach().clone() for p in trainer.raw.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)  # as the bucketing test in test_trainer.py
    assert any(not torch.equal(a, b) for a, b in zip(*weights))  # really another geometry (rounding differs)
