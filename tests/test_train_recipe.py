"""Which recipe a run trains with: the from-scratch rule on your own data without a config file
(each flag you give wins), the config's settings otherwise; and the start warnings."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sab_byon_omni.cli import main
from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.training import recipe as R
from sab_byon_omni.training.launch import apply_recipe
from sab_byon_omni.training.train_3b import train_3b_rapid

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--preset", "tiny", "--seq_len", "64", "--max_steps", "1", "--progress", "false"]


@pytest.fixture
def notes(in_tmp):
    d = in_tmp / "notes"
    d.mkdir()
    for i in range(6):  # ~24 KB of prose: ~380 windows of 64
        (d / f"n{i}.txt").write_text(f"note {i}: the quick brown fox jumps over the lazy dog. " * 80)
    return d


def run_config(folder: str) -> dict:
    return yaml.safe_load((Path(folder) / "config.yaml").read_text())["train"]


def test_own_data_without_a_config_trains_with_the_rule(notes, capsys):
    assert main(["train", "--data", str(notes), *SHORT, "--checkpoint_dir", "runs/a"]) == 0
    t = run_config("runs/a")
    cfg = build_config({"preset": "tiny", "seq_len": 64})
    want = R.recipe_for_geometry(cfg.model, 64, t["batch_size"], t["gradient_accumulation_steps"], t["epochs"], 1)
    assert t["learning_rate"] == pytest.approx(want.learning_rate)
    assert t["lr_schedule"] == "cosine" and t["weight_decay"] == R.WEIGHT_DECAY and t["beta2"] == R.BETA2
    assert (t["optimizer"], t["muon_learning_rate"]) == ("muon", pytest.approx(R.muon_learning_rate(cfg.model)))
    assert t["muon_warmup_steps"] == min(R.MUON_WARMUP, t["warmup_steps"])
    err = capsys.readouterr().err
    assert "Muon for the blocks' matrices" in err
    model = yaml.safe_load((Path("runs/a") / "config.yaml").read_text())["model"]
    assert all(model[k] == v for k, v in R.ARCHITECTURE.items()) and "model: zero_init_proj on" in err  # the levers
    assert t["batch_size"] * t["gradient_accumulation_steps"] * 64 >= R.MIN_TOKENS_PER_STEP  # not the guide's 4 x 16
    assert (t["batch_size"], t["gradient_accumulation_steps"]) != (4, 16) and t["epochs"] > 1


def test_every_flag_given_wins_over_the_rule(notes):
    assert main(["train", "--data", str(notes), *SHORT, "--learning_rate", "1e-3", "--batch-size", "4",
                 "--checkpoint_dir", "runs/b"]) == 0
    t = run_config("runs/b")
    assert t["learning_rate"] == 1e-3 and t["batch_size"] == 4
    assert t["lr_schedule"] == "cosine"  # what was not given still comes from the rule
    assert t["optimizer"] == "adamw"  # a rate you give means AdamW's rate for every parameter, as it always did


def test_muon_with_your_own_rates(notes, capsys):
    assert main(["train", "--data", str(notes), *SHORT, "--learning_rate", "1e-3", "--optimizer", "muon",
                 "--muon_learning_rate", "0.05", "--muon_ns_coefficients", "polar_express", "--checkpoint_dir",
                 "runs/m"]) == 0
    t = run_config("runs/m")
    assert (t["optimizer"], t["learning_rate"], t["muon_learning_rate"]) == ("muon", 1e-3, 0.05)
    assert (t["muon_ns_steps"], t["muon_ns_coefficients"]) == (5, "polar_express")
    err = capsys.readouterr().err  # the banner says what is in force, and whose choice it is
    assert "Muon for the blocks' matrices: peak 0.05 (yours)" in err and "head and norms: peak 0.001 (yours)" in err
    assert "Newton-Schulz 5 x polar_express (yours)" in err
    assert "Muon peak lr 0.05 for the blocks' matrices" in err and "AdamW peak lr 0.001 for the rest" in err


def test_the_banner_names_adamw_when_you_choose_it(notes, capsys):
    assert main(["train", "--data", str(notes), *SHORT, "--optimizer", "adamw", "--checkpoint_dir", "runs/w"]) == 0
    err = capsys.readouterr().err
    assert "AdamW for every parameter (yours)" in err and "Muon" not in err


def test_a_config_file_is_taken_as_written(notes):
    assert main(["train", "--config", "default", "--data", str(notes), *SHORT, "--checkpoint_dir", "runs/c"]) == 0
    t = run_config("runs/c")
    assert (t["learning_rate"], t["lr_schedule"], t["batch_size"], t["gradient_accumulation_steps"]) == \
        (2e-5, "constant", 4, 16)
    assert t["optimizer"] == "adamw"


def test_the_synthetic_default_job_is_the_guides(in_tmp, capsys):
    assert main(["train", *SHORT, "--num_samples", "80", "--checkpoint_dir", "runs/d"]) == 0
    t = run_config("runs/d")
    assert (t["learning_rate"], t["lr_schedule"], t["batch_size"], t["gradient_accumulation_steps"], t["epochs"]) \
        == (2e-5, "constant", 4, 16, 3)
    assert t["optimizer"] == "adamw"  # the guide's AdamW
    model = yaml.safe_load((Path("runs/d") / "config.yaml").read_text())["model"]
    assert not any(model[k] == v for k, v in R.ARCHITECTURE.items())  # the guide's model, no recipe levers
    assert (t["eval_interval"], t["eval_batches"]) == (0, 0)  # validation at each epoch's end, on all of it
    # the guide's own rate is information in the banner, once; not a warning (-q hides it)
    assert capsys.readouterr().err.count("learns slowly") == 1
    assert main(["-q", "train", *SHORT, "--num_samples", "80", "--checkpoint_dir", "runs/q"]) == 0
    assert "learns slowly" not in capsys.readouterr().err


def test_own_data_with_a_step_limit_leaves_a_best_model_to_sample_and_evaluate(notes, capsys):
    """The README's commands after a run that --max_steps ends inside its first epoch."""
    assert main(["train", "--data", str(notes), *SHORT, "--checkpoint_dir", "runs/n"]) == 0
    assert "sab-omni generate --checkpoint runs/n/best_model.pt" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", "runs/n/best_model.pt", "--prompt", "note", "--max-new-tokens", "4"]) == 0
    assert main(["eval", "--checkpoint", "runs/n/best_model.pt", "--data", str(notes)]) == 0


def test_the_rule_validates_about_ten_times_within_a_small_share_of_the_compute():
    cfg = build_config({"preset": "tiny", "seq_len": 128})
    for windows in (400, 5_000, 200_000):
        out, lines = apply_recipe(cfg, windows, set(), "test")
        t, steps = out.train, _planned_steps(out, windows)
        assert t.eval_interval == 0 or t.eval_interval >= math.ceil(steps / R.EVALUATIONS)  # about ten at most
        validations = (steps // t.eval_interval if t.eval_interval else 0) + t.epochs
        share = validations * t.eval_batches / (3 * steps * t.gradient_accumulation_steps)
        assert share <= R.EVAL_SHARE or t.eval_interval == 0  # the epochs' ends validate whatever it costs
        assert t.eval_batches >= R.MIN_EVAL_BATCHES
        assert any("validation every" in text or "validation at each epoch's end" in text for _, text in lines)
        # a validation set no larger than that is validated whole (then sab-omni eval reproduces it)
        assert apply_recipe(cfg, windows, set(), "test", val_windows=t.batch_size)[0].train.eval_batches == 0
        assert apply_recipe(cfg, windows, set(), "test", val_windows=10**7)[0].train.eval_batches == t.eval_batches
    mine, lines = apply_recipe(cfg, 5_000, {"eval_interval", "eval_batches"}, "test")
    assert (mine.train.eval_interval, mine.train.eval_batches) == (0, 0)  # the config's, as given


def _planned_steps(cfg, windows: int) -> int:
    t = cfg.train
    return t.epochs * math.ceil(math.ceil(windows / t.batch_size) / t.gradient_accumulation_steps)


def test_a_step_limit_is_what_the_recipe_lines_plan_for(notes, capsys):
    assert main(["train", "--data", str(notes), *SHORT[:-4], "--max_steps", "3", "--progress", "false",
                 "--checkpoint_dir", "runs/s"]) == 0
    err = capsys.readouterr().err
    assert "train.max_steps=3 stops the run after 3 of" in err and "40% of the 3-step run" in err
    assert "validation at each epoch's end and the run's end only: validations inside a run this short" in err


def test_a_short_run_validates_less_often_rather_than_overrun_the_budget():
    """Validations of at least 8 batches every 2 steps of a 12-step fine-tune, each improvement writing
    a 1.6 GB best_model.pt, made it take 123 s instead of 63 s (2026-12-05, docs/RECIPES.md)."""
    assert R.evaluation_cadence(12, 1, 1) == (0, R.MIN_EVAL_BATCHES)  # 3.6 forward passes of budget: none inside
    interval, batches = R.evaluation_cadence(100, 1, 1)  # budget 30: 11 x 8 would be 88
    assert (interval, batches) == (50, R.MIN_EVAL_BATCHES) and (100 // interval + 1) * batches <= 30
    assert R.evaluation_cadence(1000, 4, 1) == (100, 109)  # long enough: about ten, more batches each
    # a validation set of 1 batch, validated whole: 2 inside the run and the end fit the 3.6 passes
    assert R.evaluation_cadence(12, 1, 1, validation_batches=1) == (6, 0)


def test_the_rules_rate_follows_a_batch_size_you_give():
    cfg = build_config({"preset": "tiny", "seq_len": 128, "batch_size": 64})
    mine, _ = apply_recipe(cfg, 5000, {"batch_size"}, "test")
    rule, _ = apply_recipe(cfg, 5000, set(), "test")
    assert mine.train.batch_size == 64 and rule.train.batch_size != 64
    tokens = lambda c: c.train.batch_size * c.train.gradient_accumulation_steps * 128  # noqa: E731
    assert mine.train.learning_rate == pytest.approx(R.peak_learning_rate(cfg.model, tokens(mine)))
    assert rule.train.learning_rate == pytest.approx(R.peak_learning_rate(cfg.model, tokens(rule)))


def test_under_torchrun_the_rule_counts_samples_over_all_processes(monkeypatch):
    cfg = build_config({"preset": "tiny", "seq_len": 128})
    one, _ = apply_recipe(cfg, 100_000, set(), "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    four, _ = apply_recipe(cfg, 100_000, set(), "test")
    per_step = lambda c, w: c.train.batch_size * c.train.gradient_accumulation_steps * w  # noqa: E731
    assert per_step(four, 4) >= per_step(one, 1) and per_step(four, 4) < per_step(one, 1) + 4 * four.train.batch_size
    assert four.train.learning_rate == pytest.approx(one.train.learning_rate, rel=0.2)


def test_the_api_applies_the_rule_to_a_new_model_only(notes):
    sab = SABTranscendentV2(preset="tiny")
    result = train_3b_rapid(sab, data=str(notes), seq_len=64, max_steps=1, checkpoint_dir="runs/e", progress=False)
    assert sab.config.train.lr_schedule == "cosine" and sab.config.train.learning_rate > 1e-3
    loaded = SABTranscendentV2.load(result.checkpoints[-1])
    train_3b_rapid(loaded, data=str(notes), seq_len=64, max_steps=1, checkpoint_dir="runs/f", progress=False)
    assert loaded.config.train.learning_rate == sab.config.train.learning_rate  # its config, as loaded
    assert (loaded.config.train.batch_size, loaded.config.train.gradient_accumulation_steps) == (4, 16)


def test_the_banner_names_the_recipe_and_warns_in_a_subprocess(notes):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "sab_byon_omni.cli", "train", "--data", str(notes), *SHORT,
                          "--learning_rate", "1e-5", "--checkpoint_dir", "runs/g"], capture_output=True, text=True,
                         env=env, cwd=notes.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "recipe:" in text and "from scratch" in text and "yours: learning_rate" in text
    assert "learns slowly" in text  # 1e-5 is far below the rule for hidden 64
    assert "optimizer step planned" in text  # --max_steps 1: too few to learn


def test_the_validation_interval_follows_what_one_validation_costs_in_each_process(monkeypatch):
    """The review's cases: a whole validation set of 4 batches, your --eval_batches 1, and torchrun
    (each process validates its own share, within its own budget)."""
    cfg = build_config({"preset": "tiny", "seq_len": 128, "batch_size": 1, "gradient_accumulation_steps": 1,
                        "max_steps": 40, "eval_batches": 1})
    geometry = {"batch_size", "gradient_accumulation_steps", "max_steps"}
    mine, lines = apply_recipe(cfg, 10_000, geometry | {"eval_batches"}, "test")
    assert (mine.train.eval_interval, mine.train.eval_batches) == (4, 1)  # 10 + 1 of 1 batch: within 12 passes
    rule, _ = apply_recipe(cfg, 10_000, geometry, "test")
    assert rule.train.eval_interval == 0  # 8 batches each: only the end fits
    small_set, _ = apply_recipe(cfg, 10_000, geometry, "test", val_windows=2)
    assert (small_set.train.eval_interval, small_set.train.eval_batches) == (8, 0)  # the whole set, 2 batches: 6 fit
    monkeypatch.setenv("WORLD_SIZE", "2")
    two, _ = apply_recipe(cfg, 10_000, geometry, "test")
    t = two.train
    validations = (40 // t.eval_interval if t.eval_interval else 0) + t.epochs
    assert t.eval_interval == 0 or validations * t.eval_batches <= R.EVAL_SHARE * 3 * 40 * t.gradient_accumulation_steps


def test_with_your_interval_the_banner_does_not_claim_the_budget():
    """A review found '--eval_interval 2 --max_steps 6' described as 'all validations within 10%'
    (9 batches against a budget of 1.8)."""
    cfg = build_config({"preset": "tiny", "seq_len": 128, "eval_interval": 2, "max_steps": 6})
    _, lines = apply_recipe(cfg, 10_000, {"eval_interval", "max_steps"}, "test")
    text = "\n".join(line for _, line in lines)
    assert "validation every 2 steps (yours)" in text and "at your interval they may take more" in text
    assert "within 10% of the training compute" not in text
