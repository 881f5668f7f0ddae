"""The training step on a GPU: mixed precision against fp32, the GradScaler, the SDPA kernels,
torch.compile, and checkpoints that load without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.gpu.conftest import make_trainer, train_losses, with_scaler
from tests.test_checkpoint import saved_locations

pytestmark = pytest.mark.gpu

STEPS = 20
# Largest |loss - fp32 loss| (nats per token) over 20 steps of the same model, data and seed.
# bf16 keeps 8 bits of mantissa, fp16 11 (with loss scaling): the losses start near ln(96) = 4.56.
TOLERANCE = {"bf16": 0.05, "fp16": 0.02}


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    cache: dict = {}
    return cache


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_follows_fp32_over_20_steps(dev, sizes, tmp_path, precision, fp32_losses):
    if "ref" not in fp32_losses:
        fp32_losses["ref"] = train_losses(make_trainer(tmp_path / "fp32", dev, sizes, "fp32"), STEPS)
    ref = fp32_losses["ref"]
    trainer = make_trainer(tmp_path / precision, dev, sizes, precision)
    assert trainer.run.precision.name == precision and trainer.run.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":  # a scale that cannot overflow at once: the default 65536 may calibrate by skipping
        trainer = with_scaler(trainer, torch.amp.GradScaler(dev.type, init_scale=2.0**12))  # steps (the next test skips one)
    got = train_losses(trainer, STEPS)
    worst = max(abs(a - b) for a, b in zip(got, ref))
    assert worst <= TOLERANCE[precision], (precision, worst, got, ref)
    assert got[-1] < got[0] - 0.3 and ref[-1] < ref[0] - 0.3  # both really trained
    assert trainer.state.skipped_steps == 0


def test_grad_scaler_skips_an_injected_inf_step_and_its_scale_recovers(dev, sizes, tmp_path):
    trainer = make_trainer(tmp_path / "fp16", dev, sizes, "fp16")
    trainer = with_scaler(trainer, torch.amp.GradScaler(dev.type, init_scale=2.0**10, growth_interval=3))
    train_losses(trainer, 1)
    scale = trainer.run.scaler.get_scale()
    batches = trainer.epoch_batches(0, start=trainer.state.cursor)
    trainer.forward_backward([next(batches)])
    param = trainer.raw.blocks[0].mlp.up.weight
    before = param.detach().clone()
    param.grad[0, 0] = math.inf  # an overflow in the scaled fp16 gradients
    assert not math.isfinite(trainer.optimizer_step())
    assert torch.equal(param.detach(), before)  # the step was skipped, AdamW untouched
    assert trainer.run.scaler.get_scale() == scale / 2 and trainer.state.skipped_steps == 1
    losses = train_losses(trainer, 3)  # growth_interval clean steps double it back
    assert trainer.run.scaler.get_scale() == scale and all(math.isfinite(x) for x in losses)
    assert not torch.equal(param.detach(), before)


def test_training_step_runs_on_the_flash_or_memory_efficient_attention_kernel(dev, sizes, tmp_path):
    """Restricted to them, SDPA raises if our attention needed the math kernel (a T x T matrix)."""
    precision = "bf16" if dev.type == "cpu" or torch.cuda.get_device_capability(dev) >= (8, 0) else "fp16"
    trainer = make_trainer(tmp_path / "ck", dev, sizes, precision)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        losses = train_losses(trainer, 2)
        ids = torch.randint(1, 96, (1, 40), device=dev)
        from sab_byon_omni.model.generate import generate_tokens
        from sab_byon_omni.model.transformer import KVCache

        with trainer.run.precision.autocast(), torch.inference_mode():  # generation: the prompt, then one token
            cache = KVCache.empty(trainer.raw.cfg, 1, 64, dev, torch.bfloat16 if precision == "bf16" else torch.half)
            trainer.raw(ids[:, :39], cache=cache)
            trainer.raw(ids[:, 39:], cache=cache)
            assert len(list(generate_tokens(trainer.raw, ids[0].tolist(), 5, temperature=0))) == 5
    assert all(math.isfinite(x) for x in losses)


def test_compiled_training_step_matches_eager(cuda_only, sizes, tmp_path):
    eager = train_losses(make_trainer(tmp_path / "eager", cuda_only, sizes, "bf16"), 3)
    compiled = make_trainer(tmp_path / "compiled", cuda_only, sizes, "bf16", compile=True)
    assert compiled.run.wrapped is not compiled.run.model  # the OptimizedModule
    got = train_losses(compiled, 3)
    assert max(abs(a - b) for a, b in zip(got, eager)) <= TOLERANCE["bf16"], (got, eager)


def test_checkpoint_saved_from_the_device_loads_on_a_machine_without_cuda(dev, sizes, tmp_path):
    trainer = make_trainer(tmp_path / "ck", dev, sizes, "fp32")
    train_losses(trainer, 1)
    assert next(trainer.raw.parameters()).device.type == dev.type
    path = trainer.save_checkpoint("step_1", loss=1.0)
    assert saved_locations(path) == {"cpu"}  # no cuda:0 in the file: torch.load works anywhere
    ck = torch.load(path, weights_only=True)
    state = ck["optimizer_state_dict"]["state"]
    assert state and all(t.device.type == "cpu" for s in state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_muon_trains_in_mixed_precision_and_skips_a_non_finite_step(dev, sizes, tmp_path, precision):
    """``optimizer: muon`` (Newton-Schulz in bf16 on CUDA) learns under autocast, and with fp16 the
    GradScaler's skipped step leaves Muon's matrices and momentum untouched."""
    trainer = make_trainer(tmp_path / precision, dev, sizes, precision, optimizer="muon", muon_learning_rate=0.05)
    if precision == "fp16":
        trainer = with_scaler(trainer, torch.amp.GradScaler(dev.type, init_scale=2.0**12))
    losses = train_losses(trainer, STEPS)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses
    if precision == "fp16":
        batches = trainer.epoch_batches(0, start=trainer.state.cursor)
        trainer.forward_backward([next(batches)])
        param = trainer.raw.blocks[0].attn.qkv.weight
        before, buf = param.detach().clone(), trainer.run.optimizer.state[param]["momentum_buffer"].clone()
        param.grad[0, 0] = math.inf
        assert not math.isfinite(trainer.optimizer_step())
        assert torch.equal(param.detach(), before) and torch.equal(trainer.run.optimizer.state[param]["momentum_buffer"], buf)
