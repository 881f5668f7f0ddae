import pytest
import torch

from sab_byon_omni import machine
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.errors import SabError


def test_default_is_the_lightweight_preset_with_char96():
    sab = SABTranscendentV2(device="meta")
    m = sab.config.model
    assert (m.preset, m.hidden, m.n_heads, m.n_layers, m.ffn, m.vocab_size) == ("lightweight", 768, 12, 6, 3072, 96)
    assert sab.tokenizer.name == "char96" and sab.num_parameters() == 42_551_040


def test_the_3b_preset_can_be_inspected_without_memory():
    sab = SABTranscendentV2(preset="3b", device="meta")
    assert next(sab.model.parameters()).device.type == "meta"
    assert 7.2e9 < sab.num_parameters() < 7.3e9  # with the 96-id char96 vocabulary; 7.45B with 50k ids


def test_a_model_too_big_for_ram_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(machine, "memory_budget", lambda device: (1e5, "available RAM (0.0 GiB)"))
    with pytest.raises(SabError, match="'tiny' preset needs .* more than the available RAM"):
        SABTranscendentV2(preset="tiny")


def test_model_api_ids_in_logits_out():
    sab = SABTranscendentV2(preset="tiny")
    ids = torch.tensor([sab.tokenizer.encode("hello")], dtype=torch.int64)
    assert sab.model(ids).shape == (1, 5, sab.tokenizer.vocab_size)
    text = sab.generate("hello", max_new_tokens=12, seed=0)
    assert len(text) == 12 and text == sab.generate("hello", max_new_tokens=12, seed=0)
