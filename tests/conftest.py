import os

import pytest
import torch

# CI has 2 cores and pytest-xdist runs 2 workers: one thread per process, subprocesses included
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sab_byon_omni.config import ModelConfig

torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=96)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside an empty temporary directory (the CLI writes relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    os.environ.setdefault("TQDM_DISABLE", "1")
