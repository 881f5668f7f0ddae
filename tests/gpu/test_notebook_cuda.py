"""The Colab notebook's cells on the GPU with its small CI parameters (skipped without nbclient,
which the GPU machine does not have; the CPU suite runs the notebook in tests/test_notebook.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_notebook_runs_on_the_gpu(cuda_only, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    from tests.test_notebook import TINY, execute

    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb, out = execute(tmp_path, **TINY)
    assert "precision bf16" in out or "precision fp16" in out  # a GPU runtime: mixed precision
    assert (tmp_path / "runs" / "ci" / "epoch_1.pt").is_file()
