"""A run built once (training/build.py) and read by the Trainer, without the CLI: what the Run
holds, the cadence of logging, validation and checkpoints, the state after N steps, the checkpoint
as a composition of parts (each one round-trips), the file format of the code before issue 23
(old checkpoints keep resuming), the one resume rule, and no process-wide allocator change."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sab_byon_omni.config import RunConfig, build_config
from sab_byon_omni.data.tokenizers import Char96Tokenizer
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training import trainer as T
from sab_byon_omni.training.build import Run, build_run
from sab_byon_omni.training.checkpointer import PART_KEYS, Checkpointer, CheckpointMeta
from sab_byon_omni.training.metrics import EPOCH_END, EVAL, TRAIN, row_kind
from sab_byon_omni.training.state import capture_rng
from tests.hostile import flip_tensor_bit

SEQ = 32  # every sample is 32 tokens: 31 predicted


def samples(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 96, SEQ) for _ in range(n)]


def config(tmp_path: Path, **train) -> RunConfig:
    """A tiny model on in-memory data: 40 samples, 4 per optimizer step, 10 steps an epoch, fp32."""
    return build_config({"model": {"preset": "tiny", "vocab_size": 96}, "data": {"seq_len": SEQ},
                         "train": {"epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1,
                                   "learning_rate": 3e-3, "precision": "fp32", "device": "cpu", "progress": False,
                                   "checkpoint_dir": str(tmp_path / "ckpt"), **train}})


def built(cfg: RunConfig) -> Run:
    torch.manual_seed(0)
    return build_run(CausalTransformer(cfg.model), Char96Tokenizer(), samples(40, 0), samples(8, 1), cfg)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_is_built_once_frozen_and_the_trainer_reads_it(tmp_path):
    cfg = config(tmp_path)
    run = built(cfg)
    assert (run.steps_per_epoch, run.total_steps, run.resume_from, run.state.global_step) == (10, 10, None, 0)
    assert run.cfg == cfg and run.info.world == 1 and not run.fsdp and run.wrapped is run.model
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # the schedule set for step 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.optimizer = None  # type: ignore[misc]
    trainer = T.Trainer(run)
    assert trainer.state is run.state and trainer.raw is run.model
    assert set(vars(trainer)) == {"run", "notes", "resume_hint", "stop", "agreed_stop", "saved_step", "clock",
                                  "last_loss", "window", "wait_limit"}  # the trainer's own: the loop's only
    run.close()


def test_the_config_a_run_uses_is_the_memory_plans_and_comes_back_in_the_result(tmp_path, monkeypatch):
    from sab_byon_omni.estimate import estimate
    from sab_byon_omni.training import memory as memory_mod

    cfg = config(tmp_path, batch_size=8, auto_micro_batch=True, max_steps=1)
    need = estimate(cfg.model, SEQ, 4, "fp32", device="cpu", fused_optimizer=True).peak  # 4 fit, 8 do not
    model_bytes = 4 * CausalTransformer(cfg.model).num_parameters()
    monkeypatch.setattr(memory_mod, "memory_budget", lambda device: ((need * 1.05) / 0.9 - model_bytes, "test"))
    run = built(cfg)
    t = run.cfg.train
    assert (t.batch_size, t.gradient_accumulation_steps, t.auto_micro_batch) == (4, 2, False)
    assert run.cfg == run.memory.cfg and run.cfg != cfg
    result = T.Trainer(run).fit()
    assert result.config is run.cfg
    assert load_checkpoint(tmp_path / "ckpt" / "step_1.pt")["config"]["train"]["batch_size"] == 4


def test_log_eval_and_save_cadence_and_the_state_after_an_epoch(tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5])  # validations at steps 4 and 8, then at the epoch's end (step 10)
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: next(scripted))
    saved = []
    real = T.Trainer.save_checkpoint

    def recording(self, name, loss, val_loss=None):
        saved.append((name, self.state.global_step))
        return real(self, name, loss, val_loss)

    monkeypatch.setattr(T.Trainer, "save_checkpoint", recording)
    run = built(config(tmp_path, log_interval=3, eval_interval=4, save_every=5, keep_last=10))
    result = T.Trainer(run).fit()
    got = rows(tmp_path / "ckpt")
    assert [r["step"] for r in got if row_kind(r) == TRAIN] == [3, 6, 9, 10]  # every 3 steps, and the epoch's last
    assert [(r["step"], r["val_loss"]) for r in got if row_kind(r) == EVAL] == [(4, 3.0), (8, 2.0)]
    assert [(r["step"], r["epoch"], r["val_loss"]) for r in got if row_kind(r) == EPOCH_END] == [(10, 1, 2.5)]
    assert saved == [("best_model", 4), ("step_5", 5), ("best_model", 8), ("step_10", 10), ("epoch_1", 10)]
    st = run.state
    assert (st.epoch, st.cursor, st.global_step, st.epoch_tokens, st.best_val_loss) == (1, 0, 10, 0, 2.0)
    assert st.val_losses == [2.5] and len(st.train_losses) == 1 and math.isfinite(st.train_losses[0])
    assert result.checkpoints == [str(tmp_path / "ckpt" / "epoch_1.pt")] and result.global_step == 10
    assert load_checkpoint(tmp_path / "ckpt" / "best_model.pt")["val_loss"] == 2.0


def test_the_state_after_three_steps_is_what_the_step_checkpoint_holds(tmp_path):
    run = built(config(tmp_path, max_steps=3))
    result = T.Trainer(run).fit()
    st = run.state
    assert (st.epoch, st.cursor, st.global_step, st.epoch_tokens, st.skipped_steps) == (0, 12, 3, 12 * (SEQ - 1), 0)
    assert math.isfinite(st.epoch_loss_sum) and st.epoch_loss_sum > 0
    ck = load_checkpoint(tmp_path / "ckpt" / "step_3.pt")
    assert ck["data_state"] == {"epoch": 0, "cursor": 12, "world_size": 1, "epoch_loss_sum": st.epoch_loss_sum,
                                "epoch_tokens": st.epoch_tokens, "skipped_steps": 0, "skipped_in_a_row": 0,
                                # the metrics row in progress (empty here: a row is written every step)
                                "log_loss_sum": 0.0, "log_tokens": 0, "log_steps": 0}
    assert (ck["global_step"], ck["epoch"], ck["best_val_loss"]) == (3, 0, st.best_val_loss)
    assert ck["loss"] == pytest.approx(st.epoch_loss_sum / st.epoch_tokens)
    assert ck["scheduler_state_dict"] == {"name": "constant", "step": 3, "total_steps": 3}
    assert result.checkpoints == [str(tmp_path / "ckpt" / "step_3.pt")]


def _same(a, b) -> bool:
    """Equal nested state (tensors by value)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_the_checkpoint_is_a_composition_of_parts_and_each_round_trips(tmp_path):
    """The Checkpointer's payload of every part (fp16: the GradScaler has state), written and read
    back into the parts of a fresh run: each part's state_dict() is what it was."""
    a = built(config(tmp_path / "a", precision="fp16", max_steps=3))
    T.Trainer(a).fit()
    before = {name: part.state_dict() for name, part in a.parts().items()}
    assert set(before) == set(PART_KEYS) | {"train_state"} and before["scaler"] and before["train_state"]["cursor"] == 12
    payload = a.checkpointer.payload(a.parts(), CheckpointMeta(a.cfg.to_dict(), a.tokenizer.to_spec()), loss=1.5)
    save_checkpoint(payload, tmp_path / "x.pt")
    ck = load_checkpoint(tmp_path / "x.pt", verify_tensors=True)
    b = built(config(tmp_path / "b", precision="fp16", max_steps=3))  # a fresh run: other weights, seeded RNG
    assert not _same(b.model.state_dict(), before["model"])
    b.checkpointer.restore(tmp_path / "x.pt", ck, b.parts(), b.cfg, b.tokenizer.to_spec(), len(b.train_data))
    after = {name: part.state_dict() for name, part in b.parts().items()}
    for name in before:
        assert _same(after[name], before[name]), name
    meta = CheckpointMeta.of(ck)
    assert (meta.config, meta.tokenizer, meta.torch_version) == (a.cfg.to_dict(), a.tokenizer.to_spec(),
                                                                 str(torch.__version__))
    a.close()
    b.close()


def payload_as_before_issue_23(run: Run, loss: float, val_loss: float | None) -> dict:
    """A checkpoint dict key for key as the code before issue 23 built it (trainer.save_checkpoint,
    TrainState.to_checkpoint and Checkpointer.save of that code), literal keys."""
    st = run.state
    return {
        "epoch": st.epoch, "global_step": st.global_step,
        "data_state": {"epoch": st.epoch, "cursor": st.cursor, "world_size": 1,
                       "epoch_loss_sum": float(st.epoch_loss_sum), "epoch_tokens": int(st.epoch_tokens),
                       "skipped_steps": st.skipped_steps, "skipped_in_a_row": st.skipped_in_a_row},
        "history": {"train_loss": list(st.train_losses), "val_loss": list(st.val_losses)},
        "best_val_loss": st.best_val_loss, "loss": loss, "val_loss": val_loss, "config": run.cfg.to_dict(),
        "scaler_state_dict": run.scaler.state_dict(), "rng_state": capture_rng(run.device),
        "scheduler_state_dict": {"name": run.cfg.train.lr_schedule, "step": st.global_step,
                                 "total_steps": run.total_steps},
        "tokenizer": run.tokenizer.to_spec(), "torch_version": str(torch.__version__),
        "model_state_dict": run.model.state_dict(), "optimizer_state_dict": run.optimizer.state_dict(),
    }


def _shape(d: dict) -> dict:
    """The keys of a checkpoint dict, with those of its sections."""
    return {k: sorted(v) if k in ("data_state", "history", "scheduler_state_dict") else None for k, v in d.items()}


def test_a_checkpoint_written_as_before_issue_23_resumes_and_ours_has_its_format(tmp_path):
    a = built(config(tmp_path / "old", max_steps=3))
    T.Trainer(a).fit()
    old = payload_as_before_issue_23(a, loss=1.5, val_loss=None)
    ours = a.checkpointer.payload(a.parts(), CheckpointMeta(a.cfg.to_dict(), a.tokenizer.to_spec()), loss=1.5)
    # the same keys, sections included, and since then the metrics row in progress in data_state
    grown = {**old, "data_state": {**old["data_state"], "log_loss_sum": 0.0, "log_tokens": 0, "log_steps": 0}}
    assert _shape(ours) == _shape({**grown, "model_state_dict": None})
    folder = tmp_path / "resumed" / "ckpt"
    folder.mkdir(parents=True)
    save_checkpoint(old, folder / "step_3.pt")  # tagged and checksummed, as that code's save did
    b = built(config(tmp_path / "resumed", max_steps=5, resume="auto"))
    assert b.resume_from == folder / "step_3.pt"
    assert _same(b.state.state_dict(), a.state.state_dict()) and _same(b.model.state_dict(), a.model.state_dict())
    assert _same(b.optimizer.state_dict()["state"], a.optimizer.state_dict()["state"])
    assert T.Trainer(b).fit().global_step == 5


def test_a_checkpoint_with_only_the_guides_keys_resumes(tmp_path):
    """An old or exported file: epoch, global_step, config, the weights and the optimizer; the rest
    reads as a fresh state's."""
    a = built(config(tmp_path / "a", max_steps=2))
    T.Trainer(a).fit()
    folder = tmp_path / "b" / "ckpt"
    folder.mkdir(parents=True)
    save_checkpoint({"epoch": 0, "global_step": 2, "config": a.cfg.to_dict(), "loss": 1.0,
                     "model_state_dict": a.model.state_dict(), "optimizer_state_dict": a.optimizer.state_dict()},
                    folder / "step_2.pt")
    b = built(config(tmp_path / "b", max_steps=3, resume="auto"))
    st = b.state
    assert (st.global_step, st.epoch, st.cursor, st.best_val_loss, st.train_losses) == (2, 0, 0, math.inf, [])
    assert _same(b.model.state_dict(), a.model.state_dict())
    b.close()


def test_one_rule_says_which_checkpoint_resumes(tmp_path):
    run = built(config(tmp_path, save_every=2, keep_last=5, max_steps=4))
    T.Trainer(run).fit()
    ck = Checkpointer(tmp_path / "ckpt")
    assert ck.resume_point("auto", verify=False)[0] == ck.resume_point("auto")[0] == tmp_path / "ckpt" / "step_4.pt"
    step4 = tmp_path / "ckpt" / "step_4.pt"
    flip_tensor_bit(step4, load_checkpoint(step4)["model_state_dict"]["embed.weight"])  # fails its checksum only
    assert ck.resume_point("auto", verify=False)[0].name == "step_4.pt"  # metadata only: the newest
    assert ck.resume_point("auto")[0].name == "step_2.pt"  # checked: the next newest
    with pytest.raises(SabError, match="already holds checkpoints"):
        ck.resume_point("none")
    assert Checkpointer(tmp_path / "empty").resume_point("auto") is None


_FAULTS_AFTER_TRAINING = """
import resource, sys, tempfile, torch
from sab_byon_omni.cli import main
assert main(["-q", "train", "--preset", "tiny", "--num_samples", "16", "--seq_len", "32", "--batch_size", "4",
             "--max_steps", "2", "--precision", "fp32", "--device", "cpu", "--progress", "false",
             "--checkpoint_dir", tempfile.mkdtemp() + "/ck"]) == 0
per = []
for _ in range(24):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(12 << 20)  # 48 MiB: above glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    per.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(max(per[-4:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_training_leaves_the_processs_allocator_as_it_was(tmp_path):
    """The library changes no process-wide malloc policy: after a run a 48 MiB tensor is mapped and
    faulted in afresh each time (glibc's default), unless the process was started with the
    settings docs/TRAINING.md gives for keeping freed memory."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(**env: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_AFTER_TRAINING], env={**base, **env}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    assert faults() > 10_000  # 12,288 pages each time
    assert faults(GLIBC_TUNABLES="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647") < 1_000


@pytest.mark.slow  # 1.5 min on 2 shared cores: torch.compile on a CPU
def test_compiled_blocks_train_ten_steps_of_variable_lengths_without_recompiling(tmp_path):
    """train.compile compiles each block (one graph for all of them, dynamic shapes): 10 steps over
    batches of different lengths compile once for training and once for the validation (no grad)."""
    from torch._dynamo.utils import counters

    from sab_byon_omni.training.build import compile_blocks
    from sab_byon_omni.training.launch import run_training

    lengths: set[int] = set()
    real = compile_blocks

    def spy(model):  # records the length each block 0 call sees (outside the compiled code)
        model.blocks[0].register_forward_pre_hook(lambda m, args: lengths.add(args[0].shape[1]))
        real(model)

    torch._dynamo.reset()
    counters.clear()
    cfg = build_config(dict(preset="tiny", num_samples=60, seq_len=64, batch_size=2, gradient_accumulation_steps=1,
                            epochs=1, max_steps=10, precision="fp32", device="cpu", progress=False, compile=True,
                            checkpoint_dir=str(tmp_path / "run")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sab_byon_omni.training.build.compile_blocks", spy)
        _, result = run_training(cfg)
    assert result.global_step == 10 and len(lengths) >= 3, lengths
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # training, and validation
    assert not counters["recompiles"], dict(counters["recompiles"])
