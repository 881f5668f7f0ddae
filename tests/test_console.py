"""What the banner says about the model: its preset's name only when the model is that preset."""

from __future__ import annotations

from sab_byon_omni.config import build_config
from sab_byon_omni.training.console import model_label


def test_a_preset_model_is_named_by_its_preset():
    assert model_label(build_config({"model": {"preset": "tiny"}})) == "tiny"


def test_an_imported_model_is_custom_with_its_family_and_source():
    """SmolLM2 via --init_from was labelled 'lightweight: hidden 576, 30 layers'."""
    cfg = build_config({"model": {"preset": "lightweight", "family": "llama", "hidden": 576, "n_heads": 9,
                                  "n_layers": 30, "ffn": 1536},
                        "train": {"init_from": "/some/where/SmolLM2-135M-Instruct.Q4_1.gguf"}})
    assert model_label(cfg) == "custom (family llama, from SmolLM2-135M-Instruct.Q4_1.gguf)"


def test_changed_dimensions_are_custom_even_in_our_family():
    assert model_label(build_config({"model": {"preset": "tiny", "n_layers": 3}})) == "custom (family sab)"


def test_the_model_line_names_the_levers_that_are_on():
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.training.console import levers_on

    assert levers_on(ModelConfig.from_name("tiny", vocab_size=96)) == []
    on = levers_on(ModelConfig.from_name("tiny", vocab_size=96, qk_norm=True, mlp="relu2", logit_softcap=30.0,
                                         document_mask_id=1, zero_init_proj=True))
    assert on == ["qk_norm", "zero_init_proj", "mlp relu2", "logit_softcap 30", "document_mask_id 1"]


def test_the_banner_names_the_architecture_options_that_differ_from_the_sab_model():
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.training.console import architecture_on

    assert architecture_on(ModelConfig.from_name("lightweight", vocab_size=96)) == []
    llama = ModelConfig.from_name("small", vocab_size=50, norm="rmsnorm", mlp="swiglu", n_kv_heads=2)
    assert architecture_on(llama) == ["RMSNorm", "SwiGLU", "2 key/value heads"]
    assert architecture_on(ModelConfig.from_name("tiny", vocab_size=50, n_kv_heads=1)) == ["1 key/value head"]
    neox = ModelConfig.from_name("tiny", vocab_size=50, positions="learned", parallel_residual=True)
    assert architecture_on(neox) == ["learned positions", "parallel residual"]
