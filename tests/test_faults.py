"""Injected faults: damaged checkpoints, a full or unwritable disk, non-finite losses and weights,
out-of-memory. Each ends in one ``error:`` line and exit 2 (or documented handling), and no
earlier checkpoint is ever changed."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import math
import os
import shutil
import subprocess
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.errors import SabError
from sab_byon_omni.files import atomic as atomic_io
from sab_byon_omni.files import checkpoint as ckpt_io
from sab_byon_omni.training import checkpointer as checkpointer_mod
from sab_byon_omni.training import trainer as T
from tests.helpers import tiny_run

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

# 36 training samples, 4 per step: 9 optimizer steps.
BASE = ["-q", "train", *tiny_run(learning_rate=1e-3)]


def digest(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file in a directory (metrics.jsonl aside: it is appended to)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "metrics.jsonl"}


def one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with step checkpoints 2, 4, 6, 8, epoch_1.pt and best_model.pt."""
    d = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main([*BASE, "--save_every", "2", "--keep_last", "10", "--checkpoint_dir", "ck"]) == 0
    finally:
        os.chdir(cwd)
    return d / "ck"


@pytest.fixture
def run_dir(trained, in_tmp) -> Path:
    """A private copy of the finished run, to damage."""
    shutil.copytree(trained, in_tmp / "ck")
    return in_tmp / "ck"


# ------------------------------------------------------------------------- damaged checkpoints
def _truncate(p: Path, keep: float) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:int(len(data) * keep)])


def _flip_zip_directory(p: Path) -> None:
    data = bytearray(p.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the zip central directory: where every record is found
    data[at:at + 64] = bytes(64)
    p.write_bytes(bytes(data))


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(5000))


def _text(p: Path) -> None:
    p.write_text("epoch: 3\nthis is not a checkpoint\n")


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _foreign_zip(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")


def _foreign_torch_dict(p: Path) -> None:  # a valid torch file from another project
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {"lr": 1}}, p)


def _foreign_tensor(p: Path) -> None:
    torch.save(torch.zeros(4), p)


def _safetensors_file(p: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(p))


DAMAGE = {"truncated_half": lambda p: _truncate(p, 0.5), "truncated_99pct": lambda p: _truncate(p, 0.99),
          "truncated_to_100_bytes": lambda p: _truncate(p, 100 / p.stat().st_size), "empty": _empty,
          "zip_directory_zeroed": _flip_zip_directory, "random_bytes": _garbage, "text": _text,
          "foreign_zip": _foreign_zip, "foreign_torch_dict": _foreign_torch_dict, "bare_tensor": _foreign_tensor,
          "safetensors": _safetensors_file}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_one_error_line_naming_it(run_dir, damage, capsys):
    bad = run_dir / "step_8.pt"
    DAMAGE[damage](bad)
    before = digest(run_dir)
    # load_checkpoint itself, then every command that reads a checkpoint
    with pytest.raises(SabError, match="step_8.pt"):
        ckpt_io.load_checkpoint(bad)
    calls = [[*BASE, "--checkpoint_dir", "ck", "--resume", str(bad)],
             ["generate", "--checkpoint", str(bad), "--prompt", "x", "--max-new-tokens", "2"],
             ["export", "--checkpoint", str(bad), "--out", "model.safetensors"]]
    for argv in calls:
        assert main(argv) == 2, argv
        one_error_line(capsys.readouterr().err, "step_8.pt")
    assert digest(run_dir) == before  # nothing else was touched, the damaged file included
    assert not Path("model.safetensors").exists()


def test_checkpoint_with_wrong_contents_is_one_error_line(run_dir, capsys):
    """Loads fine, right keys, but the tensors belong to another model / the fields are junk."""
    good = torch.load(run_dir / "step_8.pt", weights_only=True)
    cases = {
        "other_shapes": {**good, "model_state_dict": {k: v[..., :1] if v.dim() else v
                                                      for k, v in good["model_state_dict"].items()}},
        "missing_weights": {**good, "model_state_dict": {}},
        "config_not_a_mapping": {**good, "config": "tiny"},
        "bad_data_state": {**good, "data_state": {"epoch": "one"}},
        "bad_optimizer_state": {**good, "optimizer_state_dict": {"state": {}, "param_groups": []}},
    }
    before = digest(run_dir)
    for name, ck in cases.items():
        path = Path(f"{name}.pt")
        torch.save(ck, path)
        assert main([*BASE, "--checkpoint_dir", "ck", "--resume", str(path)]) == 2, name
        one_error_line(capsys.readouterr().err, str(path))
    assert digest(run_dir) == before


def test_resume_auto_skips_a_damaged_latest_checkpoint_and_leaves_it(run_dir, capsys, caplog):
    """Documented: --resume auto warns about an unreadable newest file and resumes from the newest
    readable one; the damaged file stays where it is for the user to inspect."""
    for p in run_dir.glob("epoch_*.pt"):
        p.unlink()
    (run_dir / "best_model.pt").unlink()
    _truncate(run_dir / "step_8.pt", 0.5)
    damaged = (run_dir / "step_8.pt").read_bytes()
    older = {n: (run_dir / n).read_bytes() for n in ("step_2.pt", "step_4.pt", "step_6.pt")}
    with caplog.at_level("WARNING"):
        assert main([*BASE, "--checkpoint_dir", "ck", "--resume", "auto", "--max_steps", "7",
                     "--save_every", "0", "--keep_last", "10"]) == 0
    assert any("step_8.pt" in r.getMessage() for r in caplog.records)
    assert ckpt_io.load_checkpoint(run_dir / "step_7.pt")["global_step"] == 7  # resumed from step 6
    assert (run_dir / "step_8.pt").read_bytes() == damaged
    assert {n: (run_dir / n).read_bytes() for n in older} == older


def test_resume_none_refuses_to_overwrite_an_existing_run(run_dir, capsys):
    before = digest(run_dir)
    assert main([*BASE, "--checkpoint_dir", "ck"]) == 2
    one_error_line(capsys.readouterr().err, "already holds checkpoints", "--resume auto")
    assert digest(run_dir) == before


# ------------------------------------------------------------------------------- full disk
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["torch.save", "fsync", "replace"])
def test_full_disk_during_a_save_stops_cleanly(in_tmp, monkeypatch, capsys, where):
    """The first save works; the second hits ENOSPC at one stage of the atomic write."""
    real = {"torch.save": torch.save, "fsync": os.fsync, "replace": os.replace}[where]

    def failing(*a, **k):
        if Path("ck/step_3.pt").exists():  # the first checkpoint is complete: fail from here on
            _enospc()
        return real(*a, **k)

    target = {"torch.save": (ckpt_io.torch, "save"), "fsync": (atomic_io.os, "fsync"), "replace": (atomic_io.os, "replace")}
    with monkeypatch.context() as m:
        m.setattr(*target[where], failing)
        assert main([*BASE, "--checkpoint_dir", "ck", "--save_every", "3"]) == 2
    one_error_line(capsys.readouterr().err, "step_6.pt", "disk full", "earlier checkpoints are intact")
    ck = Path("ck")
    assert sorted(p.name for p in ck.iterdir()) == [".lock", "config.yaml", "metrics.jsonl", "step_3.pt"]  # no temp
    assert ckpt_io.load_checkpoint(ck / "step_3.pt")["global_step"] == 3


def test_full_disk_keeps_the_previous_file_at_the_same_path(in_tmp, monkeypatch):
    path = in_tmp / "best_model.pt"
    ckpt_io.save_checkpoint({"v": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt_io.torch, "save", _enospc)
    with pytest.raises(SabError, match="disk full"):
        ckpt_io.save_checkpoint({"v": torch.zeros(3)}, path)
    assert path.read_bytes() == before and os.listdir(in_tmp) == ["best_model.pt"]


def test_interrupt_during_a_save_removes_the_temporary_file(in_tmp, monkeypatch):
    path = in_tmp / "step_1.pt"
    ckpt_io.save_checkpoint({"v": torch.ones(3)}, path)

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_io.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint({"v": torch.zeros(3)}, path)
    assert os.listdir(in_tmp) == ["step_1.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))


def _can_mount_tmpfs() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a tiny tmpfs")


@contextlib.contextmanager
def tiny_tmpfs(size: str):
    """A real filesystem of ``size`` (e.g. ``2m``), mounted for the block and removed after it."""
    mnt = Path(f"/tmp/sab-tmpfs-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        mnt.rmdir()
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        yield mnt
    finally:
        gc.collect()  # tensors mapped from files there (by a failed run's frames) hold the mount busy
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


@needs_tmpfs
def test_really_full_disk_on_a_tiny_tmpfs(in_tmp, capsys):
    """A 2 MiB filesystem: the first checkpoint (~1.3 MB with AdamW state) fits, the second does not."""
    with tiny_tmpfs("2m") as mnt:
        assert main([*BASE, "--checkpoint_dir", str(mnt / "ck"), "--save_every", "3"]) == 2
        line = one_error_line(capsys.readouterr().err, "could not save", "intact")
        assert "step_6.pt" in line or "metrics.jsonl" in line
        names = sorted(p.name for p in (mnt / "ck").iterdir())
        assert "step_3.pt" in names and not [n for n in names if n.endswith(".tmp")], names
        assert ckpt_io.load_checkpoint(mnt / "ck" / "step_3.pt")["global_step"] == 3
        # the disk stays full: resuming must trim metrics.jsonl (rows 4-5 were never saved) and cannot
        with contextlib.suppress(OSError), open(mnt / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        rows = (mnt / "ck" / "metrics.jsonl").read_bytes()
        assert main([*BASE, "--checkpoint_dir", str(mnt / "ck"), "--resume", "auto"]) == 2
        one_error_line(capsys.readouterr().err, "metrics.jsonl", "disk full")
        assert (mnt / "ck" / "metrics.jsonl").read_bytes() == rows
        assert not [p.name for p in (mnt / "ck").iterdir() if p.name.endswith(".tmp")]


@needs_tmpfs
def test_full_disk_for_the_data_cache_and_export_on_a_tiny_tmpfs(in_tmp, run_dir, capsys):
    Path("big.txt").write_text("".join(f"line {i} of a corpus too big for the disk\n" for i in range(40000)))
    with tiny_tmpfs("256k") as mnt:
        assert main([*BASE, "--data", "big.txt", "--cache_dir", str(mnt / "cache"), "--checkpoint_dir", "out"]) == 2
        one_error_line(capsys.readouterr().err, "data cache", "disk full")
        for out in ("m.safetensors", "m.pt", "hf_folder"):
            assert main(["export", "--checkpoint", str(run_dir / "step_8.pt"), "-o", str(mnt / out)]) == 2, out
            one_error_line(capsys.readouterr().err, out, "No space left" if out != "m.pt" else "disk full")
        assert os.listdir(mnt) == []  # nothing half-written
    assert not Path("out").exists()


class _FullDiskFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_outside_the_checkpoint_save(run_dir, monkeypatch, capsys):
    """ENOSPC while trimming metrics.jsonl on resume, while writing the data cache, and from
    safetensors' writer on export: one error line each, and nothing half-written."""
    from safetensors import SafetensorError

    from sab_byon_omni.data import cache

    for p in ("step_6.pt", "step_8.pt", "epoch_1.pt", "best_model.pt"):
        (run_dir / p).unlink()  # resume from step 4: rows 5-9 must go
    before, rows = digest(run_dir), (run_dir / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(atomic_io.os, "fsync", _enospc)
        assert main([*BASE, "--checkpoint_dir", "ck", "--resume", "auto"]) == 2
    one_error_line(capsys.readouterr().err, "metrics.jsonl", "disk full")
    assert digest(run_dir) == before and (run_dir / "metrics.jsonl").read_bytes() == rows
    Path("corpus.txt").write_text("some words to tokenise\n" * 500)
    real_temp = cache.open_temp
    with monkeypatch.context() as m:
        m.setattr(cache, "open_temp", lambda *a, **k: (lambda f, tmp: (_FullDiskFile(f), tmp))(*real_temp(*a, **k)))
        assert main([*BASE, "--data", "corpus.txt", "--checkpoint_dir", "out"]) == 2
    one_error_line(capsys.readouterr().err, "data cache", "disk full")
    assert not Path(".sab_cache").exists() and not Path("out").exists()

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_model", full)
        assert main(["export", "--checkpoint", "ck/step_4.pt", "-o", "m.safetensors"]) == 2
    one_error_line(capsys.readouterr().err, "m.safetensors", "No space left")
    assert sorted(os.listdir(".")) == ["ck", "corpus.txt"]


def test_unwritable_checkpoint_dir_is_one_error_line(in_tmp, capsys):
    Path("blocker").write_text("a file where a directory should be")
    assert main([*BASE, "--checkpoint_dir", "blocker/ck"]) == 2
    one_error_line(capsys.readouterr().err, "blocker/ck")
    assert Path("blocker").read_text() == "a file where a directory should be"


def test_read_only_checkpoint_file_location(in_tmp, monkeypatch):
    """An EACCES/EROFS from the filesystem is named plainly (root ignores chmod, so simulate it)."""
    def denied(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", denied)
    with pytest.raises(SabError, match="cannot write checkpoint directory .*Read-only file system"):
        ckpt_io.save_checkpoint({"v": torch.ones(1)}, in_tmp / "x.pt")


# ------------------------------------------------------------------------ non-finite steps
def _poison(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss and every gradient NaN on the chosen (1-based) optimizer steps."""
    real = T.Trainer.forward_backward

    def accumulate(self, window):
        total, n = real(self, window)
        if self.state.global_step + 1 in bad_steps:
            for p in self.raw.parameters():
                p.grad.mul_(math.nan)
            total = total * math.nan
        return total, n

    monkeypatch.setattr(T.Trainer, "forward_backward", accumulate)


def _rows(ck: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]


def _same_tensors(a: dict, b: dict) -> bool:
    """Equal weights; the fragmergent step counter advances on every step, skipped or not."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "fragmergent.step")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_steps_are_skipped_and_counted(in_tmp, monkeypatch, precision):
    _poison(monkeypatch, {3, 5, 6})
    argv = [*BASE, "--checkpoint_dir", "ck", "--save_every", "1", "--keep_last", "20", "--max_nonfinite_steps", "3",
            "--precision", precision, "--max_steps", "7"]
    assert main(argv) == 0
    ck = Path("ck")
    load = lambda s: ckpt_io.load_checkpoint(ck / f"step_{s}.pt")  # noqa: E731
    for skipped, before in ((3, 2), (5, 4), (6, 4)):  # a skipped step changes neither weights nor AdamW state
        assert _same_tensors(load(skipped)["model_state_dict"], load(before)["model_state_dict"])
        a, b = load(skipped)["optimizer_state_dict"]["state"], load(before)["optimizer_state_dict"]["state"]
        assert a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    assert not _same_tensors(load(4)["model_state_dict"], load(3)["model_state_dict"])  # step 4 did train
    rows = {r["step"]: r for r in _rows(ck) if "lr" in r}
    assert [rows[s]["skipped"] for s in range(1, 8)] == [0, 0, 1, 1, 2, 3, 3]
    assert all(math.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 7))  # poisoned losses stay out of the means
    for s in range(1, 8):
        assert all(torch.isfinite(v).all() for v in load(s)["model_state_dict"].values())


def test_too_many_non_finite_steps_in_a_row_abort_without_saving_them(in_tmp, monkeypatch, capsys):
    _poison(monkeypatch, {3, 4, 5, 6})
    argv = [*BASE, "--checkpoint_dir", "ck", "--save_every", "1", "--keep_last", "20", "--max_nonfinite_steps", "3"]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, "3 optimizer steps in a row had non-finite gradients")
    ck = Path("ck")
    assert sorted(p.name for p in ck.glob("*.pt")) == ["step_1.pt", "step_2.pt", "step_3.pt", "step_4.pt"]
    for p in ck.glob("*.pt"):
        assert all(torch.isfinite(v).all() for v in ckpt_io.load_checkpoint(p)["model_state_dict"].values())


def test_non_finite_weights_are_never_saved(in_tmp, monkeypatch, capsys):
    """A finite gradient can still blow the weights up (e.g. a huge learning rate)."""
    real = T.Trainer.optimizer_step

    def step(self):
        norm = real(self)
        if self.state.global_step + 1 == 3:
            with torch.no_grad():
                next(self.raw.parameters()).view(-1)[0] = math.inf
        return norm

    monkeypatch.setattr(T.Trainer, "optimizer_step", step)
    assert main([*BASE, "--checkpoint_dir", "ck", "--save_every", "1", "--keep_last", "20"]) == 2
    one_error_line(capsys.readouterr().err, "non-finite", "not saving", "step_3.pt")
    ck = Path("ck")
    assert sorted(p.name for p in ck.glob("*.pt")) == ["step_1.pt", "step_2.pt"]
    assert not list(ck.glob(".*.tmp"))


# ------------------------------------------------------------------------------ out of memory
@pytest.mark.parametrize("error", ["cuda", "cpu"])
def test_out_of_memory_suggests_a_smaller_batch_with_more_accumulation(in_tmp, monkeypatch, capsys, error):
    from sab_byon_omni.model.transformer import CausalTransformer
    from sab_byon_omni.training.trainer import Trainer

    real, real_step = CausalTransformer.forward, Trainer.optimizer_step
    steps = {"done": 0}

    def optimizer_step(self, *a, **k):
        steps["done"] += 1
        return real_step(self, *a, **k)

    def forward(self, *a, **k):  # the first pass of step 3 (however the window is cut into passes)
        if steps["done"] == 2:
            if error == "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 21474836480 bytes")
        return real(self, *a, **k)

    monkeypatch.setattr(CausalTransformer, "forward", forward)
    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    argv = [*BASE, "--checkpoint_dir", "ck", "--batch_size", "4", "--gradient_accumulation_steps", "2",
            "--save_every", "1"]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "out of memory", "--batch_size 2", "--gradient_accumulation_steps 4")
    assert "step 3" in line
    assert sorted(p.name for p in Path("ck").glob("*.pt")) == ["step_1.pt", "step_2.pt"]


# --------------------------------------------------------------------------- best_model.pt
def test_best_model_is_replaced_only_by_a_better_finite_one(in_tmp, monkeypatch):
    scripted = iter([2.0, math.nan, 3.0, math.inf, 1.5])
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: next(scripted))
    writes = []
    real = checkpointer_mod.save_checkpoint

    def recording(obj, path):
        writes.append((Path(path).name, obj["epoch"], obj.get("val_loss")))
        return real(obj, path)

    monkeypatch.setattr(checkpointer_mod, "save_checkpoint", recording)
    assert main([*BASE, "--checkpoint_dir", "ck", "--epochs", "5", "--num_samples", "20"]) == 0
    best = [(epoch, v) for name, epoch, v in writes if name == "best_model.pt"]
    assert best == [(1, 2.0), (5, 1.5)]
    ck = ckpt_io.load_checkpoint("ck/best_model.pt")
    assert ck["val_loss"] == 1.5 and ck["epoch"] == 5


def test_a_second_ctrl_c_stops_at_once(in_tmp, monkeypatch, capsys):
    """The first SIGINT asks for a save-and-stop after the step; a second one does not wait."""
    import signal

    real = T.Trainer.optimizer_step

    def step(self):
        norm = real(self)
        if self.state.global_step + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return norm

    monkeypatch.setattr(T.Trainer, "optimizer_step", step)
    assert main([*BASE, "--checkpoint_dir", "ck", "--save_every", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in Path("ck").iterdir()) == [".lock", "config.yaml", "metrics.jsonl", "step_1.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_skipped_step_count_survives_a_resume(in_tmp, monkeypatch):
    argv = [*BASE, "--checkpoint_dir", "ck", "--save_every", "1", "--resume", "auto"]
    with monkeypatch.context() as m:
        _poison(m, {2, 3})
        assert main([*argv, "--max_steps", "3"]) == 0  # stops after two skipped steps in a row
    with monkeypatch.context() as m:
        _poison(m, {4})  # third in a row across the restart: still counted as such
        assert main([*argv, "--max_steps", "6", "--max_nonfinite_steps", "3"]) == 2
    rows = {r["step"]: r["skipped"] for r in _rows(Path("ck")) if "lr" in r}
    assert rows == {1: 0, 2: 1, 3: 2}
    data = ckpt_io.load_checkpoint("ck/step_3.pt")["data_state"]
    assert (data["skipped_steps"], data["skipped_in_a_row"]) == (2, 2)
