"""Property-based fuzzing (hypothesis) of the run folder against planted links (issue 22, F1): at
every name the project writes in a run folder (its lock, metrics.jsonl, config.yaml, step, epoch
and best checkpoints, TensorBoard's tb/, temporaries), a symbolic link to a file or folder outside,
a dangling one, or a hard link to a file outside; then a tiny training (fp32), new or resumed. What
the links point to must be byte for byte unchanged (and nothing new appear there), and the run ends
with exit 0 or with exit 2 and one error line: never a traceback, never a write through a link."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sab_byon_omni.cli import main
from tests.helpers import tiny_run
from tests.hostile import assert_one_error_line

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="symbolic links and O_NOFOLLOW are POSIX")]

N = int(os.environ.get("SAB_FUZZ_EXAMPLES", "60"))
SLOW = settings(max_examples=max(N // 4, 8), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# 36 training samples, 4 per step: 9 steps, a checkpoint every 4 (step_4 pruned by keep_last 1 when
# step_8 is written), epoch_1 and best_model at the epoch's end.
RUN = ["-q", "train", *tiny_run(save_every=4, keep_last=1)]
NAMES = [".lock", "metrics.jsonl", "config.yaml", "step_4.pt", "step_8.pt", "epoch_1.pt", "best_model.pt", "tb",
         ".config.yaml.x1y2z3.tmp", ".step_8.pt.x1y2z3.tmp", ".step_8.dcp.tmp"]
KINDS = ["file", "folder", "dangling", "hardlink"]


def outside_state(d: Path) -> dict[str, bytes | None]:
    """Every entry under ``d``: a file's bytes, None for a folder."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def plant(ck: Path, outside: Path, name: str, kind: str) -> None:
    """A link at ``ck/name`` (whatever was there moved away) to something in ``outside``."""
    at = ck / name
    if at.is_dir() and not at.is_symlink():
        shutil.rmtree(at)
    elif os.path.lexists(at):
        at.unlink()
    if kind == "hardlink":
        os.link(outside / "precious", at)
    else:
        at.symlink_to({"file": outside / "precious", "folder": outside / "dir", "dangling": outside / "nothing"}[kind])


def run_with_links(root: Path, links: list[tuple[str, str]], resume: str, trained: Path | None) -> None:
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "precious").write_bytes(b"someone's precious bytes\n" * 3)
    (outside / "dir" / "notes.txt").write_bytes(b"notes")
    ck = root / "ck"
    if trained is not None:
        shutil.copytree(trained, ck)
    ck.mkdir(exist_ok=True)
    for name, kind in links:
        plant(ck, outside, name, kind)
    before = outside_state(outside)
    report = ["--report_to", "tensorboard"] if any(name == "tb" for name, _ in links) else []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*RUN, "--checkpoint_dir", str(ck), "--resume", resume, *report])
    assert rc in (0, 2), err.getvalue()[-3000:]
    if rc == 2:
        assert_one_error_line(err.getvalue())
    assert "Traceback" not in err.getvalue()
    assert outside_state(outside) == before, (links, err.getvalue()[-2000:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run folder (steps 1-9), copied into each example that resumes one."""
    ck = tmp_path_factory.mktemp("trained") / "ck"
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*RUN, "--checkpoint_dir", str(ck), "--max_steps", "8", "--save_every", "4",
                     "--keep_last", "2"]) == 0
    return ck


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_a_link_at_each_name_the_run_writes_is_never_followed(tmp_path, name, kind):
    if kind == "hardlink" and name == "tb":
        pytest.skip("a folder has no hard links")
    run_with_links(tmp_path, [(name, kind)], "auto", None)


links = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(KINDS)).filter(lambda t: t != ("tb", "hardlink")),
                 min_size=1, max_size=4, unique_by=lambda t: t[0])


@SLOW
@given(links=links, resume=st.sampled_from(["auto", "none"]), existing=st.booleans())
def test_links_planted_in_new_and_resumed_run_folders_are_never_followed(trained, links, resume, existing):
    root = Path(tempfile.mkdtemp())
    try:
        run_with_links(root, links, resume, trained if existing else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)
