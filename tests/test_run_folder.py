"""The run folder under faults and misuse: pruning never loses the resume point, one run per
folder, metrics.jsonl holds each step once after any stop, a rewind moves newer checkpoints aside,
the resume tokenizer rule, and bad input leaves nothing behind (no cache, no run folder)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import tiny_run
from tests.hostile import assert_one_error_line, flip_tensor_bit, snapshot, start_train

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

# 36 training samples, 4 per step: 9 optimizer steps per epoch.
BASE = ["-q", "train", *tiny_run(learning_rate=None, checkpoint_dir="ck")]


def step_rows(ck: Path = Path("ck")) -> list[int]:
    """The steps of the training rows of metrics.jsonl, in file order."""
    return [r["step"] for r in map(json.loads, (ck / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


def loadable(ck: Path = Path("ck")) -> dict[str, int]:
    """The step and epoch checkpoints that load (best_model.pt aside: a run that validates writes it)."""
    found = {}
    for p in sorted(set(ck.glob("*.pt")) - {ck / "best_model.pt"}):
        try:
            found[p.name] = load_checkpoint(p)["global_step"]
        except Exception:
            pass
    return found


# ------------------------------------------------------------------------------------ pruning
def test_pruning_never_deletes_the_resume_point_nor_a_damaged_file(in_tmp, caplog):
    """The issue's scenario: a valid step_3.pt and a truncated step_99.pt, then keep_last 1."""
    assert main([*BASE, "--save_every", "3", "--max_steps", "3"]) == 0
    data = Path("ck/step_3.pt").read_bytes()
    Path("ck/step_99.pt").write_bytes(data[:len(data) // 2])
    damaged = Path("ck/step_99.pt").read_bytes()
    argv = [*BASE, "--save_every", "1", "--keep_last", "1", "--resume", "auto"]
    with caplog.at_level("WARNING"):
        assert main([*argv, "--max_steps", "6"]) == 0
        assert loadable() == {"step_6.pt": 6}  # the newest valid checkpoint is kept
        assert main([*argv, "--max_steps", "8"]) == 0  # ... and the next run continues from it
    assert loadable() == {"step_8.pt": 8}
    assert Path("ck/step_99.pt").read_bytes() == damaged  # never deleted
    assert step_rows() == list(range(1, 9))  # steps 4..8 continued the run (not restarted from 0)
    warnings = [r for r in caplog.records if "step_99.pt" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # reported once, not at every save


@pytest.mark.parametrize("step", [50, 4])  # past the resume point, or a newer copy of it (found by fuzzing)
def test_a_checkpoint_failing_its_checksum_is_skipped_by_resume_auto_and_never_pruned(in_tmp, caplog, step):
    assert main([*BASE, "--save_every", "2", "--max_steps", "4"]) == 0
    ck = load_checkpoint("ck/step_4.pt")
    flipped = Path("ck/step_50.pt")  # the newest, with one bit of its weights flipped
    save_checkpoint({**ck, "global_step": step}, flipped)
    flip_tensor_bit(flipped, ck["model_state_dict"]["blocks.0.attn.qkv.weight"])
    before = flipped.read_bytes()
    with caplog.at_level("WARNING"):
        assert main([*BASE, "--save_every", "1", "--keep_last", "1", "--resume", "auto", "--max_steps", "6"]) == 0
    assert any("step_50.pt" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    assert loadable()["step_6.pt"] == 6 and flipped.read_bytes() == before
    assert step_rows() == list(range(1, 7))


# -------------------------------------------------------------------------------------- lock
def _wait_for_lock(ck: Path, pid: int, proc) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (ck / ".lock").is_file() and (ck / ".lock").read_text().strip() == str(pid):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the child never took the lock")


def test_one_run_per_folder(in_tmp, capsys):
    argv = [*BASE, "--save_every", "2", "--resume", "auto", "--max_steps", "8"]
    first = start_train(argv, in_tmp, SAB_STEP_SLEEP="0.3")
    _wait_for_lock(in_tmp / "ck", first.pid, first)
    assert main(argv) == 2  # a second run on the same folder, while the first is live
    line = assert_one_error_line(capsys.readouterr().err, "ck", f"pid {first.pid}")
    assert "in use" in line
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert step_rows() == list(range(1, 9))  # the first run was not disturbed: each step once


def test_one_run_per_folder_even_when_its_lock_file_is_deleted(in_tmp, capsys):
    """Deleting .lock under a live run does not let a second run in (the lock is on the folder)."""
    argv = [*BASE, "--save_every", "2", "--resume", "auto", "--max_steps", "8"]
    first = start_train(argv, in_tmp, SAB_STEP_SLEEP="0.3")
    _wait_for_lock(in_tmp / "ck", first.pid, first)
    (in_tmp / "ck" / ".lock").unlink()
    assert main(argv) == 2
    assert "in use" in assert_one_error_line(capsys.readouterr().err, "ck")
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert step_rows() == list(range(1, 9))


@pytest.mark.parametrize("hard", [False, True], ids=["symlink", "hardlink"])
def test_a_link_at_the_lock_is_refused_and_what_it_points_to_untouched(in_tmp, capsys, hard):
    """The finding: `ln -s ~/precious RUN/.lock` and `--resume auto` truncated ~/precious."""
    precious = in_tmp / "precious"
    precious.write_bytes(b"months of notes\n")
    Path("ck").mkdir()
    os.link(precious, "ck/.lock") if hard else Path("ck/.lock").symlink_to(precious)
    assert main([*BASE, "--resume", "auto", "--max_steps", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "ck/.lock", "link")
    assert precious.read_bytes() == b"months of notes\n" and os.listdir("ck") == [".lock"]


def test_a_checkpoint_dir_that_cannot_hold_a_lock_is_one_error_line(in_tmp, capsys):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    assert main([*BASE, "--checkpoint_dir", "/proc/self", "--max_steps", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "/proc/self")


@pytest.mark.parametrize("exists", [False, True], ids=["new folder", "existing folder"])
def test_a_full_disk_while_writing_the_lock_is_one_error_line_and_writes_nothing(in_tmp, capsys, monkeypatch, exists):
    import errno

    if exists:
        Path("ck").mkdir()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = snapshot(in_tmp), sorted(os.listdir(in_tmp))
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        assert main([*BASE, "--max_steps", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "ck/.lock", "disk full")
    assert (snapshot(in_tmp), sorted(os.listdir(in_tmp))) == before
    assert not exists or os.listdir("ck") == []


# ----------------------------------------------------------------------------------- metrics
def test_a_kill_during_the_first_save_leaves_each_step_once_after_a_restart(in_tmp):
    """SIGKILL (no handler runs) while step_1.pt is renamed into place: the restart is a fresh
    start that drops the killed run's rows and temporary file, and finds the folder unlocked."""
    argv = [*BASE, "--save_every", "1", "--resume", "auto", "--max_steps", "4"]
    child = start_train(argv, in_tmp, SAB_KILL_IN_REPLACE="step_1.pt")
    child.communicate(timeout=240)
    assert child.returncode == -signal.SIGKILL
    assert step_rows() == [1] and list(Path("ck").glob(".step_1.pt.*.tmp"))
    assert main(argv) == 0
    assert step_rows() == [1, 2, 3, 4]
    assert not list(Path("ck").glob(".*.tmp"))


def test_an_aborted_run_leaves_no_rows_for_the_next_one(in_tmp, monkeypatch, capsys):
    from sab_byon_omni.model.transformer import CausalTransformer

    real, calls = CausalTransformer.forward, {"n": 0}

    def forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *a, **k)

    Path("ck").mkdir()  # not created by the run: a failed run removes only a folder it created
    with monkeypatch.context() as m:
        m.setattr(CausalTransformer, "forward", forward)
        assert main(BASE) == 2  # steps 1-3 logged, nothing saved
    capsys.readouterr()
    assert step_rows() == [1, 2, 3] and not list(Path("ck").glob("*.pt"))
    assert main([*BASE, "--max_steps", "5"]) == 0  # a new run in the folder
    assert step_rows() == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------ rewind
def test_resuming_an_older_checkpoint_moves_newer_ones_aside(in_tmp, caplog):
    assert main([*BASE, "--save_every", "2", "--keep_last", "10", "--max_steps", "6"]) == 0
    newer = {n: Path("ck", n).read_bytes() for n in ("step_4.pt", "step_6.pt")}
    with caplog.at_level("WARNING"):
        assert main([*BASE, "--save_every", "2", "--keep_last", "10", "--resume", "ck/step_2.pt",
                     "--max_steps", "3"]) == 0
    aside = list(Path("ck").glob("rewound-*"))
    assert len(aside) == 1 and any(aside[0].name in r.getMessage() for r in caplog.records)
    assert {n: (aside[0] / n).read_bytes() for n in newer} == newer  # moved, byte for byte
    assert step_rows(aside[0]) == [1, 2, 3, 4, 5, 6]  # the abandoned branch's metrics, kept with it
    assert sorted(loadable()) == ["step_2.pt", "step_3.pt"] and step_rows() == [1, 2, 3]
    assert main([*BASE, "--resume", "auto", "--max_steps", "5"]) == 0  # continues the new branch
    assert step_rows() == [1, 2, 3, 4, 5] and load_checkpoint("ck/step_5.pt")["global_step"] == 5


# ------------------------------------------------------------------------------ tokenizer rule
def test_resume_adopts_the_checkpoints_tokenizer_unless_the_command_names_another(in_tmp, capsys):
    short = ["--max_steps", "2", "--save_every", "2"]
    assert main([*BASE, "--checkpoint_dir", "bytes", "--tokenizer", "byte", *short]) == 0
    # nothing asked for: the run's own config.yaml supplies the tokenizer (and the rest it does not give)
    assert main([*BASE, "--checkpoint_dir", "bytes", "--resume", "auto", "--max_steps", "3"]) == 0
    assert load_checkpoint("bytes/step_3.pt")["tokenizer"]["name"] == "byte"
    assert "tokenizer: byte" in Path("bytes/config.yaml").read_text()
    assert main([*BASE, *short]) == 0  # a char96 run; resuming it as byte is refused, nothing written
    capsys.readouterr()
    before = snapshot(Path("ck"))
    assert main([*BASE, "--tokenizer", "byte", "--resume", "auto", "--max_steps", "4"]) == 2
    assert_one_error_line(capsys.readouterr().err, "ck/step_2.pt", "byte", "--config ck/config.yaml")
    assert snapshot(Path("ck")) == before
    assert main([*BASE, "--config", "ck/config.yaml", "--max_steps", "3"]) == 0  # the run's own config continues it


# ------------------------------------------------------------------------ nothing written
def _corpus(d: Path, text: str) -> Path:
    d.mkdir()
    (d / "a.txt").write_text(text)
    (d / "b.txt").write_text(text)
    return d


@pytest.mark.parametrize("case", ["corpus shorter than seq_len", "missing tokenizer file", "binary tokenizer file",
                                  "tokenizer file of another kind", "missing tensorboard"])
def test_bad_input_leaves_no_cache_and_no_run_folder(in_tmp, capsys, monkeypatch, case):
    words = _corpus(in_tmp / "words", "alpha beta gamma delta\n" * 40)
    Path("binary.json").write_bytes(bytes(range(256)) * 4)
    Path("other.json").write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}')
    extra = {"corpus shorter than seq_len": ["--data", str(_corpus(in_tmp / "short", "tiny\n"))],
             "missing tokenizer file": ["--data", str(words), "--tokenizer", "bpe", "--tokenizer_path", "nope.json"],
             "binary tokenizer file": ["--data", str(words), "--tokenizer", "bpe", "--tokenizer_path", "binary.json"],
             "tokenizer file of another kind": ["--data", str(words), "--tokenizer", "bpe",
                                                "--tokenizer_path", "other.json"],
             "missing tensorboard": ["--tensorboard", "true"]}[case]
    if case == "missing tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    before = sorted(os.listdir(in_tmp))
    assert main([*BASE, *extra]) == 2
    assert_one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(in_tmp)) == before  # no .sab_cache, no ck


@pytest.mark.parametrize("case", ["missing file", "another model"])
def test_a_refused_resume_leaves_no_folder_it_created(in_tmp, capsys, case):
    """`train --checkpoint_dir new/deep/ck --resume PATH` refused: neither ck nor the parents it
    would have created are left (a missing file before anything is read; a checkpoint of another
    architecture after the folder was locked)."""
    if case == "another model":
        assert main([*BASE, "--save_every", "2", "--max_steps", "2"]) == 0
    source = {"missing file": "nope.pt", "another model": "ck/step_2.pt"}[case]
    before = snapshot(in_tmp), sorted(os.listdir(in_tmp))
    argv = [*BASE, "--checkpoint_dir", "new/deep/ck", "--resume", source, "--max_steps", "4"]
    assert main([*argv, *(["--n_layers", "3"] if case == "another model" else [])]) == 2
    assert_one_error_line(capsys.readouterr().err, source)
    assert (snapshot(in_tmp), sorted(os.listdir(in_tmp))) == before  # no new/, nothing else changed


def test_a_parent_that_held_something_stays_after_a_refused_resume(in_tmp, capsys):
    Path("new").mkdir()
    Path("new/notes.txt").write_text("mine")
    assert main([*BASE, "--checkpoint_dir", "new/deep/ck", "--resume", "nope.pt"]) == 2
    capsys.readouterr()
    assert sorted(os.listdir("new")) == ["notes.txt"]


def test_resuming_on_other_data_is_refused_naming_both(in_tmp, capsys):
    """The run's data cursor counts its own corpus: other --data is one line naming both, before the
    corpus is read; the same folder by another spelling resumes; --init_from trains on new data."""
    words, other = _corpus(in_tmp / "words", "alpha beta gamma delta\n" * 40), _corpus(in_tmp / "other", "x y z\n" * 99)
    flags = [*BASE, "--data", str(words), "--save_every", "2"]
    assert main([*flags, "--max_steps", "2"]) == 0
    before = snapshot(Path("ck")), sorted(os.listdir(in_tmp))
    refused = [*BASE, "--data", str(other), "--resume", "auto", "--max_steps", "4"]
    assert main(refused) == 2
    line = assert_one_error_line(capsys.readouterr().err, str(words), str(other), "--init_from")
    assert "step_2.pt" in line
    assert (snapshot(Path("ck")), sorted(os.listdir(in_tmp))) == before  # no cache built for the other corpus
    assert main([*BASE, "--data", "./words/", "--resume", "auto", "--max_steps", "3"]) == 0  # the same folder
    assert load_checkpoint("ck/step_3.pt")["global_step"] == 3
    weights_bring_the_model = ["-q", "train", *tiny_run(learning_rate=None, checkpoint_dir="new", preset=None)]
    assert main([*weights_bring_the_model, "--data", str(other), "--init_from", "ck/step_3.pt", "--max_steps", "1"]) == 0
