"""The estimator: exact parameter counts, the memory model against measured peak RSS of real
training runs on this CPU, the GPU table, and the CLI."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.config import PRESETS, ModelConfig, build_config
from sab_byon_omni.estimate import estimate, largest_micro_batch, num_parameters
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.optim import make_optimizer


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_exact(preset, tied):
    cfg = ModelConfig.from_name(preset, vocab_size=50000 if preset in ("1b", "3b") else 96, tie_embeddings=tied)
    with torch.device("meta"):  # even the 7.5B preset costs no memory here
        model = CausalTransformer(cfg)
    assert num_parameters(cfg) == model.num_parameters()


def test_3b_preset_is_about_7_5_billion_and_needs_about_16_bytes_per_parameter():
    cfg = ModelConfig.from_name("3b", vocab_size=50000)
    e = estimate(cfg, 2048, 1, "bf16")
    assert 7.3e9 < e.parameters < 7.6e9
    assert (e.weights + e.gradients + e.optimizer) / e.parameters == 16
    assert e.peak > 24e9 and e.peak > 80e9  # the guide's "24 GB" claim is false; one 80 GB GPU is not enough either
    sharded = estimate(cfg, 2048, 1, "bf16", gpus=8, parallel="fsdp", activation_checkpointing=True)
    assert sharded.peak < 80e9
    assert sharded.weights == pytest.approx(e.weights / 8)


def test_breakdown_adds_up_and_grows_with_the_micro_batch(tiny_cfg):
    a = estimate(tiny_cfg, 128, 4, "fp32", device="cuda")
    assert a.peak == pytest.approx(a.weights + a.gradients + a.optimizer + a.activations + max(a.logits, a.workspace)
                                   + a.buffers)
    b = estimate(tiny_cfg, 128, 8, "fp32", device="cuda")
    assert b.activations == pytest.approx(2 * a.activations)
    ac = estimate(tiny_cfg, 128, 8, "fp32", activation_checkpointing=True)
    assert ac.activations < b.activations
    assert ac.hardware_flops_per_token > ac.flops_per_token == b.flops_per_token


def test_flops_per_token_is_about_6n_for_short_contexts():
    cfg = ModelConfig.from_name("lightweight", vocab_size=96)
    e = estimate(cfg, 8, 1, "bf16")
    assert e.flops_per_token == pytest.approx(6 * e.parameters, rel=0.01)


def test_largest_micro_batch_fits_and_the_next_does_not(tiny_cfg):
    budget = estimate(tiny_cfg, 256, 6, "fp32").peak + 1
    mb = largest_micro_batch(tiny_cfg, 256, budget, 64, precision="fp32")
    assert mb == 4  # 6 does not divide 64; 8 does not fit
    assert largest_micro_batch(tiny_cfg, 256, 1000.0, 64, precision="fp32") == 0


# --------------------------------------------------------------------------- measured memory
MEASURE = textwrap.dedent("""
    import json, os, sys, tempfile
    import numpy as np, torch
    torch.set_num_threads(1)
    from sab_byon_omni.config import build_config
    from sab_byon_omni.data.tokenizers import build_tokenizer
    from sab_byon_omni.model.transformer import CausalTransformer
    from sab_byon_omni.training.build import build_run
    from sab_byon_omni.training.trainer import Trainer

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(preset, batch, seq, ac, steps, saving="auto"):
        rng = np.random.default_rng(0)
        data = [rng.integers(1, 96, seq) for _ in range(batch * 2 * steps)]
        cfg = build_config({"model": {"preset": preset, "vocab_size": 96, "max_seq_len": max(seq, 256),
                                      "activation_checkpointing": ac},
                            "data": {"seq_len": seq},
                            "train": {"batch_size": batch, "gradient_accumulation_steps": 2, "max_steps": steps,
                                      "progress": False, "checkpoint_dir": tempfile.mkdtemp(), "precision": "fp32",
                                      "device": "cpu", "memory_saving": saving}})
        Trainer(build_run(CausalTransformer(cfg.model), build_token, data, None, cfg)).fit()

    build_token = build_tokenizer("char96")
    def peak():  # VmHWM: the high-water mark since the last reset
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    run("tiny", 1, 8, False, 1)  # imports, kernels, optimizer machinery: not training memory
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak, so only the measured run counts (not an earlier transient)
    preset, batch, seq, ac, saving = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    run(preset, batch, seq, ac, 2, saving)
    print(json.dumps({"measured": peak() - base}))
""")


def measure_training_peak(preset: str, batch: int, seq: int, ac: bool, saving: bool = False) -> float:
    """Peak RSS growth (bytes) of two optimizer steps of real training in a fresh process: the
    high-water mark is reset after a warm-up run, so import-time transients do not count.

    glibc's malloc keeps freed heap memory mapped, so its RSS depends on allocation order; a fixed
    mmap threshold makes every tensor its own mapping, returned on free, so RSS follows the live
    tensors (what ``torch.cuda.max_memory_allocated`` reports on a GPU)."""
    # a minimal environment and a neutral cwd: the measurement must not depend on what ran before
    keep = ("PATH", "HOME", "PYTHONPATH", "LANG", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, preset, str(batch), str(seq), "1" if ac else "0",
                          "on" if saving else "off"],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["measured"]


@pytest.mark.parametrize("preset,batch,seq,ac,saving", [
    ("tiny", 16, 256, False, False),
    ("tiny", 16, 256, False, True),  # GELU recomputed, v copied out: the memory plan's choice when tight
    pytest.param("tiny", 16, 256, True, False, marks=pytest.mark.slow),
    pytest.param("lightweight", 2, 128, False, False, marks=pytest.mark.slow),  # ~35 s on a loaded 2-core CPU
])
def test_estimate_agrees_with_measured_cpu_peak_within_15_percent(preset, batch, seq, ac, saving):
    check_estimate_against_measurement(preset, batch, seq, ac, saving)


def check_estimate_against_measurement(preset: str, batch: int, seq: int, ac: bool, saving: bool) -> None:
    cfg = ModelConfig.from_name(preset, vocab_size=96, max_seq_len=max(seq, 256))
    fused = make_optimizer(torch.nn.Linear(1, 1), build_config({}).train, torch.device("cpu")).defaults.get("fused")
    predicted = estimate(cfg, seq, batch, "fp32", activation_checkpointing=ac, device="cpu",
                         fused_optimizer=bool(fused), memory_saving=saving).peak
    measured = measure_training_peak(preset, batch, seq, ac, saving)
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**20, measured / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("preset,batch,seq,ac,saving", [
    ("tiny", 32, 256, False, False),
    ("lightweight", 8, 256, False, False),
    ("lightweight", 8, 256, False, True),
    ("lightweight", 8, 256, True, False),
])
def test_estimate_agrees_with_measured_cpu_peak_larger(preset, batch, seq, ac, saving):
    check_estimate_against_measurement(preset, batch, seq, ac, saving)


def test_memory_saving_counts_fewer_activations_and_the_plan_uses_it_only_when_needed(tiny_cfg):
    from sab_byon_omni.estimate import estimate_fitting

    off, on = (estimate(tiny_cfg, 256, 8, "fp32", memory_saving=s) for s in (False, True))
    assert on.activations < off.activations and on.peak < off.peak
    assert on.flops_per_token == off.flops_per_token
    assert estimate_fitting(tiny_cfg, 256, 8, off.peak, precision="fp32").memory_saving is False
    assert estimate_fitting(tiny_cfg, 256, 8, off.peak - 1, precision="fp32").memory_saving is True


# ---------------------------------------------------------------------------------------- CLI
def test_cli_estimate_prints_the_breakdown(capsys):
    assert main(["estimate", "--preset", "3b", "--vocab-size", "50000", "--seq-len", "2048", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("7,452,856,320 parameters", "weights", "gradients", "optimizer", "activations", "peak",
                 "does NOT fit", "GFLOP per token", "epoch of"):
        assert word in out


def test_cli_estimate_says_what_its_epoch_assumes(capsys):
    """'epoch of 4.61M tokens' was 4,500 samples x 1024, though the synthetic samples are ~65 characters."""
    assert main(["estimate", "--preset", "tiny", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "epoch of 4.61M tokens (4,500 training samples x 1,024, as if each filled --seq-len" in out
    assert "8 devices" in out and "device(s)" not in out
    assert main(["estimate", "--preset", "tiny", "--tokens", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "epoch of 1.00M tokens: " in out and "1 device," in out


def test_cli_estimate_names_its_verdicts_unit_and_what_gpus_on_a_cpu_means(capsys, monkeypatch):
    """The verdict's memory is in the peak's unit (GiB) with the GB figure beside it, and --gpus N on
    a machine without CUDA says that it sized N copies of this CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["estimate", "--preset", "tiny", "--gpus", "8", "--memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "(fits in 74.5 GiB = 80 GB)" in out
    assert "note: no GPU here, so --gpus 8 sizes 8 copies of this CPU; --device h100 plans for H100s" in out
    assert main(["estimate", "--preset", "tiny", "--gpus", "8", "--device", "h100"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main(["estimate", "--preset", "tiny"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_cli_estimate_json_matches_the_library():
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["estimate", "--preset", "tiny", "--seq-len", "128", "--batch-size", "2", "--gpus", "4",
                     "--parallel", "fsdp", "--activation-checkpointing", "--json", "--device", "h100"]) == 0
    got = json.loads(buf.getvalue())
    want = estimate(ModelConfig.from_name("tiny", vocab_size=96), 128, 2, "bf16", 4, "fsdp", True)
    assert got["peak"] == pytest.approx(want.peak)
    assert got["activation_checkpointing"] is True and got["fits"] is True


def test_cli_estimate_table(capsys):
    assert main(["estimate", "--table"]) == 0
    out = capsys.readouterr().out
    assert "| 3b | 7.45B | 64 | fsdp | on |" in out and "| lightweight | 42.55M | 8 | ddp |" in out


def test_the_docs_gpu_tables_are_the_generated_ones():
    from pathlib import Path

    from sab_byon_omni.estimate import gpu_table, single_gpu_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "DISTRIBUTED.md").read_text(encoding="utf-8")
    for row in (gpu_table() + "\n" + single_gpu_table()).splitlines():
        assert row in doc, f"docs/DISTRIBUTED.md is out of date (sab-omni estimate --table): {row}"


def test_the_colab_guides_table_is_the_generated_one_with_the_trainers_memory_check():
    import inspect
    from pathlib import Path

    from sab_byon_omni.data.synthetic import MultimodalConsciousnessDataset
    from sab_byon_omni.data.tokenizers import Char96Tokenizer
    from sab_byon_omni.estimate import colab_table
    from sab_byon_omni.training import memory

    defaults = inspect.signature(colab_table).parameters  # the same "fits" as plan_memory's check
    assert (defaults["headroom"].default, defaults["reserve"].default) == (memory.HEADROOM, memory.CUDA_RESERVE)
    train, _ = MultimodalConsciousnessDataset(Char96Tokenizer(), 5000, 1024, seed=1234).split(0.1)
    doc = (Path(__file__).resolve().parents[1] / "COLAB_GUIDE.md").read_text(encoding="utf-8")
    rows = colab_table(train.num_tokens, round(train.num_tokens / len(train))).splitlines()
    assert len(rows) == 6
    for row in rows:
        assert row in doc, f"COLAB_GUIDE.md is out of date (estimate.colab_table): {row}"


@pytest.mark.parametrize("argv", [["--preset", "huge"], ["--mfu", "2"], ["--batch-size", "0"], ["--gpus", "0"]])
def test_cli_estimate_bad_input_is_one_error_line(argv, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("preset,batch,seq,precision,ac", [
    ("lightweight", 8, 1024, "bf16", False),
    ("lightweight", 8, 1024, "bf16", True),
    ("small", 16, 512, "fp32", False),
])
def test_estimate_agrees_with_cuda_max_memory_allocated(preset, batch, seq, precision, ac, tmp_path):
    import numpy as np

    from sab_byon_omni.data.tokenizers import build_tokenizer
    from sab_byon_omni.training.build import build_run
    from sab_byon_omni.training.trainer import Trainer

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = np.random.default_rng(0)
    data = [rng.integers(1, 96, seq) for _ in range(batch * 4)]
    cfg = build_config({"model": {"preset": preset, "vocab_size": 96, "max_seq_len": seq,
                                  "activation_checkpointing": ac},
                        "data": {"seq_len": seq},
                        "train": {"batch_size": batch, "gradient_accumulation_steps": 2, "max_steps": 2,
                                  "progress": False, "checkpoint_dir": str(tmp_path), "precision": precision,
                                  "device": "cuda"}})
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    Trainer(build_run(CausalTransformer(cfg.model), build_tokenizer("char96"), data, None, cfg)).fit()
    measured = torch.cuda.max_memory_allocated() - base
    predicted = estimate(cfg.model, seq, batch, precision, activation_checkpointing=ac, device="cuda").peak
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**20, measured / 2**20)


def test_a_step_estimate_counts_more_than_its_matmuls():
    """The banner's estimate: matmul FLOPs alone were 100-3000x below a tiny model's real step; the
    fixed per-op cost, the memory traffic and the optimizer now count, and grow with what drives them."""
    from sab_byon_omni.config import build_config
    from sab_byon_omni.estimate import AUTOCAST_OP_FACTOR, OPS_PER_BLOCK, OPS_PER_MICRO_BATCH, step_seconds

    tiny = build_config({"model": {"preset": "tiny", "vocab_size": 96}}).model
    deeper = build_config({"model": {"preset": "tiny", "vocab_size": 96, "n_layers": 4}}).model
    costs = dict(matmul_rate=1e11, op_seconds=5e-6, bytes_per_second=2e10)
    matmuls_only = 1e8 / (1e11 * 0.5)
    one = step_seconds(tiny, 1024, 2, 1e8, **costs)
    assert one >= matmuls_only + 2 * (OPS_PER_MICRO_BATCH + 2 * OPS_PER_BLOCK) * 5e-6
    assert one > 10 * matmuls_only  # a tiny model's step is mostly not its matmuls
    assert step_seconds(deeper, 1024, 2, 1e8, **costs) > one
    assert step_seconds(tiny, 1024, 4, 1e8, **costs) > one  # more micro-batches, more fixed cost
    low = step_seconds(tiny, 1024, 2, 1e8, act_bytes=2, **costs)
    assert low > one and AUTOCAST_OP_FACTOR > 1  # autocast's casts
    assert step_seconds(tiny, 1024, 2, 1e8, **{**costs, "op_seconds": 1e-5}) > one  # a busier machine
