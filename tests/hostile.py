"""Hostile inputs for the security, fault and fuzz tests: a pickled payload that leaves a marker
file when it runs, and the files an attacker (or a damaged disk) could hand to the package —
checkpoints, sharded DCP folders, safetensors files — plus a way to run a command in a child
process with its memory and time bounded."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import torch

ONE_LINE_CHILD = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))\n"
    "from sab_byon_omni.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class Payload:
    """Unpickling this runs ``exec``: it writes a marker file. A stand-in for any attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


# ------------------------------------------------------------------------------ sharded (DCP)
def tiny_model_and_optimizer():
    """The tiny model and an AdamW laid out as the trainer's (decay / no-decay groups), one step in."""
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.model.transformer import CausalTransformer

    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96))
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(torch.randint(0, 96, (1, 8))).float().mean().backward()  # AdamW state exists after a step
    opt.step()
    return model, opt


def tiny_config(**changes) -> dict:
    from sab_byon_omni.config import build_config

    return build_config({"preset": "tiny", "vocab_size": 96, "seq_len": 32, **changes}).to_dict()


def write_dcp(path: Path, global_step: int = 5, optimizer_extra: dict | None = None) -> Path:
    """A valid sharded checkpoint of the tiny model (written in one process, laid out as FSDP's):
    DCP's ``.metadata`` and ``__0_0.distcp``, plus ``meta.pt``. ``optimizer_extra`` goes into the
    first param group (a byte entry of the shard: how a payload would travel there)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = tiny_model_and_optimizer()
    msd, osd = get_state_dict(model, opt)
    osd["param_groups"][0].update(optimizer_extra or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path))
    torch.save({"epoch": 0, "global_step": global_step, "config": tiny_config(), "model_state_dict": {},
                "tokenizer": {"name": "char96"}, "sharded": True}, path / "meta.pt")
    return path


def plant_metadata_payload(dcp_dir: Path, marker: Path, inside: bool = True) -> None:
    """Replace ``.metadata`` by a pickle that runs the payload: inside real DCP Metadata (one of
    its fields), or alone."""
    meta_path = dcp_dir / ".metadata"
    if inside:
        with open(meta_path, "rb") as f:
            metadata = pickle.load(f)  # our own file, just written
        metadata.planner_data = Payload(marker)
        meta_path.write_bytes(pickle.dumps(metadata))
    else:
        meta_path.write_bytes(pickle.dumps(Payload(marker)))


def unsafe_dcp_load(dcp_dir: Path) -> None:
    """What torch's own reader does with a folder (the control: it runs a planted payload)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = tiny_model_and_optimizer()
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(dcp_dir))
        except Exception:
            pass  # the payload has run by then (or not): the caller checks the marker


# ------------------------------------------------------------------------------ processes
def run_bounded(argv: list[str], cwd: Path, memory_mb: int = 3000, timeout: float = 60) -> subprocess.CompletedProcess:
    """``sab-omni ARGV`` in a child whose address space is capped at ``memory_mb`` and whose run is
    cut at ``timeout`` seconds (a hang or a memory bomb fails the test instead of the machine)."""
    mem = memory_mb << 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", ONE_LINE_CHILD.format(mem=mem), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``d`` (to show nothing was changed or lost)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


__all__ = ["Payload", "write_dcp", "plant_metadata_payload", "unsafe_dcp_load", "run_bounded",
           "assert_one_error_line", "snapshot", "torch_bytes", "resource"]
