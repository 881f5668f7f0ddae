"""The wheel works on its own: .ci/wheel (what CI runs) builds the sdist and the wheel, checks them
with twine, installs the wheel alone into a fresh venv and, outside the repository, trains from a
shipped config given by name and samples from the result. Slow (minutes: a venv with torch)."""

from __future__ import annotations

import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from sab_byon_omni import __version__
from sab_byon_omni.cli import main

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"sab-omni {__version__}"


@pytest.mark.slow
def test_the_wheel_installed_alone_trains_and_generates_outside_the_repository(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("twine")
    env = {**os.environ, "WORK": str(tmp_path), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run(["bash", str(ROOT / ".ci" / "wheel")], env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    lines = out.stdout.splitlines()
    assert f"sab-omni {__version__}" in lines
    venv_configs = f"{tmp_path}/venv/lib/"
    assert any(line.startswith("config lightweight: " + venv_configs) for line in lines), lines
    assert (tmp_path / "outside" / "run" / "best_model.pt").is_file()
    assert lines[-1].startswith("wheel: ok")

    (wheel,) = (tmp_path / "dist").glob(f"sab_byon_omni-{__version__}-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {f"sab_byon_omni/configs/{n}" for n in shipped} <= names  # every config, inside the package
    assert not any(n.startswith(("tests/", "configs/")) for n in names)
    (sdist,) = (tmp_path / "dist").glob(f"sab_byon_omni-{__version__}.tar.gz")
    with tarfile.open(sdist) as tar:  # the sdist keeps the repository's layout: configs/ at its root
        assert {f"sab_byon_omni-{__version__}/configs/{n}" for n in shipped} <= set(tar.getnames())
