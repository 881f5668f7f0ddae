"""LoRA (model/lora.py) and a LoRA run: the merged forward equals the adapted one, the adapted model
starts as its base, only the adapters train, every source and export is the merged model, bad
settings are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.config import ModelConfig
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.files.checkpoint import load_checkpoint
from sab_byon_omni.model.lora import LoRALinear, adapter_parameters, add_lora, merge_lora, merged_state_dict
from sab_byon_omni.model.transformer import CausalTransformer
from tests.helpers import tiny_config, trainer_for

LLAMA = dict(family="llama", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, qkv_bias=True)


def model(**options) -> CausalTransformer:
    torch.manual_seed(0)
    return CausalTransformer(ModelConfig.from_name("tiny", vocab_size=97, **options)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [{}, LLAMA], ids=["sab", "llama"])
def test_the_adapted_model_starts_as_its_base_and_merges_to_its_own_forward(options):
    m = model(**options)
    with torch.no_grad():
        base = m(ids())
    names = add_lora(m, rank=4, alpha=8.0)
    assert len(names) == 4 * m.cfg.n_layers and isinstance(m.blocks[1].mlp.down, LoRALinear)
    with torch.no_grad():
        assert torch.equal(m(ids()), base)  # B = 0: the update is exactly zero
        for layer in (mod for mod in m.modules() if isinstance(mod, LoRALinear)):
            layer.lora_B.normal_(0, 0.05)  # as if trained
        adapted = m(ids())
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    state = merged_state_dict(m.state_dict())
    assert merge_lora(m) == len(names) and not any(isinstance(x, LoRALinear) for x in m.modules())
    with torch.no_grad():
        torch.testing.assert_close(m(ids()), adapted, rtol=0, atol=1e-5)
    plain = model(**options)
    plain.load_state_dict(state)  # the folded state dict is the base architecture's
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()), adapted, rtol=0, atol=1e-5)


def test_a_state_dict_without_adapters_is_left_as_it_is():
    state = model().state_dict()
    assert merged_state_dict(state) is state


def test_only_the_adapters_get_gradients_and_change(tmp_path):
    cfg = tiny_config(tmp_path, precision="fp32", max_steps=2, lora_rank=4, lora_targets="qkv,down",
                      learning_rate=1e-2)
    trainer = trainer_for(cfg)
    run = trainer.run
    before = {k: v.detach().clone() for k, v in run.model.named_parameters()}
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.qkv", "mlp.down")
                         for ab in "AB"}
    optimized = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in run.model.parameters() if p.requires_grad}
    assert sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]) == adapter_parameters(run.model)
    trainer.fit()
    for name, value in run.model.named_parameters():
        changed = not torch.equal(before[name], value)
        assert changed == (name.rpartition(".")[2] in ("lora_A", "lora_B")), name


@pytest.fixture
def base(in_tmp) -> Path:
    torch.manual_seed(3)
    sab = SABTranscendentV2(preset="tiny")
    sab.save_pretrained(in_tmp / "base")
    return in_tmp / "base"


RUN = ["-q", "train", "--epochs", "1", "--num_samples", "60", "--seq_len", "32", "--batch_size", "4",
       "--gradient_accumulation_steps", "1", "--max_steps", "3", "--precision", "fp32", "--progress", "false",
       "--learning_rate", "0.02"]


def test_export_of_a_lora_run_is_the_merged_model(base, in_tmp):
    assert main([*RUN, "--init_from", str(base), "--checkpoint_dir", "run", "--lora_rank", "4"]) == 0
    ck = load_checkpoint(Path("run") / "step_3.pt")
    state = ck["model_state_dict"]
    assert any(k.endswith("lora_B") for k in state) and state["blocks.0.attn.qkv.weight"].dtype == torch.float32
    adapted = CausalTransformer(ModelConfig(**ck["config"]["model"]))
    add_lora(adapted, 4, 16.0)
    adapted.load_state_dict(state)  # the run's own model, adapters apart
    with torch.no_grad():
        want = adapted.eval()(ids() % 96)
    for fmt, path in (("safetensors", "out.safetensors"), ("hf", "hf_out"), ("pt", "out.pt")):
        assert main(["-q", "export", "--checkpoint", "run/step_3.pt", "--format", fmt, "--output", path]) == 0, fmt
        exported = SABTranscendentV2.load(path)
        assert not any(isinstance(m, LoRALinear) for m in exported.model.modules())
        with torch.no_grad():
            torch.testing.assert_close(exported.model.eval()(ids() % 96), want, rtol=0, atol=1e-5, msg=fmt)
    assert main(["-q", "generate", "--checkpoint", "run/step_3.pt", "--prompt", "a", "--max_new_tokens", "4"]) == 0
    assert main(["-q", "eval", "--checkpoint", "run/step_3.pt"]) == 0


def test_a_resume_with_other_lora_settings_is_refused(base, in_tmp, capsys):
    args = [*RUN, "--init_from", str(base), "--checkpoint_dir", "run", "--resume", "auto"]
    assert main([*args, "--lora_rank", "4", "--max_steps", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--lora_rank", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LoRA rank 4" in err[0] and "LoRA rank 8" in err[0], err
    assert main([*args, "--lora_rank", "4", "--lora_alpha", "4"]) == 2  # another scale of the same adapters
    assert "alpha 16.0" in capsys.readouterr().err
    assert main([*args, "--lora_rank", "4", "--max_steps", "2"]) == 0  # the same command continues it


@pytest.mark.parametrize("flags, needle", [
    (["--lora_rank", "-1"], "train.lora_rank=-1 must not be negative"),
    (["--lora_rank", "4", "--lora_targets", "qkv,gate"], "unknown target 'gate'"),
    (["--lora_rank", "4", "--lora_targets", ","], "names no projection"),
    (["--lora_rank", "4", "--lora_alpha", "0"], "train.lora_alpha=0.0 must be positive"),
    (["--lora_rank", "4", "--lora_dropout", "1"], "train.lora_dropout=1.0 must be in [0, 1)"),
    (["--lora_rank", "4", "--optimizer", "muon"], "optimizer=muon with train.lora_rank"),
    (["--lora_rank", "4", "--lora_alpha", "1e30"], "more than 10,000: the run would diverge"),  # it trained to NaN
    (["--lora_rank", "800"], "train.lora_rank=800 exceeds the smallest adapted projection's dimension (768)"),
])
def test_bad_lora_settings_are_one_line(flags, needle, in_tmp, capsys):
    assert main([*RUN, "--checkpoint_dir", "run", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]  # (a warning about LoRA from scratch may come first)
    assert len(errors) == 1 and needle in errors[0] and len(err) <= 2 and "Traceback" not in "".join(err), err
    assert not Path("run").exists()
