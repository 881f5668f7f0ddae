"""The learning benchmark (benchmarks/learn.py) end to end on a tiny budget: both models train on
the same windows, our side uses the rule (Muon + AdamW), and the report reads its own rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.training import recipe as R

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_three_steps_of_both_models_then_the_report(tmp_path):
    results = tmp_path / "rows.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learn.py"), "--corpus", "stdlib", "--preset", "tiny",
                          "--steps", "3", "--val-windows", "8", "--results", str(results), "--cache", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(ROOT)})  # this checkout's package
    assert run.returncode == 0, run.stderr[-3000:]
    gpt2, ours = (json.loads(line) for line in results.read_text().splitlines())  # GPT-2 first: ours' target
    assert (ours["model"], gpt2["model"]) == ("ours", "gpt2") and ours["steps"] == gpt2["steps"] == 3
    assert ours["optimizer"] == "muon" and ours["muon_lr"] == pytest.approx(R.muon_learning_rate(ModelConfig.from_name("tiny")))
    assert gpt2["optimizer"] == "adamw" and gpt2["muon_lr"] is None
    assert ours["val"]["bytes"] == gpt2["val"]["bytes"] > 0  # scored on the very same windows
    for row in (ours, gpt2):  # 3 steps from a uniform guess over 258 ids: log2(258) = 8.0 bits per token
        assert 0 < row["val"]["bits_per_byte"] < 9
    assert "| stdlib | tiny |" in run.stdout and "ours / GPT-2" in run.stdout

    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learn.py"), "--report", str(results)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert ours["muon_warmup"] == min(R.MUON_WARMUP, R.warmup_steps(3)) == 1
    assert f"Muon {ours['muon_lr']:g}, 1 |" in report.stdout  # the table names the rule's Muon rate and warmup


def test_time_to_loss_and_the_wall_budget_are_reported_for_each_model_variant(tmp_path):
    results = tmp_path / "rows.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learn.py"), "--corpus", "stdlib", "--preset", "tiny",
                          "--steps", "4", "--eval-every", "2", "--wall-budget", "--arch",
                          "base;qk_norm=true,mlp=relu2;muon_ns_steps=3,muon_ns_coefficients=polar_express",
                          "--val-windows", "8", "--results", str(results), "--cache", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    base, variant = R.ARCHITECTURE, {**R.ARCHITECTURE, "qk_norm": True, "mlp": "relu2"}  # ours: the recipe's model
    default, pe3 = (5, "quintic"), (3, "polar_express")  # a train field in --arch: the recipe's Newton-Schulz
    assert [(r["model"], r["mode"], r["arch"], r.get("ns_steps"), r.get("ns_coefficients")) for r in rows] == [
        ("gpt2", "steps", {}, None, None), ("ours", "steps", base, *default), ("ours", "steps", variant, *default),
        ("ours", "steps", base, *pe3), ("ours", "wall", base, *default), ("ours", "wall", variant, *default),
        ("ours", "wall", base, *pe3)]
    gpt2 = rows[0]
    for r in rows:  # validations at steps 2 and 4 (the last), training seconds rising, evaluation apart
        steps, seconds, losses = zip(*r["val_curve"])
        assert steps[-1] == r["steps"] and list(seconds) == sorted(seconds) and seconds[-1] == pytest.approx(r["seconds"], abs=0.011)
        assert losses[-1] == pytest.approx(r["val"]["loss"], abs=1e-4) and r["eval_seconds"] > 0
    for r in rows[1:]:
        assert r["target_loss"] == gpt2["val"]["loss"] and r["gpt2_seconds"] == gpt2["seconds"]
        first = next((sec for _, sec, loss in r["val_curve"] if loss <= r["target_loss"]), None)
        assert r["time_to_target"] == first
    for wall in rows[4:]:  # planned from the measured step time, then trained until no further step fits
        assert wall["budget_seconds"] == gpt2["seconds"] and wall["planned_steps"] >= 1
        ran_out = wall["steps"] == math.ceil(1.5 * wall["planned_steps"])  # the batches it was given
        assert ran_out or wall["seconds"] + wall["seconds"] / wall["steps"] > wall["budget_seconds"] - 0.02
    label = ",".join(f"{k}={v}" for k, v in variant.items())
    assert "time to GPT-2's loss" in run.stdout and f"| stdlib | tiny | {label}, fp32 |" in run.stdout
    base_label = ",".join(f"{k}={v}" for k, v in base.items()) or "base"
    assert f"| stdlib | tiny | {base_label}, NS 3 x polar_express, fp32 |" in run.stdout
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learn.py"), "--report", str(results)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and f"| stdlib | tiny | {base_label}, fp32 |" in report.stdout, report.stderr[-3000:]


# ------------------------------------------------------------------ bad input, and rows kept as they come
def _learn():
    import importlib
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("learn")


@pytest.mark.parametrize("argv", [
    ["--steps", "0"], ["--steps", "-5"], ["--val-windows", "-1"], ["--val-windows", "0", "--eval-every", "0"],
    ["--eval-every", "-3"], ["--muon-ns-steps", "0"], ["--muon-ns-steps", "21"], ["--lr", "nan"], ["--lr", "-1"],
    ["--lr", "1e-3,abc"], ["--muon-lr", "inf"], ["--batch", "0"], ["--threads", "0"], ["--preset", "huge"],
    ["--hidden", "0"], ["--heads", "3"], ["--warmup", "-5"], ["--min-lr-ratio", "5"], ["--gpt2-lr", "nan"],
    ["--models", "foo"], ["--steps", "abc"], ["--seq-len", "100000"], ["--wall-budget", "--models", "ours"],
    ["--arch", "qk_norm=maybe"], ["--arch", "mlp=relu3"], ["--arch", "logit_softcap=-1"],
    ["--arch", "document_mask_id=99999"], ["--arch", "foo=1"], ["--arch", "muon_ns_steps=0"],
    ["--arch", "muon_ns_coefficients=cubic"], ["--arch", "learning_rate=nan"], ["--arch", "hidden=-1"],
    ["--arch", "qk_norm"], ["--arch", "base,base"], ["--arch", ";;"], ["--arch", "base;base"],
    ["--arch", "qk_norm=[1"]])
def test_bad_options_are_one_error_line_and_exit_2_before_anything_loads(argv, capsys, monkeypatch):
    learn = _learn()
    monkeypatch.setattr(learn.learn_corpora, "load", lambda *a: pytest.fail("loaded a corpus despite bad input"))
    assert learn.main(["--corpus", "stdlib", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_bad_results_files_are_one_error_line(tmp_path, capsys, monkeypatch):
    learn = _learn()
    monkeypatch.setattr(learn.learn_corpora, "load", lambda *a: pytest.fail("loaded a corpus despite bad input"))
    (tmp_path / "text.jsonl").write_text("not json\n")
    (tmp_path / "other.jsonl").write_text('{"loss": 1}\n')
    for argv in (["--report", str(tmp_path / "missing.jsonl")], ["--report", str(tmp_path / "text.jsonl")],
                 ["--report", str(tmp_path / "other.jsonl")], ["--results", str(tmp_path / "no" / "dir.jsonl")]):
        assert learn.main(["--preset", "tiny", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_each_row_reaches_the_results_file_as_soon_as_it_is_computed(tmp_path, monkeypatch):
    """A crash in the last variant keeps GPT-2's row and the earlier variants' rows."""
    import types

    learn = _learn()
    corpus = types.SimpleNamespace(name="stdlib", description={})
    monkeypatch.setattr(learn.learn_corpora, "load", lambda *a: corpus)
    monkeypatch.setattr(learn, "batches_only", lambda args, c: [])
    monkeypatch.setattr(learn, "cpu_name", lambda: "cpu")
    fields = dict(lr=1e-3, warmup=0, optimizer="adamw", muon_lr=None, train_loss=1.0, steps=1, seconds=1.0,
                  eval_seconds=0.0, val={"loss": 1.0, "bits_per_byte": 1.0}, val_curve=[[1, 1.0, 1.0]])
    monkeypatch.setattr(learn, "run_gpt2", lambda args, c, b: dict(model="gpt2", arch={}, **fields))

    def run_ours(args, c, budget=None):
        if args.arch_value.get("mlp") == "relu2":
            raise RuntimeError("the last variant crashed")
        return dict(model="ours", arch=args.arch_value, **fields), []

    monkeypatch.setattr(learn, "run_ours", run_ours)
    results = tmp_path / "rows.jsonl"
    with pytest.raises(RuntimeError):
        learn.main(["--corpus", "stdlib", "--preset", "tiny", "--arch", "base;qk_norm=true;mlp=relu2",
                    "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["model"], r["arch"]) for r in rows] == [("gpt2", {}), ("ours", {}), ("ours", {"qk_norm": True})]
    assert all(r["target_loss"] == 1.0 for r in rows[1:])


def test_the_time_table_names_the_gpt2_run_each_ratio_divides_by():
    """Two GPT-2 runs of one corpus (8.67 s and a later 7.94 s): a row made against the first says so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learn_report

    rows = learn_report.load_rows(str(ROOT / "benchmarks" / "learn_ns.jsonl"))
    table = "\n".join(learn_report.time_table(rows))
    assert "| stdlib | tiny | zero_init_proj=True, fp32 | 8.67 | 0.91 |" in table
    assert "| stdlib | tiny | zero_init_proj=True, auto | 7.94 |" in table
    recipes = (ROOT / "docs" / "RECIPES.md").read_text()
    assert "8.67 s\n(stdlib) and 7.00 s (prose)" in recipes  # the doc's divisor is the report's
