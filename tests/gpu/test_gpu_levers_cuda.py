"""Issue 25's GPU levers, on the device: Muon's Newton-Schulz dtype by the device's capability,
TF32 on and off, compiled blocks without recompiles over variable lengths, DDP's options. They run
with ``-m gpu`` on a GPU machine (benchmarks/gpu_check.sh); the dry run skips them (a CPU has
no capability, TF32 or NCCL, and compile is switched off there)."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_muon_iterates_in_bf16_only_where_the_device_has_it(cuda_only, monkeypatch):
    from sab_byon_omni.training.muon import NS_DTYPE_ENV, Muon, newton_schulz_dtype

    monkeypatch.delenv(NS_DTYPE_ENV, raising=False)
    native = torch.cuda.get_device_capability(cuda_only) >= (8, 0)  # sm_80+: A100, H100, RTX 30xx/40xx
    want = torch.bfloat16 if native else torch.float32  # T4, V100: bf16 is emulated there
    assert newton_schulz_dtype(cuda_only) == want
    w = torch.nn.Parameter(torch.randn(64, 32, device=cuda_only))
    w.grad = torch.randn_like(w)
    opt = Muon([w])
    opt.step()
    assert opt.ns_dtypes[cuda_only] == want and torch.isfinite(w).all()


def test_tf32_is_on_for_fp32_unless_the_run_is_deterministic(cuda_only):
    from sab_byon_omni.device import set_fp32_matmul

    before = torch.get_float32_matmul_precision()
    try:
        assert set_fp32_matmul(cuda_only, deterministic=False) == "high"
        a = torch.randn(2048, 2048, device=cuda_only)
        fast = a @ a
        assert set_fp32_matmul(cuda_only, deterministic=True) == "highest"
        exact = a @ a
        reference = (a.double() @ a.double()).float()
        # TF32 keeps a 10-bit mantissa for the products: visibly less exact than fp32 (sm_80+)
        if torch.cuda.get_device_capability(cuda_only) >= (8, 0):
            assert (fast - reference).abs().max() > 4 * (exact - reference).abs().max()
    finally:
        torch.set_float32_matmul_precision(before)


def test_compiled_blocks_do_not_recompile_over_variable_lengths(cuda_only, tmp_path):
    from torch._dynamo.utils import counters

    from sab_byon_omni.config import build_config
    from sab_byon_omni.training.launch import run_training

    torch._dynamo.reset()
    counters.clear()
    cfg = build_config(dict(preset="small", num_samples=200, seq_len=256, batch_size=4, gradient_accumulation_steps=1,
                            epochs=1, max_steps=10, precision="bf16", device="cuda", progress=False, compile=True,
                            checkpoint_dir=str(tmp_path / "run")))
    _, result = run_training(cfg)
    assert result.global_step == 10
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # training, and validation
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_ddp_neither_broadcasts_buffers_nor_keeps_a_second_gradient_copy(cuda_only):
    import torch.distributed as dist

    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.model.transformer import CausalTransformer
    from sab_byon_omni.training import distributed as D

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96)).to(cuda_only)
        ddp = D.wrap_ddp(model, D.DistInfo(world=2, rank=0, local_rank=cuda_only.index or 0), cuda_only)
        assert ddp.broadcast_buffers is False and ddp.gradient_as_bucket_view is True
        ddp(torch.randint(0, 96, (2, 32), device=cuda_only)).float().square().mean().backward()
        for _ in range(2):  # the second step's gradients land in the buckets' storage
            ddp.zero_grad(set_to_none=False)
            ddp(torch.randint(0, 96, (2, 32), device=cuda_only)).float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()
