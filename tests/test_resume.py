"""Exact resume with real processes: SIGKILL mid-epoch (and mid-save), SIGTERM/SIGINT, then
``--resume auto`` must end bitwise identical to an uninterrupted run, with the same LR trace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sab_byon_omni.files.checkpoint import load_checkpoint
from tests.helpers import tiny_run

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

# The child runs the real CLI. Environment knobs let a test kill it at an exact point with a real
# SIGKILL (no handler, no cleanup can run), or send itself SIGTERM/SIGINT after a chosen step.
CHILD = textwrap.dedent('''
    import os, signal, sys
    from sab_byon_omni.training import trainer as T

    kill_at = int(os.environ.get("SAB_KILL_AT_STEP", "0"))
    signal_at, _, signame = os.environ.get("SAB_SIGNAL_AT_STEP", "0:TERM").partition(":")
    kill_replace = os.environ.get("SAB_KILL_IN_REPLACE", "")
    original_step = T.Trainer.optimizer_step

    def step(self):
        norm = original_step(self)
        if kill_at and self.state.global_step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if int(signal_at) and self.state.global_step + 1 == int(signal_at):
            os.kill(os.getpid(), getattr(signal, "SIG" + signame))  # as if sent by SLURM or Ctrl-C
        return norm

    T.Trainer.optimizer_step = step
    if kill_replace:
        real_replace = os.replace
        def replace(src, dst):
            if os.path.basename(str(dst)) == kill_replace:  # die after the temp file is written
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace

    from sab_byon_omni.cli import main
    sys.exit(main(sys.argv[1:]))
''')

# 108 training samples, 4 per micro-batch, 2 micro-batches per step: 14 steps per epoch, 28 in all.
# Cosine schedule with warmup (a non-trivial LR trace) and dropout (so the RNG state matters).
ARGS = ["-q", "train", *tiny_run(epochs=2, num_samples=120, seq_len=48, gradient_accumulation_steps=2,
                                 deterministic="true", lr_schedule="cosine", warmup_steps=4, dropout=0.1,
                                 save_every=4, keep_last=2, eval_interval=5, eval_batches=2, checkpoint_dir="ck",
                                 resume="auto")]
STEPS = 28


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAB_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONHASHSEED="0", **extra)
    return env


def _start(workdir: Path, extra_args: list[str] = (), base: list[str] = ARGS, **env: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), *base, *extra_args], cwd=workdir, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run(workdir: Path, extra_args: list[str] = (), base: list[str] = ARGS, **env: str) -> tuple[int, str, str]:
    return _finish(_start(workdir, extra_args, base, **env))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ck" / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run: Path) -> list[tuple]:
    return [(r["step"], r["epoch"], r["lr"], r["loss"], r["grad_norm"]) for r in _metrics(run) if "lr" in r]


def _eval_rows(run: Path) -> list[tuple]:
    return [(r["step"], r.get("val_loss"), r.get("train_loss")) for r in _metrics(run) if "val_loss" in r]


def _assert_same_state(a, b, where: str = "") -> None:
    """Recursive equality; tensors must be bitwise equal (same dtype, same values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_identical_runs(ref: Path, run: Path) -> None:
    a, b = load_checkpoint(ref / "ck" / "epoch_2.pt"), load_checkpoint(run / "ck" / "epoch_2.pt")
    assert a["global_step"] == b["global_step"] == STEPS
    _assert_same_state(a["model_state_dict"], b["model_state_dict"])  # bitwise: torch.equal
    _assert_same_state(a["optimizer_state_dict"], b["optimizer_state_dict"])
    assert a["history"] == b["history"]  # per-epoch train/validation losses, exactly
    assert _train_rows(run) == _train_rows(ref)  # the LR trace, losses and grad norms of every step
    assert _eval_rows(run) == _eval_rows(ref)
    assert not list((run / "ck").glob(".*.tmp")), "temporary files left behind"


def _ckpt_dir_files(run: Path) -> list[str]:
    """The run folder's files, besides its lock and its config.yaml."""
    return sorted(p.name for p in (run / "ck").iterdir() if p.name not in (".lock", "config.yaml"))


def test_killed_and_stopped_five_times_then_resumed_is_bitwise_identical(tmp_path):
    """One run, five lives: SIGKILL mid-epoch, SIGKILL in the middle of a save, SIGTERM, SIGINT,
    then the end. It must match an uninterrupted run bit for bit: weights, AdamW state, per-epoch
    losses, and the learning rate, loss and grad norm of every step in metrics.jsonl."""
    ref = tmp_path / "reference"
    reference = _start(ref)  # runs alongside the interrupted lives
    run = tmp_path / "run"
    ck = run / "ck"

    # 1: SIGKILL after step 6 of epoch 1; step_4.pt is the last save (best_model.pt the validation of
    # step 5's), steps 5-6 are lost.
    rc, _, err = _run(run, SAB_KILL_AT_STEP="6")
    assert rc == -signal.SIGKILL, err
    assert _ckpt_dir_files(run) == ["best_model.pt", "metrics.jsonl", "step_4.pt"]

    # 2: resumes at step 4; SIGKILL between writing step_12.pt's temporary file and renaming it.
    rc, _, err = _run(run, SAB_KILL_IN_REPLACE="step_12.pt")
    assert rc == -signal.SIGKILL, err
    assert not (ck / "step_12.pt").exists() and list(ck.glob(".step_12.pt.*.tmp"))
    assert load_checkpoint(ck / "step_8.pt")["global_step"] == 8  # the previous checkpoint is intact
    assert max(r["step"] for r in _metrics(run)) == 12  # rows 9-12 are lost work, trimmed on resume

    # 3: resumes at step 8 (removing the stale temporary file); SIGTERM after step 17 (epoch 2).
    rc, out, err = _run(run, SAB_SIGNAL_AT_STEP="17:TERM")
    assert rc == 130 and "stopped at step 17" in out, err  # a signal stop: 130, like an interrupted command
    assert "Traceback" not in err and not list(ck.glob(".*.tmp"))
    assert load_checkpoint(ck / "epoch_1.pt")["global_step"] == 14
    assert load_checkpoint(ck / "step_17.pt")["data_state"]["epoch"] == 1

    # 4: resumes at step 17; Ctrl-C (SIGINT) after step 22.
    rc, out, err = _run(run, SAB_SIGNAL_AT_STEP="22:INT")
    assert rc == 130 and "stopped at step 22" in out, err
    assert sorted(p.name for p in ck.glob("step_*.pt")) == ["step_20.pt", "step_22.pt"]  # keep_last 2

    # 5: resumes at step 22 and finishes.
    rc, out, err = _run(run)
    assert rc == 0, err
    rc, _, err = _finish(reference)
    assert rc == 0, err
    lrs = [row[2] for row in _train_rows(ref)]
    assert len(lrs) == STEPS and lrs[0] < lrs[3] and lrs[3] > lrs[-1] > 0  # warmup, then cosine decay
    _assert_identical_runs(ref, run)
    assert [r[0] for r in _train_rows(run)] == list(range(1, STEPS + 1))  # no duplicated or missing rows


def test_a_muon_run_killed_then_resumed_is_bitwise_identical(tmp_path):
    """Muon's momentum buffers travel with the checkpoint like AdamW's moments: SIGKILL after
    step 6, resume, and the run ends bit for bit where an uninterrupted one does."""
    # a metrics row every 3 steps, a checkpoint every 4: the row in progress at step 4 is saved with it (a
    # resumed run's first row was the mean of the steps since the resume only: a reviewer's finding)
    muon = ["--optimizer", "muon", "--muon_learning_rate", "0.05", "--muon_warmup_steps", "2", "--log_interval", "3"]
    ref, run = tmp_path / "reference", tmp_path / "run"
    reference = _start(ref, muon)
    rc, _, err = _run(run, muon, SAB_KILL_AT_STEP="6")
    assert rc == -signal.SIGKILL, err
    rc, out, err = _run(run, ["--optimizer", "adamw"])  # the wrong optimizer: refused, nothing touched
    assert rc == 2 and "trained with optimizer 'muon'" in err and "resume with --optimizer muon" in err, err
    assert _ckpt_dir_files(run) == ["best_model.pt", "metrics.jsonl", "step_4.pt"]
    rc, _, err = _run(run, muon)
    assert rc == 0, err
    rc, _, err = _finish(reference)
    assert rc == 0, err
    _assert_identical_runs(ref, run)
    rows = [r for r in _metrics(run) if "lr" in r]
    assert all(r["muon_lr"] > r["lr"] for r in rows[1:])  # Muon's own rate, beside AdamW's


def test_a_lora_run_killed_then_resumed_is_bitwise_identical(tmp_path):
    """LoRA from pretrained weights (the frozen base held in bf16 where the CPU has it, fp32 else):
    SIGKILL after step 6, resume with the same command, and the run ends bit for bit where an
    uninterrupted one does; the base never moves."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    torch.manual_seed(5)
    SABTranscendentV2(preset="tiny").save_pretrained(tmp_path / "base")
    lora = ["--init_from", str(tmp_path / "base"), "--lora_rank", "4", "--lora_dropout", "0.1",
            "--learning_rate", "0.01"]
    base = [a for i, a in enumerate(ARGS) if "--preset" not in ARGS[max(i - 1, 0):i + 1]]  # the weights bring it
    ref, run = tmp_path / "reference", tmp_path / "run"
    reference = _start(ref, lora, base)
    rc, _, err = _run(run, lora, base, SAB_KILL_AT_STEP="6")
    assert rc == -signal.SIGKILL, err
    assert _ckpt_dir_files(run) == ["best_model.pt", "metrics.jsonl", "step_4.pt"]
    rc, _, err = _run(run, lora, base)
    assert rc == 0, err
    rc, _, err = _finish(reference)
    assert rc == 0, err
    _assert_identical_runs(ref, run)
    state = load_checkpoint(run / "ck" / "epoch_2.pt")["model_state_dict"]
    base = SABTranscendentV2.load(tmp_path / "base").model.state_dict()
    assert any(k.endswith(".lora_B") for k in state)
    for k in (k for k in base if k != "fragmergent.step"):  # a buffer: the step count
        assert torch.equal(state[k], base[k].to(state[k].dtype)), k  # frozen (held in its run's dtype)


@pytest.mark.parametrize("eval_interval", ["0", "5"])
def test_a_kill_while_saving_best_model_loses_nothing(tmp_path, eval_interval):
    """best_model.pt and its metrics row are written before the step's resume point (epoch_N.pt at
    an epoch's end; with eval_interval 5 the first is step 5's, before step_8.pt): killed in between,
    the run resumes before that step and writes them again."""
    run, flags = tmp_path / "run", ["--eval_interval", eval_interval]
    rc, _, err = _run(run, flags, SAB_KILL_IN_REPLACE="best_model.pt")
    assert rc == -signal.SIGKILL, err
    assert not (run / "ck" / "best_model.pt").exists()
    assert not list((run / "ck").glob("epoch_*.pt" if eval_interval == "0" else "step_8.pt"))
    rc, out, err = _run(run, flags)
    assert rc == 0, err
    best = min(r["val_loss"] for r in _metrics(run) if "val_loss" in r)
    assert load_checkpoint(run / "ck" / "best_model.pt")["val_loss"] == best
    assert [r["epoch"] for r in _metrics(run) if "train_loss" in r] == [1, 2]  # one row per epoch, none lost


def test_a_folder_left_by_a_kill_before_the_first_checkpoint_does_not_block_a_new_run(tmp_path):
    """SIGKILL before any save leaves config.yaml, metrics.jsonl and .lock (no cleanup can run):
    harmless, a new run (--resume none) or --resume auto starts fresh there."""
    run = tmp_path / "run"
    for resume in ("none", "auto"):
        rc, _, err = _run(run, ["--max_steps", "3"], SAB_KILL_AT_STEP="2")
        assert rc == -signal.SIGKILL, err
        assert sorted(p.name for p in (run / "ck").iterdir()) == [".lock", "config.yaml", "metrics.jsonl"]
        rc, out, err = _run(run, ["--max_steps", "3", "--resume", resume])
        assert rc == 0 and "resumed" not in err, err
        assert [r["step"] for r in _metrics(run) if "lr" in r] == [1, 2, 3]  # the killed run's rows are gone
        shutil.rmtree(run / "ck")


@pytest.mark.slow
@pytest.mark.parametrize("bucketing", ["0", "64"])
def test_sigkill_resume_with_torch_compile(tmp_path, bucketing):
    """The same with ``train.compile``: the checkpoint holds the plain module's keys, so a compiled
    run resumes (compiled or not). With one batch shape (here: every sample cut to seq_len, no
    bucketing) it ends bitwise identical to an uninterrupted compiled run. With shapes that vary,
    the kernels Inductor generates depend on the shapes a process has seen (its size hints), so a
    resumed process may round differently: the runs then agree to rounding only."""
    extra = ["--compile", "true", "--length_bucket_size", bucketing]
    ref = tmp_path / "ref"
    proc_ref = _start(ref, extra)
    run = tmp_path / "run"
    rc, _, err = _run(run, extra, SAB_KILL_AT_STEP="10")
    assert rc == -signal.SIGKILL, err
    ck = load_checkpoint(run / "ck" / "step_8.pt")
    assert not any(k.startswith("_orig_mod") for k in ck["model_state_dict"])
    rc, _, err = _run(run, extra)
    assert rc == 0, err
    rc, _, err = _finish(proc_ref, timeout=600)
    assert rc == 0, err
    if bucketing == "0":
        _assert_identical_runs(ref, run)
        return
    a, b = load_checkpoint(ref / "ck" / "epoch_2.pt"), load_checkpoint(run / "ck" / "epoch_2.pt")
    assert a["global_step"] == b["global_step"] == STEPS
    torch.testing.assert_close(b["model_state_dict"], a["model_state_dict"], rtol=1e-4, atol=1e-5)
    for (_, va, ta), (_, vb, tb) in zip(_eval_rows(ref), _eval_rows(run), strict=True):
        assert vb == pytest.approx(va, rel=1e-4) and (ta is None) == (tb is None)


# ------------------------------------------------------------------ a different number of processes
def test_the_data_cursor_is_global_so_any_world_size_continues_the_epoch():
    """Samples consumed by W processes up to a saved cursor, then by W' from it: each sample of the
    epoch at most once, all but a last chunk smaller than W' (the pure function behind resuming on
    more or fewer processes)."""
    import numpy as np

    from sab_byon_omni.data.batching import epoch_order, iterate_batches

    class Numbered:  # sample i is the single token i+1 (0 is padding)
        def __len__(self):
            return 53

        def __getitem__(self, i):
            return np.array([i + 1, i + 1])

    ds = Numbered()
    for first, then in ((2, 1), (1, 3), (4, 2)):
        seen, cursor = [], 0
        for rank in range(first):  # life 1: `first` processes, 3 micro-steps each
            batches = iterate_batches(ds, 2, pad_id=0, epoch=1, seed=7, world=first, rank=rank)
            for _ in range(3):
                b = next(batches)
                seen += [int(x) - 1 for x in b.input_ids[:, 0] if x]
                cursor = b.cursor
        for rank in range(then):  # life 2: `then` processes, from the global cursor to the end
            for b in iterate_batches(ds, 2, pad_id=0, epoch=1, seed=7, start=cursor, world=then, rank=rank):
                seen += [int(x) - 1 for x in b.input_ids[:, 0] if x]
        order = epoch_order(53, 1, 7, True).tolist()
        assert len(seen) == len(set(seen)), "a sample was visited twice"
        # every sample once, except a last chunk smaller than the world (no rank may be left empty)
        assert sorted(seen) == sorted(order[:len(seen)]) and len(order) - len(seen) < then, (first, then)


@pytest.mark.slow
def test_resume_on_fewer_then_more_processes_with_torchrun(tmp_path):
    """2 processes (torchrun, gloo) for 3 steps, 1 process for 4, 2 again to the end of the epoch:
    the epoch visits every training sample once (its target-token count matches exactly)."""
    import shutil

    from sab_byon_omni.config import build_config
    from sab_byon_omni.data.factory import load_datasets

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    args = ["-q", "train", "--preset", "tiny", "--epochs", "1", "--num_samples", "60", "--seq_len", "32",
            "--batch_size", "2", "--gradient_accumulation_steps", "2", "--precision", "fp32", "--device", "cpu",
            "--progress", "false", "--log_interval", "1", "--checkpoint_dir", "ck", "--resume", "auto"]
    two = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "sab_byon_omni"]
    one = [sys.executable, "-m", "sab_byon_omni"]
    for launcher, max_steps in ((two, 3), (one, 7), (two, 9)):
        r = subprocess.run([*launcher, *args, "--max_steps", str(max_steps)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        ck = load_checkpoint(tmp_path / "ck" / f"step_{max_steps}.pt")
        assert ck["global_step"] == max_steps
        assert ck["data_state"]["world_size"] == (2 if launcher is two else 1)
    # 54 training samples: 3 steps x 8 + 4 steps x 4 + 2 steps (8, then the last 6) = 54
    assert ck["data_state"]["cursor"] == 54
    cfg = build_config(ck["config"])
    _, train, _ = load_datasets(cfg.data)
    assert ck["data_state"]["epoch_tokens"] == sum(len(train[i]) - 1 for i in range(len(train)))


def test_train_3b_rapid_resumes_exactly(in_tmp):
    """The Python entry point takes the same ``resume`` option: 3 steps, then resume to 6, equals 6."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.training.train_3b import train_3b_rapid

    kw = dict(epochs=1, batch_size=4, grad_accum=1, seq_len=32, num_samples=40, precision="fp32", device="cpu",
              progress=False, deterministic=True, lr_schedule="cosine", warmup_steps=2, learning_rate=1e-3,
              dropout=0.1)
    train_3b_rapid(SABTranscendentV2(preset="tiny"), checkpoint_dir="a", max_steps=3, **kw)
    resumed = train_3b_rapid(SABTranscendentV2(preset="tiny"), checkpoint_dir="a", max_steps=6, resume="auto", **kw)
    straight = train_3b_rapid(SABTranscendentV2(preset="tiny"), checkpoint_dir="b", max_steps=6, **kw)
    assert resumed.global_step == straight.global_step == 6
    a, b = load_checkpoint("a/step_6.pt"), load_checkpoint("b/step_6.pt")
    _assert_same_state(a["model_state_dict"], b["model_state_dict"])
    _assert_same_state(a["optimizer_state_dict"], b["optimizer_state_dict"])
    assert a["data_state"] == b["data_state"]


def test_resume_auto_picks_the_highest_step_even_when_file_times_are_scrambled(in_tmp, capsys):
    """A folder copied to Drive and back (or unzipped) has new file times in any order; --resume
    auto must still continue from the furthest checkpoint, not from the most recently touched one."""
    from sab_byon_omni.cli import main
    from sab_byon_omni.training.checkpointer import Checkpointer

    args = ["-q", "train", "--preset", "tiny", "--num_samples", "40", "--seq_len", "32", "--batch_size", "4",
            "--gradient_accumulation_steps", "1", "--precision", "fp32", "--device", "cpu", "--progress", "false",
            "--log_interval", "1", "--save_every", "2", "--keep_last", "10", "--checkpoint_dir", "ck"]
    assert main([*args, "--epochs", "1"]) == 0  # 9 steps: step_2..8.pt, epoch_1.pt (step 9)
    ck = in_tmp / "ck"
    copied = in_tmp / "copied"
    shutil.copytree(ck, copied)
    t = time.time()
    for i, name in enumerate(["epoch_1.pt", "step_8.pt", "step_6.pt", "step_4.pt", "step_2.pt"]):
        os.utime(copied / name, (t + i, t + i))  # the oldest checkpoint now looks newest
    assert Checkpointer(copied).latest() == copied / "epoch_1.pt"
    assert main([*args, "--checkpoint_dir", "copied", "--epochs", "2", "--max_steps", "12", "--resume", "auto"]) == 0
    rows = [json.loads(line) for line in (copied / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "lr" in r]
    assert steps == list(range(1, 13))  # continued at step 10, nothing redone or dropped
