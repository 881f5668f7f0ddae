"""The memory plan's speed-for-memory choices: memory saving (GELU recompute, v copy) only when the
run would not fit without it, and the regrouping of an accumulation window into fewer, larger
passes, which must train the same model up to float rounding."""

import numpy as np
import pytest
import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.batching import IGNORE_INDEX, collate, regroup
from sab_byon_omni.data.factory import load_datasets
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import estimate
from sab_byon_omni.training import memory as memory_mod
from sab_byon_omni.training.trainer import Trainer


def run_config(tmp_path, **train):
    return build_config({
        "model": {"preset": "tiny"},
        "data": {"num_samples": 200, "seq_len": 128},
        "train": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 4, "learning_rate": 3e-3,
                  "checkpoint_dir": str(tmp_path / "ckpt"), "progress": False, "precision": "fp32", "device": "cpu",
                  **train},
    })


def trainer_for(cfg):
    tok, train, val = load_datasets(cfg.data)
    sab = SABTranscendentV2(config=cfg, tokenizer=tok)
    trainer = Trainer(sab.model, tok, train, val, sab.config)
    trainer.setup()
    return trainer


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
    banner = dict(trainer.run.banner_lines([], None))
    assert "memory saving off (the run fits without it)" in banner["memory"]


def test_memory_saving_goes_on_when_the_run_would_not_fit_without_it(tmp_path, monkeypatch):
    cfg = run_config(tmp_path)
    budget_between(monkeypatch, cfg, saving_fits=True)
    trainer = trainer_for(cfg)
    assert trainer.run.memory.memory_saving is True and saving_on(trainer)
    assert "memory saving on (the run would not fit without it)" in dict(trainer.run.banner_lines([], None))["memory"]


def test_memory_saving_off_that_cannot_fit_says_auto_would(tmp_path, monkeypatch):
    cfg = run_config(tmp_path, memory_saving="off")
    budget_between(monkeypatch, cfg, saving_fits=True)
    with pytest.raises(SabError, match="--memory_saving auto"):
        trainer_for(cfg)


def test_memory_saving_on_is_obeyed(tmp_path):
    trainer = trainer_for(run_config(tmp_path, memory_saving=True))  # YAML's `on` is the boolean true
    assert trainer.cfg.train.memory_saving == "on" and saving_on(trainer)
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
        trainer = trainer_for(run_config(tmp_path / str(regrouped), batch_size=2, gradient_accumulation_steps=8,
                                         max_steps=3))
        if not regrouped:
            trainer.run.memory.pass_rows = 0
        assert trainer.run.memory.pass_rows == (16 if regrouped else 0)
        trainer.fit()
        weights.append([p.detach().clone() for p in trainer.raw.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)  # as the bucketing test in test_trainer.py
    assert any(not torch.equal(a, b) for a, b in zip(*weights))  # really another geometry (rounding differs)


# ---- freed memory kept for the next step (glibc's heap) only with room to spare -----------------
_FAULTS = """
import resource, sys, torch
from sab_byon_omni import machine
import os
for keep in sys.argv[1:]:
    if keep == "optout":
        os.environ["SAB_KEEP_FREED_MEMORY"] = "0"
        continue
    print(machine.set_freed_memory(keep == "keep"))
per = []
for _ in range(24):  # kept: the heap settles after ~10 (posix_memalign's trailing remainders split early holes)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(12 << 20)  # 48 MiB: above glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    per.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(max(per[-4:]))
"""


def _faults(*keeps, **env):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SAB_KEEP_FREED_MEMORY")
            and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, *keeps], env={**base, **env},
                         capture_output=True, text=True, check=True, timeout=120)
    *said, faults = out.stdout.strip().splitlines()
    return said, int(faults)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_freed_memory_ends_the_page_faults_of_large_tensors():
    said, faults = _faults("keep")
    assert said == ["freed memory kept for reuse (glibc; SAB_KEEP_FREED_MEMORY=0 gives it back)"] and faults < 1000  # 12,288 pages if mapped afresh
    said, faults = _faults()
    assert faults > 10_000  # glibc's default: mapped and faulted in every time
    said, faults = _faults("give", "keep", "give")  # a tight run after a roomy one in the same process
    assert [x.split(" (")[0].split(",")[0] for x in said] == ["glibc's default", "freed memory kept for reuse",
                                                               "glibc's default"]
    assert said[2].endswith("restored after an earlier run kept freed memory (mmap above 32 MiB)") and faults > 10_000
    said, faults = _faults("keep", "optout", "give")  # the opt-out set in the middle of the process
    assert said[1].startswith("glibc's default (SAB_KEEP_FREED_MEMORY=0), restored") and faults > 10_000
    for env in ({"SAB_KEEP_FREED_MEMORY": "0"}, {"MALLOC_ARENA_MAX": "2"}):  # the user's choice wins
        said, faults = _faults("keep", **env)
        assert said[0].startswith(("glibc's default (SAB_KEEP", "glibc malloc settings from MALLOC_ARENA_MAX"))
        assert faults > 10_000
    said, faults = _faults("keep", GLIBC_TUNABLES=" ")  # blank: nothing chosen
    assert said[0].startswith("freed memory kept for reuse")


def test_freed_memory_is_kept_only_with_room_for_the_heaps_fragmentation():
    plan = memory_mod.MemoryPlan(cfg=None, peak=100.0, usable=100.0 * memory_mod.HEAP_REUSE_ROOM, what="test")
    assert memory_mod.keeps_freed_memory(plan)
    plan.usable -= 1
    assert not memory_mod.keeps_freed_memory(plan)
    plan.peak = float("nan")  # no estimate for this device: nothing to trade against
    assert not memory_mod.keeps_freed_memory(plan)


def test_the_banner_says_what_the_cpu_run_does_with_freed_memory(tmp_path, monkeypatch):
    from sab_byon_omni.training import run_setup

    asked = []
    monkeypatch.setattr(run_setup, "set_freed_memory", lambda keep: asked.append(keep) or f"stub: keep={keep}")
    trainer = trainer_for(run_config(tmp_path))
    assert dict(trainer.run.banner_lines([], None))["memory"].endswith("; allocator: stub: keep=True")
    cfg = run_config(tmp_path / "tight")
    budget_between(monkeypatch, cfg, saving_fits=True)  # fits, but without 1.5x room
    tight = trainer_for(cfg)
    assert dict(tight.run.banner_lines([], None))["memory"].endswith(
        "; allocator: stub: keep=False: keeping freed memory needs room for 1.5x the estimated peak")
    assert asked == [True, False]
