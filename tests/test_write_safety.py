"""No write follows a link out of its folder or changes a file the project did not create, and one
lock per folder that deleting its ``.lock`` does not release (issue 22: F1, F4): the pieces
(files/atomic.py, files/lock.py, the data cache, the metrics log, the checkpointer) one by one. The
whole run against planted links is tests/test_fuzz_run_folder.py."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from sab_byon_omni.errors import SabError
from sab_byon_omni.files.atomic import atomic_directory, atomic_write_text, open_own, remove_stale_temps
from sab_byon_omni.files.lock import FolderLock
from sab_byon_omni.training.checkpointer import Checkpointer
from sab_byon_omni.training.metrics import EvalRow, MetricsLog

posix = pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="links and flock are POSIX")
pytestmark = posix


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the one written to, holding a file and a folder that must never change."""
    d = tmp_path / "outside"
    (d / "sub").mkdir(parents=True)
    (d / "precious").write_bytes(b"precious bytes\n")
    (d / "sub" / "keep.txt").write_bytes(b"keep me")
    return d


def state(d: Path) -> dict[str, bytes | None]:
    """Every entry under ``d``: a file's bytes, None for a folder (what 'unchanged' compares)."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def link(at: Path, target: Path, hard: bool = False) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    os.link(target, at) if hard else at.symlink_to(target)
    return at


# ------------------------------------------------------------------------------- the lock (F1, F4)
@pytest.mark.parametrize("hard", [False, True], ids=["symlink", "hardlink"])
def test_a_link_at_the_lock_is_refused_and_never_written_through(tmp_path, outside, hard):
    before = state(outside)
    link(tmp_path / "run" / ".lock", outside / "precious", hard)
    with pytest.raises(SabError, match=r"run/\.lock is a (symbolic|hard) link"):
        FolderLock(tmp_path / "run").acquire()
    assert state(outside) == before


def test_deleting_the_lock_file_does_not_release_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = FolderLock(run)
    assert first.acquire() is None and (run / ".lock").read_text() == str(os.getpid())
    assert FolderLock(run).acquire() == str(os.getpid())  # taken: the holder's pid for the message
    (run / ".lock").unlink()  # the bypass of the finding
    assert FolderLock(run).acquire() == "?"  # still taken (the pid is gone with the file)
    first.release()
    again = FolderLock(run)
    assert again.acquire() is None
    again.release()


def test_a_full_disk_while_writing_the_lock_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(SabError, match="disk full") as e:
        FolderLock(run).acquire()
    assert "\n" not in str(e.value) and os.listdir(run) == []
    monkeypatch.undo()
    free = FolderLock(run)  # and nothing stays locked
    assert free.acquire() is None
    free.release()


def test_the_data_cache_lock_holds_when_its_lock_file_is_deleted(tmp_path):
    """Two builders: the second waits for the first although the first's .lock was deleted."""
    from sab_byon_omni.data import cache

    d = tmp_path / "cache"
    d.mkdir()
    events: list[str] = []

    def second() -> None:
        with cache.lock(d):
            events.append("second in")

    with cache.lock(d):
        (d / ".lock").unlink()
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)  # ample time for the second to get in, were the lock bypassed
        events.append("first out")
    t.join(timeout=30)
    assert events == ["first out", "second in"]


def test_the_data_cache_never_writes_through_a_link(tmp_path, outside, monkeypatch):
    """Links planted at every name the cache writes (its lock, token files, their temporaries,
    meta.json, tokenizer.json): the target is unchanged, the build refused or the links replaced."""
    from sab_byon_omni.config import DataConfig
    from sab_byon_omni.data.corpus import load_corpus

    (tmp_path / "corpus.txt").write_text("some words to tokenise and learn from\n" * 200)
    cfg = DataConfig(dataset=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"), seq_len=16,
                     tokenizer="bpe", bpe_vocab_size=300)
    before = state(outside)
    names = ["train.bin", "val.bin", "meta.json", "tokenizer.json", f"train.bin.tmp{os.getpid()}",
             f"val.bin.tmp{os.getpid()}"]
    for name in names:
        link(tmp_path / "cache" / name, outside / "precious")
    load_corpus(cfg)  # every one of these is replaced atomically: none is written through
    assert state(outside) == before
    assert all(not (tmp_path / "cache" / n).is_symlink() for n in names[:4])
    link(tmp_path / "cache2" / ".lock", outside / "precious")
    with pytest.raises(SabError, match="is a symbolic link"):
        load_corpus(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "cache2")}))
    assert state(outside) == before


def test_temporaries_of_a_cache_build_killed_outright_are_removed_by_the_next(tmp_path):
    """A Rust abort (or SIGKILL) runs no clean-up: the next build, once it holds the lock, removes
    the ``.train.bin.*.tmp`` it left (hostile review item 2); files that are not temporaries stay."""
    from sab_byon_omni.config import DataConfig
    from sab_byon_omni.data.corpus import load_corpus

    (tmp_path / "corpus.txt").write_text("some words to tokenise and learn from\n" * 200)
    cache = tmp_path / "cache"
    cache.mkdir()
    left = [cache / ".train.bin.k1l2.tmp", cache / ".val.bin.x9.tmp"]
    for p in left:
        p.write_bytes(b"\0" * 100)
    (cache / "notes.txt").write_text("mine")
    load_corpus(DataConfig(dataset=str(tmp_path / "corpus.txt"), cache_dir=str(cache), seq_len=16, tokenizer="byte"))
    assert not any(p.exists() for p in left) and (cache / "notes.txt").read_text() == "mine"
    assert (cache / "meta.json").is_file()


# ------------------------------------------------------------------------------- files/atomic.py
def test_open_own_refuses_links_and_other_kinds_of_file(tmp_path, outside):
    before = state(outside)
    for kind, make in [("symbolic link", lambda p: p.symlink_to(outside / "precious")),
                       ("symbolic link", lambda p: p.symlink_to(outside / "missing")),  # dangling: not created
                       ("hard link", lambda p: os.link(outside / "precious", p)),
                       ("not a plain file", lambda p: os.mkfifo(p))]:
        p = tmp_path / "f"
        make(p)
        with pytest.raises(SabError, match=kind):
            os.close(open_own(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "rows"))
        p.unlink()
    assert state(outside) == before
    os.close(open_own(tmp_path / "new", os.O_WRONLY | os.O_CREAT, "rows"))  # a plain new file is fine
    assert (tmp_path / "new").is_file()


def test_atomic_writes_replace_a_link_and_leave_its_target(tmp_path, outside):
    before = state(outside)
    link(tmp_path / "config.yaml", outside / "precious")
    link(tmp_path / "hard.yaml", outside / "precious", hard=True)
    atomic_write_text(tmp_path / "config.yaml", "new")
    atomic_write_text(tmp_path / "hard.yaml", "new")
    assert state(outside) == before
    assert (tmp_path / "config.yaml").read_text() == "new" and not (tmp_path / "config.yaml").is_symlink()


@pytest.mark.parametrize("at", ["target", "old"])
def test_atomic_directory_moves_links_aside_without_following_them(tmp_path, outside, at):
    """``out`` (overwritten) or the ``.out.old.tmp`` a killed overwrite left is a link to a folder
    elsewhere: the link goes, never the folder it points to."""
    before = state(outside)
    out = tmp_path / "out"
    link(out if at == "target" else tmp_path / ".out.old.tmp", outside)
    if at == "old":
        out.mkdir()
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and not out.is_symlink()
    assert not os.path.lexists(tmp_path / ".out.old.tmp")
    assert state(outside) == before


def test_atomic_directory_counts_a_dangling_link_as_existing(tmp_path, outside):
    link(tmp_path / "out", outside / "missing")
    with pytest.raises(SabError, match="already exists"):
        with atomic_directory(tmp_path / "out"):
            pass
    assert not (outside / "missing").exists()


def test_stale_temporaries_that_are_links_are_removed_not_followed(tmp_path, outside):
    before = state(outside)
    link(tmp_path / ".step_1.pt.abc.tmp", outside)  # a folder elsewhere
    link(tmp_path / ".config.yaml.abc.tmp", outside / "precious")
    (tmp_path / ".own.tmp").mkdir()
    (tmp_path / ".own.tmp" / "x").write_text("x")
    assert len(remove_stale_temps(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == ["outside"] and state(outside) == before


# ------------------------------------------------------------------------------- metrics, checkpointer
@pytest.mark.parametrize("hard", [False, True], ids=["symlink", "hardlink"])
def test_metrics_are_never_appended_through_a_link(tmp_path, outside, hard):
    before = state(outside)
    link(tmp_path / "metrics.jsonl", outside / "precious", hard)
    log = MetricsLog(tmp_path, enabled=True)
    with pytest.raises(SabError, match="metrics.jsonl is a"):
        log.reconcile(0)  # at the start of a run
    with pytest.raises(SabError, match="metrics.jsonl is a"):
        log.write(EvalRow(step=1, epoch=0, val_loss=1.0))  # and at every row
    assert state(outside) == before


def test_pruning_removes_a_link_never_what_it_points_to(tmp_path):
    from tests.hostile import write_dcp

    elsewhere = tmp_path / "elsewhere"
    for step in (1, 2, 3):
        write_dcp(elsewhere / f"s{step}.dcp", global_step=step)
    before = state(elsewhere)
    ck = Checkpointer(tmp_path / "run", sharded=True, keep_last=1)
    for step in (1, 2, 3):
        link(ck.dir / f"step_{step}.dcp", elsewhere / f"s{step}.dcp")
    assert sorted(p.name for p in ck.prune(3)) == ["step_1.dcp", "step_2.dcp"]
    assert os.listdir(ck.dir) == ["step_3.dcp"] and state(elsewhere) == before


def test_setting_aside_refuses_a_linked_metrics_file_before_moving_anything(tmp_path, outside):
    from sab_byon_omni.training.checkpointer import Entry

    before = state(outside)
    ck = Checkpointer(tmp_path / "run")
    link(ck.dir / "metrics.jsonl", outside / "precious")
    (ck.dir / "step_9.pt").write_bytes(b"x")
    with pytest.raises(SabError, match="metrics.jsonl is a symbolic link"):
        ck.set_aside([Entry(ck.dir / "step_9.pt", 9, False, 0)], "a test", copies=(ck.dir / "metrics.jsonl",))
    assert sorted(os.listdir(ck.dir)) == ["metrics.jsonl", "step_9.pt"]  # nothing moved
    assert state(outside) == before


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_files_and_folders_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """mkstemp/mkdtemp make 0600/0700 temporaries; the final file is 0666 & ~umask, a folder 0777 & ~umask."""
    from sab_byon_omni.files.atomic import atomic_path, open_temp

    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    f, tmp = open_temp(tmp_path / "c.bin")
    with f:
        f.write(b"z")
    os.replace(tmp, tmp_path / "c.bin")
    with atomic_directory(tmp_path / "folder") as d:
        (d / "inside.txt").write_text("w")
    for name in ("a.txt", "b.bin", "c.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask
    plain = tmp_path / "plain.txt"
    plain.write_text("p")
    assert plain.stat().st_mode & 0o777 == (tmp_path / "a.txt").stat().st_mode & 0o777


def test_a_checkpoint_dir_that_cannot_be_made_is_refused_before_the_corpus_is_cached(tmp_path, monkeypatch, capsys):
    """The newcomer's /proc/foo was refused only after the corpus was tokenised and its cache written."""
    from sab_byon_omni.cli import main
    from sab_byon_omni.files.atomic import check_can_create

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "afile").write_text("mine")
    targets = ["afile/run"] + (["/proc/sab-run"] if os.path.isdir("/proc/self") else [])
    for target in targets:
        assert main(["train", "--data", "data", "--preset", "tiny", "--checkpoint_dir", target]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: cannot create train.checkpoint_dir {target}: "), err
        assert not (tmp_path / ".sab_cache").exists()
    if os.path.isdir("/proc/self"):
        assert "/proc exists but takes no new files" in err[0]
    check_can_create(tmp_path / "new" / "deeper", "x")  # possible: nothing is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data"]
# ------------------------------------------------------------ export --force (hostile review item 1, 8)
@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A run folder as training leaves it: a checkpoint, its config, metrics and the lock file."""
    from sab_byon_omni.core.export import checkpoint_dict
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.files.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("src") / "run"
    run.mkdir()
    save_checkpoint(checkpoint_dict(SABTranscendentV2("tiny", seed=0)), run / "best_model.pt")
    for name in ("config.yaml", "metrics.jsonl", ".lock"):
        (run / name).write_text("x\n")
    return run


def _folder(tmp_path: Path, source_run: Path, kind: str) -> Path:
    """The -o folder an export --force is pointed at; every one holds something that must survive."""
    if kind == "the input's own run folder":
        return source_run
    d = tmp_path / "out"
    d.mkdir()
    if kind == "another run folder":
        for name in ("step_5.pt", "metrics.jsonl", ".lock"):
            (d / name).write_text("training")
    elif kind == "a folder of user files":
        (d / "keep.txt").write_text("keep")
    elif kind == "a transformers folder not written by us":
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (d / name).write_text("{}")
    return d


@pytest.mark.parametrize("kind", ["the input's own run folder", "another run folder", "a folder of user files",
                                  "a transformers folder not written by us"])
def test_export_force_never_replaces_a_folder_it_cannot_identify(tmp_path, source_run, capsys, kind):
    from sab_byon_omni.cli import main

    out = _folder(tmp_path, source_run, kind)
    before = state(out)
    assert main(["export", "--checkpoint", str(source_run / "best_model.pt"), "-o", str(out), "--format", "hf",
                 "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--force" in err
    assert state(out) == before


def test_export_force_replaces_an_earlier_export_and_refuses_the_current_folder(tmp_path, source_run, capsys,
                                                                                monkeypatch):
    from sab_byon_omni.cli import main

    args = ["export", "--checkpoint", str(source_run / "best_model.pt"), "--format", "hf", "--force", "-o"]
    assert main([*args, str(tmp_path / "hf")]) == 0
    assert main([*args, str(tmp_path / "hf")]) == 0  # an export of ours is replaced
    monkeypatch.chdir(tmp_path / "hf")
    before = state(tmp_path)
    assert main([*args, "."]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert state(tmp_path) == before


def test_ctrl_c_inside_torchs_zip_writer_is_a_stop_not_a_full_disk(tmp_path):
    """torch.save turns a KeyboardInterrupt raised in its write callback into 'unexpected pos'; the
    write raises the KeyboardInterrupt again (a second Ctrl-C during a save stops the run, status
    130), leaves no temporary and the previous file as it was."""
    import torch

    from sab_byon_omni.files.atomic import atomic_write

    target = tmp_path / "step_5.pt"
    target.write_bytes(b"previous")

    def write(f):
        calls = []

        class Interrupted:
            def write(self, b):
                calls.append(len(b))
                if len(calls) == 3:
                    raise KeyboardInterrupt
                return f.write(b)

            def flush(self):
                f.flush()

        torch.save({"w": torch.zeros(1000)}, Interrupted())

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["step_5.pt"]
