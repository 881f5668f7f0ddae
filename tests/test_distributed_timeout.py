"""Collectives' wait limits under torchrun (two gloo processes): long until the first step is done
and around saves, short after it, so that a stuck rank stops the run in the short limit."""

import datetime
import os
import subprocess
import sys
import textwrap

import pytest

from sab_byon_omni.cli import main
from sab_byon_omni.training import distributed as D
from tests.test_distributed import ROOT

pytestmark = pytest.mark.integration

STUCK = textwrap.dedent("""
    # Run by torchrun. Rank 1 is slow before the first step (within the long limit), rank 0 slow in a
    # save (within the long limit again), then rank 1 is stuck (beyond the short limit).
    import os, time
    from sab_byon_omni.config import build_config
    from sab_byon_omni.training import trainer as T
    from sab_byon_omni.training.launch import run_training
    rank = int(os.environ["RANK"])
    step, save = T.Trainer.train_step, T.Trainer.save_checkpoint
    def slow_step(self, window):
        done = self.run.state.global_step
        if rank == 1 and done == 0:
            time.sleep(5)          # first step: compile, data... on one rank
        if rank == 1 and done == 4:
            open("stuck_at", "w").write(str(time.time()))
            time.sleep(12)         # stuck: the others must give up after the short limit
        return step(self, window)
    def slow_save(self, *a, **kw):
        if rank == 0:
            time.sleep(5)          # rank 0 writes a big checkpoint while rank 1 waits
        return save(self, *a, **kw)
    T.Trainer.train_step, T.Trainer.save_checkpoint = slow_step, slow_save
    try:
        run_training(build_config(dict(preset="tiny", num_samples=80, seq_len=32, batch_size=2, epochs=1,
                                       precision="fp32", device="cpu", progress=False, log_interval=1, seed=7,
                                       gradient_accumulation_steps=1, save_every=2, checkpoint_dir="out")))
    except Exception:
        open(f"failed_at_{rank}", "w").write(str(time.time()))
        raise
""")


def test_a_stuck_rank_fails_the_run_within_the_short_limit_not_at_start_or_in_a_save(tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "SAB_DIST_TIMEOUT_S": "30",
           "SAB_DIST_STEP_TIMEOUT_S": "2", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                    os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "stuck.py"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "collectives now wait at most 2 s" in text, text[-3000:]
    # the slow first step and the slow save (5 s each, beyond 2 s) passed: both step checkpoints exist
    assert (tmp_path / "out" / "step_2.pt").exists() and (tmp_path / "out" / "step_4.pt").exists(), text[-3000:]
    assert "Timed out waiting 2000ms" in text, text[-3000:]  # gloo's words: the short limit, not the long one
    # rank 0 gave up within the short limit (and some slack on a busy machine), long before rank 1's 12 s
    waited = float((tmp_path / "failed_at_0").read_text()) - float((tmp_path / "stuck_at").read_text())
    assert waited < 10, text[-3000:]


def test_wait_limits_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(D.START_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(D.STEP_TIMEOUT_ENV, raising=False)
    assert D.wait_limits() == D.WaitLimits(datetime.timedelta(hours=1), datetime.timedelta(minutes=10))
    monkeypatch.setenv(D.START_TIMEOUT_ENV, "120")
    assert D.wait_limits().step == datetime.timedelta(seconds=120)  # never longer than the start's


@pytest.mark.parametrize("value", ["ten", "0", "-5"])
def test_a_bad_wait_limit_is_one_error_line(value, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(D.STEP_TIMEOUT_ENV, value)
    monkeypatch.setenv("WORLD_SIZE", "2")  # init_distributed reads it before joining anything
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "tiny", "--num_samples", "20", "--seq_len", "16", "--device", "cpu",
                 "--epochs", "1", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and f"{D.STEP_TIMEOUT_ENV}=" in err and "must be a number of seconds from 1" in err
