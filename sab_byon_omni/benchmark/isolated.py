"""Peak memory of one model's training step in a fresh process of its own (``bench
--isolated-memory``), so that models timed in one process can still be compared on memory: on a
CPU the peak RSS belongs to the whole process, and the allocator keeps what an earlier model freed.

Each child builds one model (ours, or a peer from ``PEER_STEPS``) with the run's options, runs
``1 + warmup`` steps and reports its peak RSS and the RSS before the model was built.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

from sab_byon_omni.errors import SabError

CHILD = "import sys; from sab_byon_omni.benchmark.isolated_child import child_main; child_main(sys.argv[1])"


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: VmHWM), so import-time transients do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """VmHWM (the peak since :func:`reset_peak_rss`), else the process's ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def isolated_peak_mb(name: str, spec: dict, timeout: float = 1800.0) -> tuple[float, float]:
    """(peak RSS MB, RSS MB before the model was built) of ``name``'s step (``"ours"`` or a peer) in
    a fresh Python process; ``spec``: the ``BenchOptions.for_preset`` keywords of the run."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"name": name, **spec})], capture_output=True,
                         text=True, timeout=timeout, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise SabError(f"--isolated-memory: the process measuring {name} failed: {tail}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak_mb"], result["base_mb"]
