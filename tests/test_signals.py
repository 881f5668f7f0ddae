"""Ctrl-C and SIGTERM on a real ``sab-omni train`` process, sent at random moments: the first
signal is answered at once on its own line and stops at a point where a resume is exact; a
second one stops at once. Either way the exit status is 130, every checkpoint on disk is complete
(it loads and its checksum holds), and ``--resume auto`` then finishes the run."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from sab_byon_omni.files.checkpoint import load_checkpoint
from sab_byon_omni.training.signals import EXIT_STOPPED, StopRequest
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
    at = random.Random(seed).uniform(0.05, 0.8)  # the run trains for about 1.7 s after its first step line
    stopped = _train(tmp_path, [at])
    if stopped.returncode == 0:  # the run finished before the signal came: nothing to check
        pytest.skip("the run ended before the signal")
    assert stopped.returncode == 130, stopped.stderr
    notice = [line for line in stopped.stderr.splitlines() if "SIGINT: stopping" in line]
    if not notice and stopped.stderr.rstrip().splitlines()[-1].startswith("interrupted"):  # (a loaded machine's setup)
        pytest.skip("the signal came before the first step: interrupted, nothing to resume")
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
    first = rng.uniform(0.05, 1.2)  # the run trains for about 1.7 s after its first step line
    stopped = _train(tmp_path, [first, first + rng.uniform(0.0, 0.3)])
    if stopped.returncode == 0:
        pytest.skip("the run ended before the signals")
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    _complete(tmp_path / "ck")
    resumed = _train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _complete(tmp_path / "ck")[-1] == 12


# The second step's forward ends in one torch call that runs for minutes (125 4096^2 matmuls inside
# C++ code, one thread): Python's own signal handlers cannot run until it returns.
LONG_STEP = textwrap.dedent("""
    import os, sys, torch
    from sab_byon_omni.training import trainer as T

    real, calls = T.model_loss, []

    def loss(model, ids, labels):
        calls.append(1)
        if len(calls) == int(os.environ.get("LONG_CALL", "2")):  # step 2: step_1.pt is on disk
            print("long operation", file=sys.stderr, flush=True)
            torch.matrix_power(torch.eye(4096), 2**63 - 1)
        return real(model, ids, labels)

    T.model_loss = loss
    from sab_byon_omni.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def _two_signals_in_a_long_operation(cwd: Path, name: str, checkpoint_dir: str, long_call: int) -> tuple[int, str]:
    """Train with a long torch call in step ``long_call``'s loss; send ``name`` twice inside it:
    (exit status, stderr)."""
    script = cwd / "child.py"
    script.write_text(LONG_STEP)
    args = tiny_run(save_every=1, max_steps=5, checkpoint_dir=checkpoint_dir)
    proc = subprocess.Popen([sys.executable, str(script), "train", *args], cwd=cwd,
                            env={**_env(), "LONG_CALL": str(long_call)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for(lines, seen, "long operation", timeout=300)
        time.sleep(0.5)  # inside torch.matrix_power now
        proc.send_signal(getattr(signal, name))
        _wait_for(lines, seen, f"{name}: stopping", timeout=60)  # said while the operation runs
        proc.send_signal(getattr(signal, name))
        rc = proc.wait(timeout=60)  # the operation alone would take minutes
    finally:
        proc.kill()
        proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    return rc, "".join(seen)


def _wait_for(lines: queue.Queue, seen: list[str], text: str, timeout: float) -> None:
    """Read stderr lines until one holds ``text`` (generous timeout: it only guards a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        assert line is not None, "".join(seen)  # the process ended first
        seen.append(line)
        if text in line:
            return


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_second_signal_ends_the_process_inside_a_long_torch_operation(tmp_path, name):
    """The first signal is answered while torch is busy in C++ code; the second ends the process at
    once (status 130), without waiting for the operation; the checkpoint already written loads."""
    rc, err = _two_signals_in_a_long_operation(tmp_path, name, "ck", long_call=2)
    assert rc == 130, err
    assert f"{name} again: stopped at once without saving" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pt")) == ["step_1.pt"]
    assert load_checkpoint(tmp_path / "ck" / "step_1.pt", verify_tensors=True)["global_step"] == 1


def test_a_second_signal_before_the_first_checkpoint_removes_the_new_run_folder(tmp_path):
    """As a run that fails before its first checkpoint: the folder it created (and the parent it
    created) goes, since it holds nothing but config.yaml, metrics.jsonl and .lock; a folder that
    was there before stays, with what it held."""
    rc, err = _two_signals_in_a_long_operation(tmp_path, "SIGINT", "new/ck", long_call=1)
    assert rc == 130 and "SIGINT again: stopped at once" in err, err
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    rc, err = _two_signals_in_a_long_operation(tmp_path, "SIGINT", "old", long_call=1)
    assert rc == 130, err
    assert (tmp_path / "old" / "notes.txt").read_text() == "mine" and (tmp_path / "old" / "config.yaml").is_file()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="handlers need the main thread")
def test_a_stop_request_restores_the_handlers_and_the_wakeup_fd():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest(str):
        assert all(signal.getsignal(sig) != handler for sig, handler in before.items())
        ours = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(ours)
        assert ours != -1  # the watchdog's pipe
        assert any(t.name == "sab-stop-watchdog" for t in threading.enumerate())
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # what it was before
    assert not any(t.name == "sab-stop-watchdog" for t in threading.enumerate())


SLOW_CLEANUP = textwrap.dedent("""
    import os, signal, time
    from sab_byon_omni.training.signals import StopRequest

    with StopRequest(lambda s: "first signal"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
        except KeyboardInterrupt:  # Python saw it at once; a cleanup in Python then takes too long
            start = time.monotonic()
            while time.monotonic() - start < 20:
                pass
    print("not reached")
""")


def test_a_second_signal_blames_torch_only_when_python_could_not_run(tmp_path):
    """The message always said '(torch was inside one long operation)', even when torch was not."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_CLEANUP)
    done = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_STOPPED and "not reached" not in done.stdout, done.stderr
    assert "SIGINT again: stopped at once without saving (the interrupted run had not finished stopping" in done.stderr
    assert "torch was inside" not in done.stderr
