"""The machine facts a run decides with: how many torch threads training takes on a CPU
(train.threads: the idle cores, an explicit number, torchrun's share), and when the machine is busy."""

from __future__ import annotations

import logging

import pytest
import torch

from sab_byon_omni import machine as M
from sab_byon_omni.cli import main
from tests.helpers import tiny_run


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(M, "usable_cpus", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)


@pytest.mark.parametrize("idle, expected", [(0, 1), (1, 1), (3, 3), (4, 4), (9, 4)])
def test_auto_takes_the_idle_cores_at_least_one_at_most_torchs(four_cores, idle, expected):
    t = M.training_threads(0, idle=idle)
    assert (t.n, t.idle, t.cores, t.why) == (expected, idle, 4, "")
    assert t.describe() == f"{expected} thread{'' if expected == 1 else 's'} ({idle} idle of 4)"


def test_auto_never_takes_more_than_torchs_setting(monkeypatch):
    monkeypatch.setattr(M, "usable_cpus", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert M.training_threads(0, idle=8).n == 2


def test_an_explicit_number_wins_even_over_busy_cores(four_cores):
    t = M.training_threads(3, idle=1)
    assert (t.n, t.why) == (3, "")
    assert t.describe() == "3 threads (of 4 cores)"


def test_an_explicit_number_above_the_cores_is_lowered_and_says_why(four_cores):
    t = M.training_threads(9, idle=4)
    assert t.n == 4 and "train.threads=9 is more than the 4 CPU cores" in t.why and "training with 4" in t.why


def test_torchrun_splits_the_cores_between_local_processes(four_cores, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert M.training_threads(0, idle=4).n == 2
    t = M.training_threads(3, idle=4)
    assert t.n == 2 and "shared by 2 local processes" in t.why
    assert "2 per local process" in t.describe()


@pytest.mark.parametrize("load, says", [(5.0, True), (1.5, False)])
def test_a_busy_machine_is_named_by_its_load(monkeypatch, load, says):
    monkeypatch.setattr(M.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(M.os, "cpu_count", lambda: 2)
    text = M.busy_machine()
    assert ("busy (load 5.0 on 2 CPUs)" in text and "assumes free cores" in text) if says else text == ""


@pytest.mark.integration
def test_train_lowers_too_many_threads_once_says_them_in_the_banner_and_restores_torchs(in_tmp, capsys, caplog,
                                                                                         monkeypatch):
    monkeypatch.setattr(M, "usable_cpus", lambda: 1)
    before = torch.get_num_threads()
    with caplog.at_level(logging.WARNING):
        assert main(["train", *tiny_run(max_steps=1, num_samples=24), "--checkpoint_dir", "r", "--threads", "3"]) == 0
    err = capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "train.threads=3" in r.getMessage()]
    assert len(warned) == 1 and "training with 1" in warned[0]
    assert "1 thread (of 1 core)" in err
    assert torch.get_num_threads() == before
