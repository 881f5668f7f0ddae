"""The memory estimator with LoRA (estimate.py): adapter parameters counted as the model counts
them, the frozen base in its held dtype, gradients and AdamW state for the adapters only."""

from __future__ import annotations

import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.config import ModelConfig
from sab_byon_omni.estimate import estimate, lora_parameters
from sab_byon_omni.model.lora import adapter_parameters, add_lora
from sab_byon_omni.model.transformer import CausalTransformer

SHAPES = {"sab": {}, "llama": dict(norm="rmsnorm", mlp="swiglu", n_kv_heads=2, qkv_bias=True)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("targets", ["qkv,proj,up,down", "qkv", "down,up"])
def test_the_estimate_counts_what_the_adapted_model_holds(shape, targets):
    cfg = ModelConfig.from_name("tiny", vocab_size=97, **SHAPES[shape])
    model = CausalTransformer(cfg)
    add_lora(model, 4, 8.0, targets=targets, base_dtype=torch.bfloat16)
    adapters = adapter_parameters(model)
    assert lora_parameters(cfg, 4, targets) == adapters
    e = estimate(cfg, 32, 2, "bf16", device="cpu", lora_rank=4, lora_targets=targets, lora_base_bytes=2)
    assert e.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert (e.gradients, e.optimizer) == (4 * adapters, 8 * adapters)
    full = estimate(cfg, 32, 2, "bf16", device="cpu")
    assert e.peak < full.peak and e.activations == full.activations


def test_estimate_cli_takes_a_lora_rank(capsys):
    assert main(["estimate", "--preset", "small", "--lora-rank", "8"]) == 0
    assert "LoRA rank 8 on qkv,proj,up,down: 131,072 trainable parameters" in capsys.readouterr().out
    assert main(["estimate", "--preset", "small", "--lora-rank", "-1"]) == 2
    assert main(["estimate", "--preset", "small", "--lora-rank", "8", "--lora-targets", "gate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown target 'gate'" in err[1], err


def test_estimate_describes_an_imported_model_from_its_header(tmp_path, capsys):
    """`estimate --init_from` reads the GGUF's header (its weights are never read: here there are none
    to read past the header's promise) and says which device it is for."""
    transformers = pytest.importorskip("transformers")
    gguf_files = pytest.importorskip("tests.gguf_files")
    model = gguf_files.random_model()
    path = gguf_files.write_gguf_file(tmp_path / "m.gguf", model)
    n = sum(p.numel() for p in model.parameters())
    assert main(["estimate", "--init_from", str(path), "--lora_rank", "8", "--seq_len", "64", "--batch_size", "2",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: cpu, this machine's") and "measured now" in out[0]
    assert out[1].startswith(f"GGUF file {path} (its header): {n:,} parameters") and "family llama" in out[1]
    assert transformers is not None
    assert main(["estimate", "--preset", "tiny", "--device", "h100"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "device: an H100 SXM (assumed: 80 GB, 989 TFLOP/s bf16; not this machine)"
    assert main(["estimate", "--init_from", str(tmp_path / "nothing.gguf")]) == 2
