"""Ctrl-C and SIGTERM on a real ``sab-omni train`` process, sent at random moments: the first
signal is answered at once on its own line and stops at a point where a resume is exact; a
second one stops at once. Either way the exit status is 130, every checkpoint on disk is complete
(it loads and its checksum holds), and ``--resume auto`` then finishes the run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sab_byon_omni.io.checkpoint import load_checkpoint
from tests.helpers import tiny_run

pytestmark = pytest.mark.integration

# 180 training samples, 4 x 4 per step: 12 steps per epoch; a checkpoint every step, so a signal
# often arrives during a save.
ARGS = ["-m", "sab_byon_omni", "train", *tiny_run(num_samples=200, seq_len=48, gradient_accumulation_steps=4,
                                                  deterministic="true", dropout=0.1, save_every=1, keep_last=3,
                                                  checkpoint_dir="ck", resume="auto")]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}


def _train(cwd: Path, signals: list[float] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; send SIGINT at each of ``signals`` (seconds after the first step's line)."""
    proc = subprocess.Popen([sys.executable, *ARGS], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err_lines = []
    if signals:
        for line in proc.stderr:  # wait until training runs
            err_lines.append(line)
            if line.startswith("step "):
                break
        start = time.monotonic()
        for at in signals:
            time.sleep(max(0.0, start + at - time.monotonic()))
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(err_lines) + err)


def _complete(ck: Path) -> list[int]:
    """Every checkpoint loads and matches its checksum; no temporary file is left. Their steps."""
    assert not [p.name for p in ck.iterdir() if p.name.endswith(".tmp")]
    return sorted(load_checkpoint(p)["global_step"] for p in ck.glob("*.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    done = _train(d)
    assert done.returncode == 0, done.stderr
    return load_checkpoint(d / "ck" / "epoch_1.pt")["model_state_dict"]


@pytest.mark.parametrize("seed", [1, 2])
def test_one_ctrl_c_saves_and_a_resume_ends_bitwise_equal(tmp_path, reference, seed):
    at = random.Random(seed).uniform(0.05, 1.5)
    stopped = _train(tmp_path, [at])
    if stopped.returncode == 0:  # the run finished before the signal came: nothing to check
        pytest.skip("the run ended before the signal")
    assert stopped.returncode == 130, stopped.stderr
    notice = [line for line in stopped.stderr.splitlines() if "SIGINT: stopping" in line]
    assert notice and notice[0].startswith("SIGINT: stopping after this micro-batch"), stopped.stderr
    assert "press Ctrl-C again to stop at once without saving" in notice[0]
    assert "stopped at step" in stopped.stdout and "Traceback" not in stopped.stderr
    steps = _complete(tmp_path / "ck")
    assert steps, "the stop saved no checkpoint"
    resumed = _train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = load_checkpoint(tmp_path / "ck" / "epoch_1.pt")["model_state_dict"]
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


@pytest.mark.parametrize("seed", [4, 5])
def test_two_ctrl_c_stop_at_once_and_never_damage_a_checkpoint(tmp_path, seed):
    rng = random.Random(seed)
    first = rng.uniform(0.05, 1.5)
    stopped = _train(tmp_path, [first, first + rng.uniform(0.0, 0.3)])
    if stopped.returncode == 0:
        pytest.skip("the run ended before the signals")
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    _complete(tmp_path / "ck")
    resumed = _train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _complete(tmp_path / "ck")[-1] == 12
