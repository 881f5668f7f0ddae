"""The fine-tuning recipe (training/recipe.py, chosen by training/launch.py): a run that starts from
pretrained weights (--init_from) on your own data without a config file trains with AdamW at the
swept fine-tuning rate (LoRA's with --lora_rank), never Muon unless asked; every flag wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sab_byon_omni.cli import main
from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.training import recipe as R
from sab_byon_omni.training.launch import apply_recipe


def cfg(**train):
    return build_config({"model": {"preset": "small"}, "data": {"seq_len": 128}, "train": train})


def test_init_from_picks_the_fine_tuning_recipe_and_never_muon():
    scratch, _ = apply_recipe(cfg(), 20_000, set(), "--data")
    tuned, lines = apply_recipe(cfg(init_from="weights.gguf"), 20_000, set(), "--data")
    assert scratch.train.optimizer == "muon"  # the contrast: a fresh model's recipe
    t = tuned.train
    assert (t.optimizer, t.learning_rate, t.weight_decay, t.lr_schedule) == ("adamw", R.FT_LR, 0.0, "cosine")
    assert t.learning_rate < scratch.train.learning_rate / 5
    assert 1 <= t.warmup_steps <= R.FT_WARMUP_MAX and t.warmup_steps < scratch.train.warmup_steps
    assert t.epochs <= R.FT_MAX_EPOCHS and t.eval_interval > 0
    text = "\n".join(line for _, line in lines)
    assert "fine-tuning, for pretrained weights" in text and "never uses Muon" in text, text


def test_lora_takes_its_own_rate():
    tuned, lines = apply_recipe(cfg(init_from="weights.gguf", lora_rank=8), 20_000, set(), "--data")
    assert (tuned.train.optimizer, tuned.train.learning_rate) == ("adamw", R.LORA_LR)
    assert any("fine-tuning with LoRA" in line for _, line in lines)
    assert any("AdamW for the LoRA adapters" in line for _, line in lines)


def test_every_flag_given_wins():
    given = cfg(init_from="weights.gguf", learning_rate=3e-4, warmup_steps=7, optimizer="muon", epochs=9,
                weight_decay=0.05)
    tuned, lines = apply_recipe(given, 20_000, {"learning_rate", "warmup_steps", "optimizer", "epochs",
                                                "weight_decay"}, "--data")
    t = tuned.train
    assert (t.learning_rate, t.warmup_steps, t.optimizer, t.epochs, t.weight_decay) == (3e-4, 7, "muon", 9, 0.05)
    assert any("(yours)" in line for _, line in lines)
    rate_only, _ = apply_recipe(cfg(init_from="w.gguf", learning_rate=3e-4), 20_000, {"learning_rate"}, "--data")
    assert rate_only.train.optimizer == "adamw" and rate_only.train.learning_rate == 3e-4


@pytest.mark.parametrize("init_from", ["weights.gguf", None])
def test_max_steps_given_wins_over_the_recipes_epochs(init_from):
    """--max_steps beyond the recipe's epochs: the run gets the epochs to take those steps, and the
    schedule is planned for them (a newcomer's 400-step LoRA run stopped at 45, its rate undecayed)."""
    windows = 200  # a small corpus: few steps per epoch
    plain, _ = apply_recipe(cfg(init_from=init_from), windows, set(), "--data")
    tuned, lines = apply_recipe(cfg(init_from=init_from, max_steps=400), windows, {"max_steps"}, "--data")
    from sab_byon_omni.training.build import steps_per_epoch
    per_epoch_steps = steps_per_epoch(windows, tuned.train.batch_size, tuned.train.gradient_accumulation_steps, 1)
    assert plain.train.epochs * per_epoch_steps < 400 <= tuned.train.epochs * per_epoch_steps
    text = "\n".join(line for _, line in lines)
    assert f"{tuned.train.epochs} epochs, for the train.max_steps=400 you gave" in text, text
    fixed, _ = apply_recipe(cfg(init_from=init_from, max_steps=400, epochs=2), windows, {"max_steps", "epochs"}, "--data")
    assert fixed.train.epochs == 2  # both given: yours, and the run ends with the epochs


def test_lora_without_init_from_gets_adamw_not_a_refusal():
    scratch, lines = apply_recipe(cfg(lora_rank=4), 20_000, set(), "--data")
    assert scratch.train.optimizer == "adamw"
    assert any("Muon does not update" in line for _, line in lines)


def test_architecture_flags_with_init_from_are_refused(in_tmp, capsys):
    from sab_byon_omni.cli import main

    (in_tmp / "notes.txt").write_text("some notes " * 200)
    assert main(["train", "--init_from", "no-such-model.gguf", "--data", str(in_tmp / "notes.txt"),
                 "--tokenizer", "char96", "--preset", "small"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer, --preset cannot apply with --init_from" in err, err


@pytest.mark.integration
def test_train_init_from_with_data_runs_the_recipe(in_tmp, caplog):
    notes = in_tmp / "notes"
    notes.mkdir()
    for i in range(4):
        (notes / f"n{i}.txt").write_text(f"note {i}: the quick brown fox jumps over the lazy dog. " * 60)
    caplog.set_level("INFO")
    torch.manual_seed(0)
    SABTranscendentV2(preset="tiny").save_pretrained(in_tmp / "base")
    assert main(["train", "--init_from", "base", "--data", str(notes), "--seq_len", "64", "--max_steps", "2",
                 "--progress", "false", "--checkpoint_dir", "run", "--lora_rank", "4"]) == 0
    saved = yaml.safe_load(Path("run/config.yaml").read_text())["train"]
    assert (saved["optimizer"], saved["learning_rate"], saved["lora_rank"]) == ("adamw", R.LORA_LR, 4)
    assert "recipe:     fine-tuning with LoRA" in caplog.text


def test_parallel_fsdp_asked_in_one_process_gets_adamw_from_the_recipe():
    """The build refuses Muon with --parallel fsdp even in one process: the recipe must not pick it
    there (a reviewer's `--parallel fsdp` run was refused for a Muon it never asked for)."""
    out, lines = apply_recipe(cfg(parallel="fsdp"), 20_000, {"parallel"}, "--data")
    assert out.train.optimizer == "adamw" and any("--parallel fsdp shards" in line for _, line in lines)
    assert apply_recipe(cfg(parallel="ddp"), 20_000, {"parallel"}, "--data")[0].train.optimizer == "muon"
