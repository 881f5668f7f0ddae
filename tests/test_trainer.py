import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.data.batching import collate
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.checkpoint import load_checkpoint
from sab_byon_omni.training import trainer as T
from sab_byon_omni.loss import causal_lm_loss
from sab_byon_omni.training.optim import lr_at
from tests.helpers import tiny_config, trainer_for


def test_loss_is_the_guide_shift_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 1, 2]])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)


def _grads(trainer, window):
    trainer.run.optimizer.zero_grad(set_to_none=True)
    trainer.forward_backward(window)
    return [p.grad.clone() for p in trainer.raw.parameters()]


def test_accumulating_16_micro_batches_of_4_equals_one_batch_of_64(tmp_path):
    """In fp32, where the sum over 16 micro-batches equals the big batch's to rounding (bf16
    autocast differs by ~4e-5 whichever way the batch is cut; its training path is tested below)."""
    trainer = trainer_for(tiny_config(tmp_path, precision="fp32"))
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 96, size=int(rng.integers(5, 60))) for _ in range(64)]  # very uneven lengths
    small = [collate(rows[i:i + 4], pad_id=0) for i in range(0, 64, 4)]
    big = [collate(rows, pad_id=0)]
    g_small, g_big = _grads(trainer, small), _grads(trainer, big)
    for a, b in zip(g_small, g_big):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a per-micro-batch mean (the common mistake) would weight short batches' tokens more
    assert max((a - b).abs().max() for a, b in zip(g_small, g_big)) < 1e-5


def test_lr_schedule_is_a_pure_function_of_the_step(tmp_path):
    const = tiny_config(tmp_path)
    assert [lr_at(s, const.train, 100) for s in (0, 50, 99)] == [3e-3] * 3
    cos = tiny_config(tmp_path, lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cos.train, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[9] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-4, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_loss_falls_on_a_tiny_config(tmp_path):
    trainer = trainer_for(tiny_config(tmp_path, epochs=3))
    result = trainer.fit()
    assert len(result.train_losses) == 3 and len(result.val_losses) == 3
    assert result.val_losses[-1] < result.val_losses[0] < math.log(96)
    assert result.train_losses[-1] < 0.8 * result.train_losses[0]
    assert all(math.isfinite(x) for x in result.train_losses + result.val_losses)
    assert [p.rsplit("/", 1)[-1] for p in result.checkpoints] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert result.best_checkpoint.endswith("best_model.pt")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_train_on_cpu(tmp_path, precision):
    trainer = trainer_for(tiny_config(tmp_path, precision=precision, max_steps=3))
    result = trainer.fit()
    assert trainer.run.precision.name == precision
    assert trainer.run.scaler.is_enabled() == (precision == "fp16")
    assert result.global_step == 3
    if precision == "bf16":  # fp16 may skip its first steps while the GradScaler calibrates
        assert result.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in trainer.raw.parameters())


def test_no_host_sync_inside_the_accumulation_window(tmp_path, monkeypatch):
    trainer = trainer_for(tiny_config(tmp_path, gradient_accumulation_steps=4, max_steps=2, log_interval=100))
    state = {"inside": False, "syncs": 0, "windows": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            state["syncs"] += state["inside"]
            return original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        counting(name)
    accumulate = trainer.forward_backward

    def watched(window):
        state["inside"], state["windows"] = True, state["windows"] + 1
        try:
            return accumulate(window)
        finally:
            state["inside"] = False

    monkeypatch.setattr(trainer, "forward_backward", watched)
    trainer.fit()
    assert state["windows"] == 2 and state["syncs"] == 0


def test_step_mode_modulation_follows_theoptimizer_step(tmp_path):
    trainer = trainer_for(tiny_config(tmp_path, max_steps=5))
    trainer.fit()
    assert float(trainer.raw.fragmergent.step) == 5.0


def test_bucketing_by_theoptimizer_step_keeps_the_training_trajectory(tmp_path):
    # length_bucket_size = batch x accumulation only regroups the samples inside each step, whose
    # gradient is the sum over the window: same weights up to rounding, with less padding.
    def run(bucket):
        cfg = tiny_config(tmp_path / str(bucket), max_steps=4, gradient_accumulation_steps=4, batch_size=2,
                       lr_schedule="constant")
        cfg = build_config({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "length_bucket_size": bucket}})
        trainer = trainer_for(cfg)
        trainer.fit()
        return [p.detach().clone() for p in trainer.raw.parameters()]

    plain, same, other = run(0), run(8), run(16)
    for a, b in zip(plain, same):  # AdamW's normalisation amplifies last-bit differences a little
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a bucket spanning two steps moves samples between them: visibly different weights
    assert max((a - c).abs().max() for a, c in zip(plain, other)) > 1e-4


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_that_max_steps_ends_inside_its_first_epoch_validates_and_keeps_best_model(tmp_path):
    trainer = trainer_for(tiny_config(tmp_path, max_steps=3))  # 12 steps per epoch, no eval_interval
    result = trainer.fit()
    evals = [r for r in _rows(tmp_path / "ckpt") if "val_loss" in r]
    assert [r["step"] for r in evals] == [3]  # one validation, at the last step
    assert result.best_checkpoint == str(tmp_path / "ckpt" / "best_model.pt")
    best = load_checkpoint(result.best_checkpoint)
    assert (best["global_step"], best["val_loss"]) == (3, evals[0]["val_loss"])
    assert result.best_val_loss == best["val_loss"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["best_model.pt", "step_3.pt"]


@pytest.mark.parametrize("epochs", [1, 3])
def test_max_steps_at_an_epochs_end_completes_that_epoch(tmp_path, epochs):
    """The newcomer's 40 steps of 2-step epochs said 'epoch 20/20' but saved step_40.pt, 19 epoch losses."""
    trainer = trainer_for(tiny_config(tmp_path, max_steps=12, epochs=epochs))  # 12 steps per epoch
    result = trainer.fit()
    assert trainer.state.epoch == 1 and len(result.train_losses) == len(result.val_losses) == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["best_model.pt", "epoch_1.pt"]
    rows = _rows(tmp_path / "ckpt")
    assert [r["step"] for r in rows if "val_loss" in r] == [12]  # validated once, at the epoch's end
    assert [r["epoch"] for r in rows if "train_loss" in r] == [1]


def test_validations_at_an_interval_keep_the_best_so_far(tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, math.nan, 1.0, 4.0])  # steps 2, 4, 6, 8, 10 and the last, 11
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: next(scripted))
    saved = []
    real = T.Trainer.save_checkpoint

    def recording(self, name, loss, val_loss=None):
        saved.append((name, self.state.global_step, val_loss))
        return real(self, name, loss, val_loss)

    monkeypatch.setattr(T.Trainer, "save_checkpoint", recording)
    trainer_for(tiny_config(tmp_path, eval_interval=2, max_steps=11)).fit()
    assert [s for s in saved if s[0] == "best_model"] == [("best_model", 2, 3.0), ("best_model", 4, 2.0),
                                                          ("best_model", 10, 1.0)]
    assert [(r["step"], r["val_loss"]) for r in _rows(tmp_path / "ckpt") if "val_loss" in r][-1] == (11, 4.0)
    assert saved[-1][:2] == ("step_11", 11)  # the resume point comes last
    assert load_checkpoint(tmp_path / "ckpt" / "best_model.pt")["val_loss"] == 1.0


def test_identical_runs_save_identical_python_and_numpy_random_states(tmp_path):
    states = []
    for i in (1, 2):
        random.seed(i)  # whatever the process did before, train.seed decides
        np.random.seed(i)
        trainer = trainer_for(tiny_config(tmp_path / str(i), max_steps=1))
        trainer.fit()
        states.append(load_checkpoint(tmp_path / str(i) / "ckpt" / "step_1.pt")["rng_state"])
    assert states[0]["python"] == states[1]["python"]
    assert states[0]["numpy"] == states[1]["numpy"]
    assert torch.equal(states[0]["torch"], states[1]["torch"])


def test_a_run_that_fails_before_its_first_checkpoint_removes_the_folder_it_created(tmp_path, monkeypatch):
    def failing(self):
        raise SabError("injected")

    monkeypatch.setattr(T.Trainer, "optimizer_step", failing)
    with pytest.raises(SabError, match="injected"):
        trainer_for(tiny_config(tmp_path)).fit()
    assert not (tmp_path / "ckpt").exists()  # no config.yaml, metrics.jsonl or .lock left behind
    (tmp_path / "mine").mkdir()  # a folder the run did not create is never removed
    with pytest.raises(SabError, match="injected"):
        trainer_for(tiny_config(tmp_path, checkpoint_dir=str(tmp_path / "mine"))).fit()
    assert (tmp_path / "mine").is_dir()


def test_a_run_that_fails_after_a_checkpoint_keeps_its_folder(tmp_path, monkeypatch):
    real = T.Trainer.optimizer_step

    def failing_at_step_3(self):
        if self.state.global_step == 2:
            raise SabError("injected")
        return real(self)

    monkeypatch.setattr(T.Trainer, "optimizer_step", failing_at_step_3)
    with pytest.raises(SabError, match="injected"):
        trainer_for(tiny_config(tmp_path, save_every=1)).fit()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["step_1.pt", "step_2.pt"]
