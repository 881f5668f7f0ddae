"""save_pretrained / from_pretrained: safetensors + JSON, tied weights once, no pickle, exact round trip."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open

from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, SABTranscendentV2
from sab_byon_omni.data.tokenizers import BPETokenizer
from sab_byon_omni.errors import SabError


def _tiny(**model) -> SABTranscendentV2:
    return SABTranscendentV2(config={"model": {"preset": "tiny", **model}, "data": {"seq_len": 64}})


@pytest.fixture
def no_pickle(monkeypatch):
    """Loading must not unpickle anything: torch.load and pickle.loads explode."""
    def boom(*a, **k):
        raise AssertionError("pickle was used")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)


def test_round_trip_gives_identical_logits_and_stores_tied_weights_once(tmp_path, no_pickle):
    sab = _tiny()
    sab.model.fragmergent.set_step(7)  # a trained model's modulation state travels too
    with torch.no_grad():
        for p in sab.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sab.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == sorted(["README.md", CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE])
    with safe_open(str(tmp_path / "m" / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    assert len({"embed.weight", "head.weight"} & keys) == 1  # the tied matrix is stored once
    state = sab.model.state_dict()
    assert stored == sum(v.numel() for v in state.values()) - state["embed.weight"].numel()

    loaded = SABTranscendentV2.from_pretrained(tmp_path / "m")
    assert loaded.model.head.weight is loaded.model.embed.weight
    assert not loaded.model.training
    ids = torch.randint(1, 96, (2, 33), generator=torch.Generator().manual_seed(0))
    sab.model.eval()
    with torch.no_grad():
        assert torch.equal(sab.model(ids), loaded.model(ids))
    assert loaded.config.model == sab.config.model
    assert loaded.generate("Consciousness is", max_new_tokens=12, temperature=0) == \
        sab.generate("Consciousness is", max_new_tokens=12, temperature=0)


def test_untied_head_and_bpe_tokenizer_survive(tmp_path, no_pickle):
    tok = BPETokenizer.train(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    sab = SABTranscendentV2(config={"model": {"preset": "tiny", "tie_embeddings": False},
                                    "data": {"tokenizer": "bpe", "seq_len": 64}}, tokenizer=tok)
    sab.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / WEIGHTS_FILE), "pt") as f:
        assert {"embed.weight", "head.weight"} <= set(f.keys())
    loaded = SABTranscendentV2.from_pretrained(str(tmp_path / "m"))
    assert loaded.tokenizer.name == "bpe"
    assert loaded.tokenizer.encode("the lazy fox") == tok.encode("the lazy fox")
    ids = torch.tensor([tok.encode("the quick brown fox")])
    sab.model.eval()
    with torch.no_grad():
        assert torch.equal(sab.model(ids), loaded.model(ids))


def test_config_json_is_plain_and_resume_is_dropped(tmp_path):
    sab = _tiny()
    sab.config = build_config({**sab.config.to_dict(), "train": {"resume": "auto"}})
    sab.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert raw["model"]["hidden"] == 64 and raw["train"]["resume"] == "none"


def test_saving_again_replaces_own_files_but_never_a_foreign_config(tmp_path):
    sab = _tiny()
    sab.save_pretrained(tmp_path / "m")
    sab.save_pretrained(tmp_path / "m")  # our own output: fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / CONFIG_FILE).write_text('{"my": "settings"}')
    with pytest.raises(SabError, match="refusing to overwrite"):
        sab.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / CONFIG_FILE).read_text() == '{"my": "settings"}'


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(SabError, match="not found"):
        SABTranscendentV2.from_pretrained(tmp_path / "missing")
    sab = _tiny()
    sab.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(SabError, match="JSON"):
        SABTranscendentV2.from_pretrained(tmp_path / "m")
    sab.save_pretrained(tmp_path / "n")
    raw = json.loads((tmp_path / "n" / CONFIG_FILE).read_text())
    raw["model"]["n_layers"] = 3  # weights for 2 layers, config for 3
    (tmp_path / "n" / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(SabError, match="do not fit"):
        SABTranscendentV2.from_pretrained(tmp_path / "n")
    (tmp_path / "n" / WEIGHTS_FILE).unlink()
    with pytest.raises(SabError, match=WEIGHTS_FILE):
        SABTranscendentV2.from_pretrained(tmp_path / "n")
    with pytest.raises(SabError, match="Hub"):
        SABTranscendentV2.from_pretrained("nobody/nothing", local_files_only=True)


def test_push_to_hub_is_available_but_not_run():
    assert callable(SABTranscendentV2.push_to_hub)
