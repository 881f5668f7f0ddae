"""The from-scratch recipe rule (sab_byon_omni/training/recipe.py): pure arithmetic, no torch."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from sab_byon_omni.config import ModelConfig, RunConfig, replace
from sab_byon_omni.data.batching import micro_steps_per_epoch
from sab_byon_omni.errors import SabError
from sab_byon_omni.training import recipe as R


def model(preset: str = "small", **kw) -> ModelConfig:
    return ModelConfig.from_name(preset, **kw)


def test_rate_falls_with_width_and_is_clipped() -> None:
    assert R.peak_learning_rate(model("small")) == pytest.approx(R.LR_PER_WIDTH / 256)
    assert R.peak_learning_rate(model("small", hidden=512, n_heads=4)) == pytest.approx(R.LR_PER_WIDTH / 512)
    assert R.peak_learning_rate(model("tiny", hidden=8, n_heads=2)) == R.LR_MAX
    assert R.peak_learning_rate(model("3b")) == R.LR_MIN


def test_rate_grows_with_sqrt_of_batch_up_to_the_cap() -> None:
    base = R.peak_learning_rate(model("small"))
    assert R.peak_learning_rate(model("small"), 4 * R.SWEEP_TOKENS_PER_STEP) == pytest.approx(2 * base)
    assert R.peak_learning_rate(model("small"), 100 * R.SWEEP_TOKENS_PER_STEP) == pytest.approx(R.BATCH_LR_CAP * base)
    assert R.peak_learning_rate(model("small"), R.SWEEP_TOKENS_PER_STEP // 4) == pytest.approx(base / 2)
    with pytest.raises(SabError):
        R.peak_learning_rate(model("small"), 0)


@pytest.mark.parametrize("steps,expected", [(1, 1), (10, 4), (200, 80), (10_000, R.WARMUP_MAX)])
def test_warmup(steps: int, expected: int) -> None:
    assert R.warmup_steps(steps) == expected


def trainer_steps(windows: int, batch: int, accum: int) -> int:
    """Optimizer steps of one epoch as the trainer plans them (build.steps_per_epoch)."""
    return math.ceil(micro_steps_per_epoch(windows, batch) / accum)


def test_large_corpus_gets_at_least_the_target_steps_per_epoch() -> None:
    batch, accum, epochs, steps, reasons = R.batch_geometry(corpus_tokens=4_332_527, seq_len=128)
    windows_per_step = batch * accum
    assert epochs == 1 and steps >= R.TARGET_STEPS
    assert R.MIN_TOKENS_PER_STEP <= windows_per_step * 128 <= R.MAX_TOKENS_PER_STEP
    assert batch * 128 <= R.MAX_MICRO_TOKENS
    assert steps == trainer_steps(4_332_526 // 127, batch, accum)  # the banner's count is the trainer's
    assert reasons and all(len(r) < 200 for r in reasons)


def test_huge_corpus_stops_at_the_largest_batch() -> None:
    batch, accum, epochs, steps, _ = R.batch_geometry(corpus_tokens=10**10, seq_len=1024)
    assert batch * accum * 1024 == R.MAX_TOKENS_PER_STEP
    assert batch * 1024 <= R.MAX_MICRO_TOKENS and accum > 1
    assert epochs == 1 and steps > R.TARGET_STEPS


def test_small_corpus_takes_more_epochs_at_the_smallest_batch() -> None:
    batch, accum, epochs, steps, reasons = R.batch_geometry(corpus_tokens=60_000, seq_len=256)
    assert batch * accum == R.MIN_TOKENS_PER_STEP // 256
    assert epochs > 1 and steps >= R.TARGET_STEPS
    assert any("epochs" in r for r in reasons)


def test_tiny_corpus_is_capped_in_epochs_and_warned_about() -> None:
    batch, accum, epochs, steps, _ = R.batch_geometry(corpus_tokens=3_000, seq_len=256)
    assert epochs == R.MAX_EPOCHS
    assert batch * accum <= 11  # never more windows per step than the corpus has
    assert steps == epochs * trainer_steps(2_999 // 255, batch, accum)
    with pytest.raises(SabError, match="seq_len"):
        R.batch_geometry(corpus_tokens=100, seq_len=256)


def test_recipe_is_a_valid_config_and_explains_itself() -> None:
    rec = R.from_scratch_recipe(model("small", vocab_size=258), corpus_tokens=2_616_741, seq_len=128)
    cfg = replace(RunConfig(), **rec.train_overrides())
    t = cfg.train
    assert (t.learning_rate, t.warmup_steps, t.lr_schedule) == (rec.learning_rate, rec.warmup_steps, "cosine")
    assert (t.beta1, t.beta2) == (R.BETA1, R.BETA2) == (0.8, 0.95)
    assert t.batch_size * t.gradient_accumulation_steps * 128 * rec.total_steps >= 2_616_741 * 0.9 / t.epochs
    assert rec.warmup_steps == R.warmup_steps(rec.total_steps)
    assert len(rec.reasons) >= 3 and any("Muon for the blocks" in r and "AdamW for the embedding" in r for r in rec.reasons)
    assert any(f"Newton-Schulz 5 x quintic ({R.NS_REASON})" in r for r in rec.reasons)  # the schedule, and why


def test_recipe_for_a_given_geometry_keeps_it() -> None:
    rec = R.recipe_for_geometry(model("tiny"), seq_len=128, batch_size=16, gradient_accumulation_steps=1,
                                epochs=1, total_steps=200)
    assert (rec.batch_size, rec.total_steps, rec.warmup_steps) == (16, 200, 80)
    assert rec.learning_rate == pytest.approx(min(R.LR_PER_WIDTH / 64, R.LR_MAX))


def test_slow_rates_are_named() -> None:
    lw = model("lightweight")
    message = R.learns_slowly(2e-5, lw)
    assert message is not None and "2e-05" in message and "\n" not in message
    assert R.learns_slowly(R.peak_learning_rate(lw), lw) is None
    assert R.learns_slowly(R.peak_learning_rate(lw) / R.SLOW_FACTOR, lw) is None
    assert R.learns_slowly(R.peak_learning_rate(lw) / R.SLOW_FACTOR * 0.99, lw) is not None


def test_too_few_steps() -> None:
    assert R.too_few_steps(9) is not None and "9" in R.too_few_steps(9)
    assert R.too_few_steps(R.MIN_STEPS) is None
    assert "raise --max_steps" in R.too_few_steps(9, capped=True) and "smaller batch" in R.too_few_steps(9)


def test_recipe_module_is_pure() -> None:
    tree = ast.parse(Path(R.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    project = {m for m in imported if m.startswith("sab_byon_omni")}
    assert project == {"sab_byon_omni.config", "sab_byon_omni.errors"}
    assert not {m for m in imported - project if m.split(".")[0] not in ("__future__", "math", "dataclasses", "typing")}
    assert math.isfinite(R.LR_PER_WIDTH)


@pytest.mark.parametrize("seq_len", [2, 3, 64, 1024, 8192, 65536, 200_000])
def test_the_geometry_of_any_window_length_is_found_at_once(seq_len) -> None:
    """A window longer than a micro-batch's token budget stays one micro-batch (this once looped forever)."""
    batch, accumulation, epochs, steps, _ = R.batch_geometry(10**7, seq_len)
    assert batch >= 1 and accumulation >= 1 and epochs >= 1 and steps >= 1
    assert batch * accumulation * seq_len <= max(R.MAX_TOKENS_PER_STEP, seq_len)


def test_the_recipe_gives_a_fresh_model_its_architecture_levers_unless_you_chose_them() -> None:
    fields, lines = R.architecture(model("tiny"))
    assert fields == R.ARCHITECTURE and fields and len(lines) == 1 and lines[0].startswith("model: ")
    assert R.architecture(model("tiny"), {"zero_init_proj"}) == ({}, [])  # yours wins
    assert R.architecture(model("tiny", **R.ARCHITECTURE)) == ({}, [])  # already so: nothing to say
    cfg = replace(RunConfig(), **{f"model.{k}": v for k, v in fields.items()})
    assert all(getattr(cfg.model, k) == v for k, v in fields.items())  # valid model settings
