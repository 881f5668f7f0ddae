"""The metrics schema (training/metrics.py): every row written carries its kind, and the one
``row_kind`` reads it back for the reconciliation on resume, the trackers and the plot, also for
files written before rows had a kind."""

from __future__ import annotations

import json

from sab_byon_omni.plotting import collect_series
from sab_byon_omni.training.metrics import EpochRow, EvalRow, MetricsLog, StepRow, row_kind
from sab_byon_omni.training.trackers import scalars

STEP = dict(step=2, epoch=1, loss=2.5, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0, memory_mb=10.0, skipped=0)


def written(tmp_path, *rows):
    log = MetricsLog(tmp_path, enabled=True)
    for row in rows:
        log.write(row)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_every_row_is_written_with_its_kind_first(tmp_path):
    rows = written(tmp_path, StepRow(**STEP), EvalRow(step=2, epoch=1, val_loss=2.0),
                   EpochRow(step=4, epoch=1, train_loss=2.4, val_loss=2.1))
    assert [list(r)[0] for r in rows] == ["kind"] * 3
    assert [r["kind"] for r in rows] == ["train", "eval", "epoch_end"]
    assert [row_kind(r) for r in rows] == ["train", "eval", "epoch_end"]


def test_rows_written_before_the_kind_existed_are_read_by_their_fields():
    legacy = [{**STEP, "time": 1.0}, {**STEP, "muon_lr": 0.02, "time": 1.0},
              {"step": 2, "epoch": 1, "val_loss": 2.0, "time": 1.0},
              {"step": 4, "epoch": 1, "train_loss": 2.4, "val_loss": 2.1, "time": 1.0}]
    assert [row_kind(r) for r in legacy] == ["train", "train", "eval", "epoch_end"]
    assert row_kind({"step": 1, "something": 3}) is None
    assert row_kind({"kind": "bogus", "step": 1}) is None


def test_an_evaluation_and_an_epoch_end_at_one_step_stay_two_rows_everywhere(tmp_path):
    """Both carry a val_loss at step 4: the reconciliation keeps both, the trackers name them apart,
    and the plot draws the value once (it is the same validation)."""
    rows = written(tmp_path, StepRow(**{**STEP, "step": 4}), EvalRow(step=4, epoch=1, val_loss=2.0),
                   EpochRow(step=4, epoch=1, train_loss=2.4, val_loss=2.0))
    MetricsLog(tmp_path, enabled=True).reconcile(4)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    names = [set(scalars(r)) for r in rows]
    assert names == [{"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_mb",
                      "train/skipped", "train/epoch"}, {"eval/val_loss", "eval/epoch"},
                     {"epoch_end/train_loss", "epoch_end/val_loss", "epoch_end/epoch"}]
    series = collect_series(rows)
    assert series.loss == ([4], [2.5]) and series.val_loss == ([4], [2.0])
    assert series.epoch_train_loss == ([4], [2.4])


def test_a_row_of_an_unknown_kind_feeds_no_curve_and_trackers_call_it_other(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "mystery", "step": 1, "loss": 9.0}) + "\n"
                                            + json.dumps({"kind": "train", **STEP}) + "\n")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert collect_series(rows).loss == ([2], [2.5])
    assert set(scalars(rows[0])) == {"other/loss"}
