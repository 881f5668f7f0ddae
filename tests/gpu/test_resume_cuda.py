"""SIGKILL mid-epoch on a GPU, then ``--resume auto``: bitwise the uninterrupted run, with
``deterministic: true`` (cuBLAS workspace, deterministic attention backward) and dropout on, so
each device's CUDA random state must come back too."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sab_byon_omni.files.checkpoint import load_checkpoint
from tests.test_resume import CHILD, _assert_same_state, _env

pytestmark = pytest.mark.gpu


def _args(dev: torch.device, sizes) -> list[str]:
    precision = "bf16" if dev.type == "cpu" or torch.cuda.get_device_capability(dev) >= (8, 0) else "fp16"
    return ["train", "--preset", sizes.preset, "--epochs", "1", "--num_samples", "100", "--seq_len",
            str(sizes.seq_len), "--batch_size", "4", "--gradient_accumulation_steps", "2", "--precision", precision,
            "--device", dev.type, "--deterministic", "true", "--dropout", "0.1", "--lr_schedule", "cosine",
            "--learning_rate", "3e-3", "--save_every", "3", "--log_interval", "1", "--progress", "false",
            "--checkpoint_dir", "ck", "--resume", "auto"]


def _run(folder, args, **env) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "child.py").write_text(CHILD)
    return subprocess.run([sys.executable, "child.py", *args], cwd=folder, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_auto_is_bitwise_identical(dev, sizes, tmp_path):
    args = _args(dev, sizes)
    ref = _run(tmp_path / "ref", args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _run(tmp_path / "run", args, SAB_KILL_AT_STEP="5")  # after step_3.pt; steps 4-5 are lost
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "run" / "ck" / "step_3.pt").is_file()
    resumed = _run(tmp_path / "run", args)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr + resumed.stdout, resumed.stderr[-3000:]
    a, b = (load_checkpoint(p / "ck" / "epoch_1.pt") for p in (tmp_path / "ref", tmp_path / "run"))
    assert a["global_step"] == b["global_step"] == 12  # 90 training samples, 8 per optimizer step
    _assert_same_state(a["model_state_dict"], b["model_state_dict"])  # bitwise
    _assert_same_state(a["optimizer_state_dict"], b["optimizer_state_dict"])
    assert a["history"] == b["history"]
    if dev.type == "cuda":
        assert "cuda_device" in a["rng_state"]  # this device's generator travels with the checkpoint
