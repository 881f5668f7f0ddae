"""A missing name that looks like a local file gets no Hub download hint (files/paths.py)."""

from __future__ import annotations

import pytest

from sab_byon_omni.cli import main
from sab_byon_omni.files.paths import looks_local


@pytest.mark.parametrize("text, local", [
    ("runs/nope.pt", True), ("x/model.safetensors", True), ("a/b.GGUF", True), ("./user/name", True),
    ("/abs/name", True), ("~/name", True), ("runs/nope", True), ("HuggingFaceTB/SmolLM2-135M", False),
    ("user/name", False),
])
def test_what_looks_local(in_tmp, text, local):
    (in_tmp / "runs").mkdir()
    assert looks_local(text) is local


@pytest.mark.parametrize("source", ["runs/nope.pt", "runs/nope"])
def test_a_missing_local_checkpoint_gets_no_download_hint(in_tmp, capsys, source):
    (in_tmp / "runs").mkdir()
    assert main(["generate", "--checkpoint", source, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint not found: {source}" in err and "hf download" not in err, err


def test_a_hub_id_missing_from_the_cache_keeps_its_hint(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(in_tmp / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--checkpoint", "nobody/absent-model", "--prompt", "hi"]) == 2
    assert "hf download nobody/absent-model" in capsys.readouterr().err
