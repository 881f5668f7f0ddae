"""The Colab notebook runs top to bottom, headless on CPU, with tiny parameters, and resumes a run.

Parameters are injected the way papermill does it: a cell tagged ``injected-parameters`` placed
right after the cell tagged ``parameters``.
"""

import json
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from sab_byon_omni import device as P

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "SAB_BYON_OMNI_v2.ipynb"
TINY = dict(PRESET="tiny", EPOCHS=1, BATCH_SIZE=8, GRAD_ACCUM=2, SEQ_LEN=128, NUM_SAMPLES=120,
            LEARNING_RATE=3e-3, WARMUP_STEPS=2, SAVE_EVERY=3, LOG_INTERVAL=1, RUN_NAME="ci", USE_DRIVE=False,
            MAX_NEW_TOKENS=20, PRECISION="auto")


def load() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def with_parameters(nb: nbformat.NotebookNode, **params) -> nbformat.NotebookNode:
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# injected by tests/test_notebook.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def execute(tmp_path: Path, **params) -> tuple[nbformat.NotebookNode, str]:
    nb = with_parameters(load(), **params)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") if out.output_type == "stream" else json.dumps(out.get("data", {}))[:2000])
    return nb, "".join(text)


def test_committed_notebook_is_clean_and_parameterised():
    nb = load()
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    lines = [line for line in tagged[0].source.splitlines() if "=" in line and not line.startswith("#")]
    names = {line.split("=")[0].strip() for line in lines}
    assert set(TINY) <= names  # every value CI overrides exists in the notebook


def _install_source(tmp_path, monkeypatch, importable: bool, install_from: str = ""):
    """The install cell's decision, run in ``tmp_path`` with the package (not) importable."""
    cell = next(c for c in load().cells if c.cell_type == "code" and "def install_source" in c.source)
    ns = {"__name__": "cell", "INSTALL_FROM": install_from}
    exec(cell.source.split("source = install_source()")[0], ns)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real(name, *a) if importable else None) if name == "sab_byon_omni"
                        else real(name, *a))
    monkeypatch.chdir(tmp_path)
    return ns["install_source"]()


def test_the_install_cell_needs_no_editing(tmp_path, monkeypatch):
    assert _install_source(tmp_path, monkeypatch, importable=True) is None  # already installed: nothing
    with __import__("pytest").raises(RuntimeError, match="upload a wheel"):
        _install_source(tmp_path, monkeypatch, importable=False)
    assert _install_source(tmp_path, monkeypatch, False, "git+https://example/x.git") == "git+https://example/x.git"
    (tmp_path / "repo" / "sab_byon_omni").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text("[project]\nname = 'sab-byon-omni'\n")
    (tmp_path / "repo" / "colab").mkdir()
    assert _install_source(tmp_path / "repo" / "colab", monkeypatch, False) == str(tmp_path / "repo")  # a checkout
    (tmp_path / "repo" / "colab" / "sab_byon_omni-2.1.0-py3-none-any.whl").write_bytes(b"")
    assert _install_source(tmp_path / "repo" / "colab", monkeypatch, False) == "sab_byon_omni-2.1.0-py3-none-any.whl"


def test_default_parameters_are_the_lightweight_recipe():
    from sab_byon_omni.config import load_config

    params: dict = {}
    cell = next(c for c in load().cells if "parameters" in c.metadata.get("tags", []))
    exec(cell.source, params)
    cfg = load_config(NOTEBOOK.parents[1] / "configs" / "lightweight.yaml")
    assert params["PRESET"] == cfg.model.preset
    assert (params["NUM_SAMPLES"], params["SEQ_LEN"]) == (cfg.data.num_samples, cfg.data.seq_len)
    t = cfg.train
    assert (params["EPOCHS"], params["BATCH_SIZE"], params["GRAD_ACCUM"], params["LEARNING_RATE"],
            params["LR_SCHEDULE"], params["WARMUP_STEPS"], params["WEIGHT_DECAY"]) == \
        (t.epochs, t.batch_size, t.gradient_accumulation_steps, t.learning_rate, t.lr_schedule, t.warmup_steps,
         t.weight_decay)


def test_runtime_detection_picks_fp16_on_t4_and_bf16_on_a100(monkeypatch):
    """What the notebook's runtime cell reports, with the GPU faked (resolve_precision is the logic)."""
    cuda = torch.device("cuda")
    for capability, expected in (((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        # T4, V100 (whose is_bf16_supported() is True through emulation), then A100, H100
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert P.resolve_precision("auto", cuda) == expected
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda n=native: n)
        assert P.resolve_precision("auto", torch.device("cpu")) == expected


def test_notebook_runs_headless_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "runs" / "ci"

    nb, out = execute(tmp_path, **TINY)
    assert "precision fp32" in out or "precision bf16" in out
    assert (run / "epoch_1.pt").is_file() and (run / "best_model.pt").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "lr" in r for r in rows) and any("val_loss" in r for r in rows)
    png = run / "metrics.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
    assert sorted(p.name for p in (run / "pretrained").iterdir()) == \
        ["README.md", "config.json", "model.safetensors", "sab_tokenizer.json"]
    assert "Consciousness is" in out

    # A "disconnect": a fresh kernel runs everything again with one more epoch; it must continue.
    steps_before = max(r["step"] for r in rows)
    nb, out = execute(tmp_path, **{**TINY, "EPOCHS": 2})
    assert "resumed from" in out
    assert (run / "epoch_2.pt").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in rows if r["epoch"] == 2) == steps_before + 1
