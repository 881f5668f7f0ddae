"""The GPU tests (``pytest -m gpu``, run by ``benchmarks/gpu_check.sh``): skipped without CUDA.

Under the check's dry run (``SAB_GPU_CHECK_DRY_RUN=1``, what CI runs) they run on the CPU with
tiny sizes where that means something, so their own code cannot rot unnoticed; the few that only
mean something on a GPU (memory against the CUDA allocator, compile, the notebook) skip there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.training.trainer import Trainer
from tests.helpers import trainer_for

DRY_RUN = os.environ.get("SAB_GPU_CHECK_DRY_RUN") == "1"


@dataclass(frozen=True)
class Sizes:
    """A small model on a GPU; a tiny one on the CPU of the dry run."""

    preset: str
    seq_len: int
    batch_size: int
    num_samples: int


@pytest.fixture
def dev() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if DRY_RUN:
        return torch.device("cpu")
    pytest.skip("needs CUDA (or SAB_GPU_CHECK_DRY_RUN=1 for the CPU variant)")


@pytest.fixture
def cuda_only(dev: torch.device) -> torch.device:
    if dev.type != "cuda":
        pytest.skip("only meaningful on a GPU")
    return dev


@pytest.fixture
def sizes(dev: torch.device) -> Sizes:
    return Sizes("small", 256, 8, 600) if dev.type == "cuda" else Sizes("tiny", 64, 4, 120)


@pytest.fixture(autouse=True)
def _all_cpu_threads_for_building_models():
    """The suite's conftest pins one thread (CI); a GPU machine builds 1B-parameter models faster with all."""
    old = torch.get_num_threads()
    if torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(old)


def make_trainer(folder: Path, dev: torch.device, sizes: Sizes, precision: str, **train) -> Trainer:
    """A set-up Trainer on the synthetic data (seed 7), writing into ``folder``."""
    cfg = build_config({"preset": sizes.preset, "num_samples": sizes.num_samples, "seq_len": sizes.seq_len,
                        "batch_size": sizes.batch_size, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                        "precision": precision, "device": dev.type, "progress": False, "seed": 7,
                        "checkpoint_dir": str(folder), **train})
    return trainer_for(cfg)


def with_scaler(trainer: Trainer, scaler: torch.amp.GradScaler) -> Trainer:
    """The same run with another GradScaler (e.g. an initial scale that cannot overflow at once)."""
    return Trainer(dataclasses.replace(trainer.run, scaler=scaler))


def train_losses(trainer: Trainer, steps: int) -> list[float]:
    """Mean loss per token of each of ``steps`` optimizer steps on the first micro-batches of epoch 1."""
    batches, out = trainer.epoch_batches(0), []
    for _ in range(steps):
        loss_sum, tokens = trainer.forward_backward([next(batches)])
        trainer.optimizer_step()
        out.append(float(loss_sum) / tokens)
    return out
