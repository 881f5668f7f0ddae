"""benchmarks/gpu_check.sh cannot rot: its dry run (the same script on this CPU, tiny sizes) ends
with a report holding every part and field the GPU run fills; and a part that fails or runs out
of time still leaves a report that says so, with the end of its log."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ["facts", "gpu_tests", "bench_lightweight_bf16", "bench_1b_bf16", "bench_1b_bf16_compile", "bench_1b_fp16",
         "bench_lightweight_muon", "train_200", "generate_lightweight", "generate_1b"]
TRAIN = {"tokens_per_s", "mfu", "peak_tflops", "measured_peak_tflops", "measured_mfu", "peak_memory_mb",
         "hf_tokens_per_s", "hf_mfu", "ratio_vs_hf", "precision", "preset"}
GENERATE = {"tokens_per_s", "mbu", "read_bandwidth_gbs", "hf_tokens_per_s", "hf_mbu", "ratio_vs_hf"}


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # 1.5-3 min on 2 cores (torch.compile and emulated bf16 on a CPU): run with -m slow
def test_the_dry_run_writes_the_whole_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env.update(PYTHON=os.environ.get("PYTHON", "python3"), OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "gpu_check.log").read_text() if (tmp_path / "out" / "gpu_check.log").exists() else ""
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:], log[-4000:])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "gpu_report.json",
                                                                    "gpu_report.md"]
    r = json.loads((tmp_path / "out" / "gpu_report.json").read_text())
    assert r["dry_run"] is True and r["seconds"] > 0 and r["all_parts_ok"] is True
    assert {"device", "driver", "torch", "cuda", "python"} <= r["device"].keys() and r["device"]["torch"]
    assert [p["name"] for p in r["parts"]] == PARTS
    for p in r["parts"]:
        assert p["status"] == "ok" and p["seconds"] <= p["limit_s"] and p["command"], p
    figures = {p["name"]: p["figures"] for p in r["parts"]}
    tests = figures["gpu_tests"]
    assert tests["passed"] >= 6 and tests["failed"] == tests["error"] == 0  # their CPU variants
    assert {t["test"].split("::")[0] for t in tests["tests"]} >= {"test_training_cuda", "test_generate_cuda",
                                                                  "test_memory_cuda"}
    for name in PARTS[2:6]:
        assert TRAIN <= figures[name].keys() and figures[name]["tokens_per_s"] > 0, name
    assert figures["bench_1b_bf16_compile"]["compile"] is True and figures["bench_1b_fp16"]["precision"] == "fp16"
    muon = figures["bench_lightweight_muon"]
    assert muon["optimizer"].startswith("Muon") and muon["newton_schulz_flops"] > 0 and muon["tokens_per_s"] > 0
    run = figures["train_200"]  # (20 steps in the dry run)
    assert run["steps"] == 20 and len(run["loss_curve"]) == 10 and run["last_loss"] < run["first_loss"]
    for name in PARTS[8:]:
        assert GENERATE <= figures[name].keys() and figures[name]["mbu"] > 0, name
    assert [t["met"] for t in r["targets"]] == [None] * 5  # a dry run meets or misses no GPU target
    md = (tmp_path / "out" / "gpu_report.md").read_text()
    assert md.startswith("# GPU check (DRY RUN") and all(f"| {name} | **ok** |" in md for name in PARTS)
    assert "## Targets" in md and "## GPU tests" in md and "## Loss curve of the 200-step run" in md


def test_a_failed_or_timed_out_part_is_reported_with_its_log(tmp_path):
    gpu_report = _report_module()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "meta.json").write_text(json.dumps({"dry_run": False, "started": "now", "start_s": 0}))
    (work / "parts.tsv").write_text("2\tbench_1b_bf16_compile\ttimeout\t124\t100012\t100\tpython -m x\n"
                                    "1\tfacts\tok\t0\t900\t20\tpython facts\n"
                                    "3\tbench_1b_fp16\tfailed\t1\t3000\t50\tpython -m y\n")
    (work / "facts.out").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "driver": "580.1"}) + "\n")
    (work / "bench_1b_bf16_compile.log").write_text("compiling...\n" * 500 + "still compiling")
    (work / "bench_1b_fp16.log").write_text("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory")
    r = gpu_report.build(work, out)
    assert [p["name"] for p in r["parts"]] == ["facts", "bench_1b_bf16_compile", "bench_1b_fp16"]
    timed_out, failed = r["parts"][1], r["parts"][2]
    assert timed_out["status"] == "timeout" and timed_out["log_tail"].endswith("still compiling")
    assert len(timed_out["log_tail"]) == gpu_report.TAIL and timed_out["figures"] is None
    assert failed["exit_code"] == 1 and "OutOfMemoryError" in failed["log_tail"]
    assert r["targets"][0]["value"] is None and r["targets"][0]["met"] is None  # no figure, no verdict
    assert r["targets"][-1]["met"] is False and r["all_parts_ok"] is False  # no GPU tests ran: not green
    md = (out / "gpu_report.md").read_text()
    assert "| bench_1b_bf16_compile | **timeout** | 100.0 (100) |" in md and "NVIDIA H100 80GB HBM3" in md
    assert "## bench_1b_fp16: failed (exit 1), end of its log" in md and "CUDA out of memory" in md


def test_past_its_deadline_the_check_skips_the_remaining_parts_and_still_reports(tmp_path):
    env = {**os.environ, "GPU_CHECK_TOTAL_S": "4", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]  # not every part ran
    r = json.loads((tmp_path / "out" / "gpu_report.json").read_text())
    assert [p["name"] for p in r["parts"]] == PARTS and r["all_parts_ok"] is False
    statuses = [p["status"] for p in r["parts"]]
    assert set(statuses) <= {"ok", "timeout", "skipped"} and statuses[-1] == "skipped"
    assert all(p["limit_s"] <= 4 for p in r["parts"])
    assert "no time left" in r["parts"][-1]["log_tail"] and (tmp_path / "out" / "gpu_report.md").is_file()


def test_the_script_refuses_a_missing_outdir(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr


@pytest.mark.parametrize("value, key, text", [(0.5123, "mfu", "51.2%"), (1.234, "ratio_vs_hf", "1.23x"),
                                              (None, "mfu", "-"), ("a|b", "", "a/b")])
def test_report_cells(value, key, text):
    assert _report_module()._cell(value, key) == text


def test_a_test_run_cut_short_still_reports_each_finished_test(tmp_path):
    """No JUnit file (the part's limit killed pytest): the -v lines give each test that ended."""
    gpu_report = _report_module()
    work = tmp_path
    (work / "gpu_tests.out").write_text(
        "tests/gpu/test_training_cuda.py::test_compiled_training_step_matches_eager PASSED [ 10%]\n"
        "[gw1] [ 20%] FAILED tests/gpu/test_memory_cuda.py::test_estimated_peak[lightweight]\n"
        "tests/gpu/test_generate_cuda.py::test_greedy SKIPPED (no CUDA)    [ 30%]\n"
        "collecting ... collected 12 items\n")
    f = gpu_report._figures("gpu_tests", work)
    assert f["cut_short"] is True and (f["passed"], f["failed"], f["skipped"]) == (1, 1, 1)
    assert [t["test"] for t in f["tests"]] == ["test_generate_cuda::test_greedy", "test_memory_cuda::test_estimated_"
                                               "peak[lightweight]", "test_training_cuda::test_compiled_training_"
                                               "step_matches_eager"]


def test_xdist_is_used_only_where_installed():
    text = SCRIPT.read_text()
    assert 'TEST_ARGS=(); "$PY" -c "import xdist" 2>/dev/null && TEST_ARGS=(-n 3 --dist loadfile)' in text
    limits = dict(x.split("=") for x in text.split("L_FACTS=10;")[1].split("TOTAL_S")[0].replace("\n", " ")
                  .replace(";", " ").split() if x.startswith("L_"))
    assert 10 + sum(map(int, limits.values())) <= 470  # every part's limit within the deadline
