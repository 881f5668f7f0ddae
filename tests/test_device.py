"""The CUDA decisions that can be checked without a GPU: the data-sheet peak by whole device
name, what deterministic mode sets up, bf16 only where the hardware has it, and FSDP's refusal of
fp16 with the way out."""

from __future__ import annotations

import os

import pytest
import torch

from sab_byon_omni import device as P
from sab_byon_omni import machine as M
from sab_byon_omni.config import build_config
from sab_byon_omni.errors import SabError


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA L40", "bf16", 181.0), ("NVIDIA L40S", "fp16", 362.1),
    ("NVIDIA L4", "bf16", 121.0), ("NVIDIA A100-SXM4-40GB", "bf16", 312.0), ("Tesla T4", "fp16", 65.0),
    ("NVIDIA RTX A1000", "bf16", None), ("Tesla T4", "bf16", None),
    # the cards people own (issue 25): exact names only
    ("NVIDIA GeForce RTX 3090", "bf16", 71.0), ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA GeForce RTX 5090", "fp16", 209.5), ("NVIDIA RTX A6000", "bf16", 154.8),
    ("NVIDIA RTX 6000 Ada Generation", "bf16", 364.2), ("NVIDIA A10", "bf16", 125.0), ("NVIDIA A10G", "bf16", 70.0),
    ("NVIDIA GH200 480GB", "bf16", 989.4), ("NVIDIA B200", "bf16", 2250.0), ("NVIDIA H20", "bf16", 148.0),
    ("NVIDIA A100-PCIE-40GB", "bf16", 312.0), ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("NVIDIA GeForce RTX 4090 D", "bf16", None), ("NVIDIA GeForce RTX 4090 Laptop GPU", "bf16", None),
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", None), ("NVIDIA RTX 6000", "bf16", None), ("NVIDIA B200", "fp32", None),
    ("NVIDIA H200 NVL", "bf16", None), ("NVIDIA A100X", "bf16", None), ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
])
def test_the_peak_table_matches_whole_device_names(name, precision, tflops):
    assert M.gpu_peak_tflops(name, precision)[0] == tflops


def test_fp32_peaks_follow_the_tf32_setting():
    assert M.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", allow_tf32=True) == (156.0, "table: A100 tf32")
    assert M.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", allow_tf32=False)[0] == 19.5


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_on_cuda_is_strict_and_fixes_the_cublas_workspace(monkeypatch, restore_determinism):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    P.set_deterministic(torch.device("cuda"))  # touches no GPU: the environment and a global switch
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
    P.set_deterministic(torch.device("cuda"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_mode_on_cpu_only_warns(monkeypatch, restore_determinism):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    P.set_deterministic(torch.device("cpu"))
    assert torch.is_deterministic_algorithms_warn_only_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_a_deterministic_run_after_cuda_was_used_warns_that_it_is_best_effort(monkeypatch, restore_determinism,
                                                                            caplog):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after a CUDA matmul in this process
    P.set_deterministic(torch.device("cuda"))
    assert "best-effort" in caplog.text and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # set in time: no warning
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    P.set_deterministic(torch.device("cuda"))
    assert "best-effort" not in caplog.text


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_tf32_is_on_for_fp32_matmuls_on_cuda_unless_the_run_is_deterministic(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert P.set_fp32_matmul(torch.device("cpu"), deterministic=False) == "highest"  # a CPU is left alone
    assert P.set_fp32_matmul(torch.device("cuda"), deterministic=False) == "high"  # a global switch: no GPU needed
    assert torch.backends.cuda.matmul.allow_tf32
    assert M.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == (494.7, "table: H100 tf32")  # MFU's peak follows
    assert P.set_fp32_matmul(torch.device("cuda"), deterministic=True) == "highest"
    assert M.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == (66.9, "table: H100 fp32")


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_accepted_only_where_the_gpu_has_it(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # emulation counts
    cuda = torch.device("cuda")
    assert P.native_cuda_bf16(cuda) is native
    if native:
        assert P.resolve_precision("bf16", cuda) == "bf16"
    else:
        with pytest.raises(SabError, match=r"Tesla T4 \(sm_7\d\) has no native bf16.*--precision fp16"):
            P.resolve_precision("bf16", cuda)
    assert P.resolve_precision("fp16", cuda) == "fp16"


def test_fsdp_with_fp16_is_refused_with_what_to_use_instead(monkeypatch):
    from sab_byon_omni.training import distributed as D
    from sab_byon_omni.training.build import build_run

    monkeypatch.setattr(D, "init_distributed", lambda device_type: D.DistInfo(world=2, rank=0))
    cfg = build_config({"preset": "tiny", "parallel": "fsdp", "precision": "fp16", "device": "cpu"})
    with pytest.raises(SabError, match="--parallel ddp with fp16 on older ones"):
        build_run(torch.nn.Linear(1, 1), None, [], None, cfg)


@pytest.mark.parametrize("world", [1, 2])
def test_fsdp_with_muon_is_refused_with_what_to_use_instead(monkeypatch, world):
    from sab_byon_omni.training import distributed as D
    from sab_byon_omni.training.build import build_run

    monkeypatch.setattr(D, "init_distributed", lambda device_type: D.DistInfo(world=world, rank=0))
    cfg = build_config({"preset": "tiny", "parallel": "fsdp", "optimizer": "muon", "device": "cpu"})
    with pytest.raises(SabError, match="optimizer=muon with train.parallel=fsdp .* --parallel ddp, or --optimizer adamw"):
        build_run(torch.nn.Linear(1, 1), None, [], None, cfg)


@pytest.mark.parametrize("flags, opt_out, expected", [
    ({"avx2", "fma"}, None, "fp32"),  # AVX2-only (EPYC Zen 2/3): bf16 would run emulated
    ({"avx2", "avx512f", "avx512_bf16"}, None, "bf16"),  # AVX-512 BF16 (Cooper Lake, Zen 4)
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, None, "bf16"),  # AMX (Sapphire Rapids)
    ({"avx2", "avx512_bf16", "amx_bf16"}, "0", "fp32"),  # SAB_CPU_NATIVE_BF16=0: as on an AVX2-only CPU
    ({"avx2", "avx512_bf16", "amx_bf16"}, "off", "fp32"),
    ({"avx2", "avx512_bf16", "amx_bf16"}, "1", "bf16"),  # no opt-out: the flags decide
    ({"avx2", "fma"}, "1", "fp32"),  # nor does it switch bf16 on where the CPU lacks it
])
def test_auto_precision_on_a_cpu_follows_its_native_bf16(monkeypatch, flags, opt_out, expected):
    monkeypatch.setattr(M, "cpu_flags", lambda: flags)
    if opt_out is None:
        monkeypatch.delenv(M.NATIVE_BF16_OPT_OUT, raising=False)
    else:
        monkeypatch.setenv(M.NATIVE_BF16_OPT_OUT, opt_out)
    assert M.cpu_has_native_bf16() is (expected == "bf16")
    assert P.resolve_precision("auto", torch.device("cpu")) == expected
    assert P.resolve_precision("fp32", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("trained, native_bf16, expected", [
    ("auto", True, "bf16"), ("auto", False, "fp32"),  # auto resolved on this CPU
    ("fp32", True, "fp32"), ("fp32", False, "fp32"),
    ("bf16", True, "bf16"),
    ("bf16", False, "fp32"),  # emulated bf16 would be far slower: this CPU's own choice
    ("fp16", True, "bf16"), ("fp16", False, "fp32"),  # no CPU here computes in fp16 natively
])
def test_eval_precision_is_the_trained_one_where_the_cpu_has_it(monkeypatch, trained, native_bf16, expected):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native_bf16)
    name, why = P.trained_precision(trained, torch.device("cpu"))
    assert name == expected and f"train.precision={trained}" in why
    assert P.runs_natively(name, torch.device("cpu"))


@pytest.mark.parametrize("trained, capability, expected", [
    ("bf16", (8, 0), "bf16"), ("bf16", (7, 5), "fp16"),  # a bf16 model on a T4: fp16, as auto there
    ("fp16", (7, 5), "fp16"), ("fp32", (9, 0), "fp32"), ("auto", (9, 0), "bf16"),
])
def test_eval_precision_on_a_gpu(monkeypatch, trained, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert P.trained_precision(trained, torch.device("cuda"))[0] == expected
