"""The two halves of ``benchmarks/gpu_check.sh`` that are easier in Python.

``python benchmarks/gpu_report.py facts``
    prints the machine as JSON: GPU name, driver, torch, CUDA and cuDNN versions, memory.
``python benchmarks/gpu_report.py build WORK OUTDIR``
    reads what the parts left in WORK (``parts.tsv``, each part's log and output, the GPU tests'
    JUnit XML) and writes ``gpu_report.json`` and ``gpu_report.md`` into OUTDIR. It uses the
    standard library only, so a report comes back even when torch itself is broken; it runs after
    every part, so a report exists even if the whole check is cut short.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TAIL = 2500  # characters of a failed part's log kept in the report

# What each bench part's JSON line contributes to the report.
TRAIN_FIGURES = ("preset", "params", "precision", "compile", "batch_size", "seq_len", "tokens_per_s", "step_s",
                 "tflops", "mfu", "peak_tflops", "peak_source", "measured_peak_tflops", "measured_mfu",
                 "peak_memory_mb", "compile_s", "hf_tokens_per_s", "hf_mfu", "hf_measured_mfu", "ratio_vs_hf",
                 "optimizer", "newton_schulz_flops", "newton_schulz_dtype")
GENERATE_FIGURES = ("preset", "params", "precision", "prompt_len", "new_tokens", "tokens_per_s", "mbu",
                    "read_bandwidth_gbs", "bytes_per_token", "hf_tokens_per_s", "hf_mbu", "ratio_vs_hf")

# (target, part, figure, threshold) on an H100: issue 17.
TARGETS = (
    ("1b bf16 compiled: MFU of the data-sheet peak >= 50%", "bench_1b_bf16_compile", "mfu", 0.50),
    ("1b bf16 compiled: tokens/s >= 1.3x HF GPT-2", "bench_1b_bf16_compile", "ratio_vs_hf", 1.30),
    ("Lightweight bf16: MFU of the data-sheet peak >= 35%", "bench_lightweight_bf16", "mfu", 0.35),
)
PERCENT = ("mfu", "measured_mfu", "hf_mfu", "hf_measured_mfu", "mbu", "hf_mbu")


# ---------------------------------------------------------------------------------------- facts
def facts() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "host_cpu": _cpu_name(), "driver": _driver()}
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - the report says what went wrong
        out["torch_error"] = f"{type(e).__name__}: {e}"[:300]
        return out
    out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), devices=torch.cuda.device_count(),
                   bf16_native=torch.cuda.get_device_capability(0) >= (8, 0))
    else:
        out["device"] = f"CPU: {out['host_cpu']} (no CUDA)"
    try:  # the version without importing it (seconds on a small CPU)
        from importlib.metadata import version

        out["transformers"] = version("transformers")
    except Exception:  # noqa: BLE001
        out["transformers"] = None
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------- parts
def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _junit(path: Path) -> dict[str, Any] | None:
    """Counts and one row per test from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:300]
        module = (case.get("classname") or "").split(".")[-1]
        tests.append({"test": f"{module}::{case.get('name', '')}",
                      "outcome": outcome, "seconds": round(float(case.get("time") or 0), 2), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": sorted(tests, key=lambda t: t["test"])}


VERBOSE = re.compile(r"(?:^|\s)(?:(?P<id1>\S+::\S+) (?P<o1>PASSED|FAILED|ERROR|SKIPPED)"
                     r"|(?P<o2>PASSED|FAILED|ERROR|SKIPPED) (?P<id2>\S+::\S+))")


def _verbose(text: str) -> dict[str, Any] | None:
    """Counts and one row per test from ``pytest -v``'s lines (one process, or pytest-xdist's
    ``[gw0] [ 50%] PASSED ...``): what a run cut short by its limit leaves, having no JUnit file."""
    tests = {}
    for line in text.splitlines():
        m = VERBOSE.search(line)
        if m:
            test_id, outcome = m["id1"] or m["id2"], (m["o1"] or m["o2"]).lower()
            path, _, name = test_id.partition("::")
            tests[test_id] = {"test": f"{Path(path).stem}::{name}", "outcome": outcome,
                              "seconds": None, "message": ""}
    if not tests:
        return None
    rows = list(tests.values())
    counts = {k: sum(t["outcome"] == k for t in rows) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": sorted(rows, key=lambda t: t["test"]), "cut_short": True}


def _training(work: Path) -> dict[str, Any] | None:
    """The 200-step run's loss curve and speed, from its ``metrics.jsonl``."""
    rows = []
    for line in _read(work / "train_200" / "metrics.jsonl").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("kind") == "train":
            rows.append(row)
    if not rows:
        return None
    speeds = sorted(r["tokens_per_s"] for r in rows[1:] or rows if isinstance(r.get("tokens_per_s"), (int, float)))
    return {"steps": rows[-1].get("step"), "first_loss": rows[0].get("loss"), "last_loss": rows[-1].get("loss"),
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "memory_mb": rows[-1].get("memory_mb"), "reserved_mb": rows[-1].get("reserved_mb"),
            "skipped": rows[-1].get("skipped"), "loss_curve": [[r.get("step"), r.get("loss")] for r in rows]}


def _figures(name: str, work: Path) -> dict[str, Any] | None:
    if name == "facts":
        return _last_json(_read(work / "facts.out"))
    if name == "gpu_tests":
        return _junit(work / "junit.xml") or _verbose(_read(work / "gpu_tests.out"))
    if name == "train_200":
        return _training(work)
    r = _last_json(_read(work / f"{name}.out"))
    if r is None:
        return None
    keys = GENERATE_FIGURES if r.get("mode") == "generate" else TRAIN_FIGURES
    return {k: r.get(k) for k in keys if k in r}


def parts(work: Path) -> list[dict[str, Any]]:
    rows = []
    for line in sorted(_read(work / "parts.tsv").splitlines(), key=lambda x: int(x.split("\t")[0])):
        _, name, status, rc, ms, limit, command = (line.split("\t") + [""] * 7)[:7]
        part = {"name": name, "status": status, "exit_code": int(rc), "seconds": round(int(ms) / 1000, 1),
                "limit_s": int(limit), "command": command, "figures": _figures(name, work)}
        if status != "ok":
            part["log_tail"] = _read(work / f"{name}.log")[-TAIL:]
        rows.append(part)
    return rows


def targets(rows: list[dict[str, Any]], dry_run: bool) -> list[dict[str, Any]]:
    by_name = {p["name"]: p for p in rows}
    out = []
    for what, part, key, threshold in TARGETS:
        value = ((by_name.get(part) or {}).get("figures") or {}).get(key)
        met = None if value is None or dry_run else value >= threshold
        out.append({"target": what, "part": part, "figure": key, "value": value, "threshold": threshold, "met": met})
    tests = (by_name.get("gpu_tests") or {}).get("figures") or {}
    memory = [t for t in tests.get("tests", []) if "estimated_peak" in t["test"]]
    out.append({"target": "estimator within 10% of max_memory_allocated (Lightweight, 1b)", "part": "gpu_tests",
                "value": [t["outcome"] for t in memory] or None, "threshold": "passed",
                "met": None if dry_run or not memory else all(t["outcome"] == "passed" for t in memory)})
    green = tests and tests.get("failed", 1) == 0 and tests.get("error", 1) == 0 and tests.get("passed", 0) > 0
    out.append({"target": "every GPU test green", "part": "gpu_tests", "value": {k: tests.get(k) for k in
                ("passed", "failed", "error", "skipped")} if tests else None, "threshold": "0 failed",
                "met": None if dry_run else bool(green)})
    return out


# ---------------------------------------------------------------------------------------- report
def build(work: Path, outdir: Path) -> dict[str, Any]:
    meta = json.loads(_read(work / "meta.json") or "{}")
    rows = parts(work)
    device = next((p["figures"] for p in rows if p["name"] == "facts" and p["figures"]), None) or {}
    report = {**meta, "device": device, "all_parts_ok": bool(rows) and all(p["status"] == "ok" for p in rows),
              "parts": rows, "targets": targets(rows, bool(meta.get("dry_run"))),
              "seconds": round(time.time() - meta.get("start_s", time.time()), 1)}
    _write(outdir / "gpu_report.json", json.dumps(report, indent=2) + "\n")
    _write(outdir / "gpu_report.md", markdown(report))
    return report


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if key in PERCENT else f"{value:.2f}x" if key.startswith("ratio") else f"{value:,.4g}"
    return str(value).replace("|", "/")


def _summary(p: dict[str, Any]) -> str:
    f = p.get("figures") or {}
    if p["name"] == "gpu_tests":
        return ", ".join(f"{f.get(k)} {k}" for k in ("passed", "failed", "error", "skipped") if f.get(k)) or "-"
    if p["name"] == "facts":
        return f"{f.get('device', '-')}"
    if p["name"] == "train_200":
        return (f"{f.get('steps')} steps: loss {_num(f.get('first_loss'))} -> {_num(f.get('last_loss'))}, "
                f"{_num(f.get('tokens_per_s'))} tok/s, {_num(f.get('memory_mb'))} MB allocated, "
                f"{_num(f.get('reserved_mb'))} MB reserved, {f.get('skipped')} skipped")
    if "mbu" in f:
        return (f"{f.get('preset')} {f.get('precision')}: {_num(f.get('tokens_per_s'))} tok/s, MBU {_cell(f.get('mbu'), 'mbu')}; "
                f"HF {_num(f.get('hf_tokens_per_s'))} tok/s, MBU {_cell(f.get('hf_mbu'), 'mbu')}; ratio {_x(f.get('ratio_vs_hf'))}")
    if "tokens_per_s" in f:
        return (f"{f.get('preset')} {f.get('precision')} b{f.get('batch_size')}x{f.get('seq_len')}"
                f"{' compiled' if f.get('compile') else ''}: {_num(f.get('tokens_per_s'))} tok/s, MFU "
                f"{_cell(f.get('mfu'), 'mfu')} of {_num(f.get('peak_tflops'))} TFLOP/s ({f.get('peak_source')}) and "
                f"{_cell(f.get('measured_mfu'), 'mfu')} of the {_num(f.get('measured_peak_tflops'))} TFLOP/s measured "
                f"in the run, {_num(f.get('peak_memory_mb'))} MB; "
                f"HF {_num(f.get('hf_tokens_per_s'))} tok/s, ratio {_x(f.get('ratio_vs_hf'))}"
                + (f"; {f.get('optimizer')}, Newton-Schulz {_num(f['newton_schulz_flops'] / 1e9)} GFLOP a step in "
                   f"{f.get('newton_schulz_dtype')} (counted in MFU)" if f.get("newton_schulz_flops") else ""))
    return "-"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:,.3g}"


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(r: dict[str, Any]) -> str:
    d = r.get("device") or {}
    lines = [f"# GPU check{' (DRY RUN on a CPU: tiny sizes, no GPU figures)' if r.get('dry_run') else ''}", "",
             f"{r.get('started', '?')}, {r.get('seconds')} s in all; `{r.get('command', 'benchmarks/gpu_check.sh')}`", "",
             "| device | driver | torch | CUDA | cuDNN | memory | capability |", "|---|---|---|---|---|---|---|",
             f"| {_cell(d.get('device'))} | {_cell(d.get('driver'))} | {_cell(d.get('torch'))} | {_cell(d.get('cuda'))} "
             f"| {_cell(d.get('cudnn'))} | {_cell(d.get('memory_gib'))} GiB | {_cell(d.get('capability'))} |", "",
             "## Parts", "", "| part | status | seconds (limit) | figures |", "|---|---|---:|---|"]
    for p in r["parts"]:
        lines.append(f"| {p['name']} | **{p['status']}** | {p['seconds']} ({p['limit_s']}) | {_summary(p)} |")
    lines += ["", "## Targets (an H100)", "", "| target | value | met |", "|---|---|---|"]
    for t in r["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {_cell(t['value'], t.get('figure', ''))} | {met} |")
    tests = next((p["figures"] for p in r["parts"] if p["name"] == "gpu_tests" and p["figures"]), None)
    if tests:
        lines += ["", "## GPU tests", "", "| test | outcome | seconds | message |", "|---|---|---:|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | {_cell(t['message'][:160]) if t['message'] else ''} |"
                  for t in tests["tests"]]
    training = next((p["figures"] for p in r["parts"] if p["name"] == "train_200" and p["figures"]), None)
    if training:
        lines += ["", "## Loss curve of the 200-step run", "", "| step | loss |", "|---:|---:|"]
        lines += [f"| {step} | {_cell(loss)} |" for step, loss in training["loss_curve"]]
    for p in r["parts"]:
        if p.get("log_tail"):
            lines += ["", f"## {p['name']}: {p['status']} (exit {p['exit_code']}), end of its log", "", "```",
                      p["log_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["facts"]:
        print(json.dumps(facts()))
        return 0
    if argv[:1] == ["build"] and len(argv) == 3:
        build(Path(argv[1]), Path(argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
