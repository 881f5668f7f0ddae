"""Multi-node, exercised on one machine: two torchrun launchers are two "nodes" (one process each)
that meet through the c10d rendezvous, as on a cluster (docs/DISTRIBUTED.md, "Several machines").
They train to the same weights as one process with the same global batch; and when a worker is
killed (SIGKILL) under --max-restarts 1, the restarted job resumes from the last checkpoint
(--resume auto) and ends with the same weights as the uninterrupted run. Slow: each launch starts
two agents and two workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sab_byon_omni.files.checkpoint import load_checkpoint
from tests.test_distributed import ATOL, RUN, assert_same_weights, flags, single, weights  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_workers_of(run_id: str) -> None:
    """SIGKILL what is left of a failed launch: torchrun starts each worker in a session of its
    own, so they are found by the rendezvous id in their environment (unique to the launch)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"TORCHELASTIC_RUN_ID={run_id}".encode() in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass


def two_nodes(args: list[str], cwd: Path, max_restarts: int = 0, timeout: int = 300, **env_vars: str) -> list[str]:
    """Run ``args`` (a script or ``-m module`` and its arguments) on two torchrun "nodes" of one
    process each; returns the two launchers' logs. Node 0 hosts the rendezvous store."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", **env_vars)
    port, procs = free_port(), []
    run_id = f"sab-test-{os.getpid()}-{port}"
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
                   "--rdzv_id", run_id, "--rdzv_conf", f"is_host={int(node == 0)}",
                   "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", *args]
            with open(cwd / f"node{node}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        _end_workers_of(run_id)
    logs = [(cwd / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], [log[-4000:] for log in logs]
    return logs


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """One uninterrupted training on two nodes: the CLI, world size 2, 2 samples per micro-batch each."""
    d = tmp_path_factory.mktemp("nodes")
    two_nodes(["-m", "sab_byon_omni.cli", "train", *flags(**RUN, batch_size=2, checkpoint_dir="run")], d)
    return d / "run"


def test_two_nodes_match_one_process_with_the_same_global_batch(nodes, single):  # noqa: F811 (the fixture)
    ck = load_checkpoint(nodes / "epoch_1.pt")
    assert ck["data_state"]["world_size"] == 2 and ck["global_step"] == 5
    assert_same_weights(weights(nodes / "epoch_1.pt"), weights(single / "full" / "epoch_1.pt"), atol=ATOL)


# Run by torchrun in place of the CLI: on the first attempt only, the worker of rank 1 kills itself
# with SIGKILL (no cleanup, as the OOM killer would) once step 3's checkpoint is on disk. Rank 0
# cannot finish step 4 without it, so step_3 is the last checkpoint of the first attempt.
KILL_ONE_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from sab_byon_omni.training.checkpointer import Checkpointer

    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
        save = Checkpointer.save

        def save_then_die(self, name, *args, **kw):
            path = save(self, name, *args, **kw)
            if name == "step_3":
                while not self.path(name).exists():  # written by rank 0
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        Checkpointer.save = save_then_die
    from sab_byon_omni.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_worker_is_restarted_and_the_job_resumes_from_the_last_checkpoint(nodes, tmp_path):
    (tmp_path / "kill_one_worker.py").write_text(KILL_ONE_WORKER)
    run = flags(**RUN, batch_size=2, checkpoint_dir="run", save_every=1, keep_last=10, resume="auto")
    # torch shares the rendezvous store with the workers by default, and each node counts its own
    # restarts: after one node restarts, the workers read each other's stale addresses from the
    # store (pytorch issue 135712). A store per rendezvous round avoids it.
    logs = two_nodes(["kill_one_worker.py", "train", *run], tmp_path, max_restarts=1,
                     TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    both = "\n".join(logs)
    assert "-9" in both or "SIGKILL" in both, logs[1][-3000:]  # the agent saw its worker die
    assert "resumed from run/step_3.pt: epoch 1, step 3" in both, both[-4000:]
    assert both.count("resumed from") == 1  # only the restarted attempt resumed
    assert_same_weights(weights(tmp_path / "run" / "epoch_1.pt"), weights(nodes / "epoch_1.pt"), atol=1e-6)
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert len(rows) == 5  # each step once: rows of the first attempt past step 3 were dropped
