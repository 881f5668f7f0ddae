"""Export to transformers (a stock GPT-NeoX folder) and back: same logits, same tokens, same text,
loadable without this package; what cannot be represented is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from sab_byon_omni.config import ModelConfig  # noqa: E402
from sab_byon_omni.data.tokenizers import BPETokenizer, ByteTokenizer, Char96Tokenizer  # noqa: E402
from sab_byon_omni.errors import SabError  # noqa: E402
from sab_byon_omni.interop.hf import load_hf, save_hf  # noqa: E402
from sab_byon_omni.interop.hf_tokenizer import hf_tokenizer_files  # noqa: E402
from sab_byon_omni.model.generate import generate_tokens  # noqa: E402
from sab_byon_omni.model.transformer import CausalTransformer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
transformers.utils.logging.set_verbosity_error()

TEXTS = ["Hello, world! 123", "spaced : a , b . c ! d ? it 's do n't", "café naïve Ångström Straße",
         "日本語のテキスト，中文。한국어", "emoji 😀👍🏽🇷🇴 ok",
         "def f(x):\n\treturn x ** 2  # note\r\n", "sep\x1c\x1d\x1e\x1fend nbsp\u00a0line\u2028ideo\u3000",
         "e\u0301 and a lone \u0301 mark, \u0f73, \uff9e", "<PAD><EOS> typed as text", "½ ﬁ ² Ⅻ ㋿ \U0001fbf5",
         "\x00\x07 controls \u200b", "", "   leading and trailing   "]


def _model(preset: str, vocab: int = 96, step: int = 7, sharpen: float = 1.0, seed: int = 0,
           **model) -> CausalTransformer:
    torch.manual_seed(seed)
    m = CausalTransformer(ModelConfig.from_name(preset, vocab_size=vocab, **model))
    m.fragmergent.set_step(step)
    if sharpen != 1.0:
        with torch.no_grad():  # sharper distributions than the initialisation, so greedy choices are clear
            for p in m.parameters():
                if p.dim() >= 2:
                    p.mul_(sharpen)
    return m.eval()


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny untied model with a non-trivial fragmergent factor, exported once."""
    model = _model("tiny", tie_embeddings=False)
    path = save_hf(model, Char96Tokenizer(), tmp_path_factory.mktemp("hf") / "tiny")
    return model, path


@pytest.mark.parametrize("preset, model_kw", [
    ("tiny", {}),  # head tied to the embedding, factor s != 1 folded into embed_in only
    ("tiny", {"tie_embeddings": False}),
    ("tiny", {"fragmergent_mode": "off"}),
    ("tiny", {"fragmergent_mode": "fixed", "fragmergent_t": 3.0}),
    ("lightweight", {}),
])
def test_transformers_logits_equal_ours(tmp_path, preset, model_kw):
    # sharpened weights: at the initialisation's scale even the erf GELU would pass 1e-4 on tiny
    model = _model(preset, sharpen=3.0, **model_kw)
    assert model.cfg.fragmergent_mode == "off" or model.fragmergent.scale() != 1.0
    save_hf(model, Char96Tokenizer(), tmp_path / "m")
    hf = _hf_model(tmp_path / "m")
    assert type(hf).__name__ == "GPTNeoXForCausalLM" and not hf.config.tie_word_embeddings
    s = model.fragmergent.scale() if model.cfg.fragmergent_mode != "off" else 1.0
    assert torch.equal(hf.gpt_neox.embed_in.weight, model.embed.weight * s)  # folded in
    assert torch.equal(hf.get_output_embeddings().weight, model.head.weight)  # the head is not scaled
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(hf, ids), _logits(model, ids), rtol=0, atol=1e-4)


def _hf_tokenizer(tok, path):
    path.mkdir()
    for name, text in hf_tokenizer_files(tok, 256).items():
        (path / name).write_text(text, encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=320)


@pytest.mark.parametrize("name", ["char96", "byte", "bpe"])
def test_tokenizers_encode_and_decode_like_ours(tmp_path, name, bpe):
    ours = {"char96": Char96Tokenizer(), "byte": ByteTokenizer(), "bpe": bpe}[name]
    hf = _hf_tokenizer(ours, tmp_path / name)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (ours.pad_id, ours.eos_id, None)
    for text in TEXTS + ["".join(TEXTS)]:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    every_id = list(range(ours.vocab_size))  # the specials too (both drop them), and for byte invalid UTF-8
    assert hf.decode(every_id, skip_special_tokens=True) == ours.decode(every_id)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, ours.vocab_size, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), ids


def _char96_hard_cases() -> str:
    """Every character the char96 normaliser treats specially: whitespace, combining marks,
    anything with a compatibility decomposition; plus every 97th code point."""
    every = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]
    return "".join(ch for i, ch in enumerate(every) if ch.isspace() or unicodedata.combining(ch) or i % 97 == 0
                   or unicodedata.normalize("NFKD", ch) != ch)


@pytest.mark.parametrize("chars", [pytest.param(_char96_hard_cases, id="hard-cases"), pytest.param(
    lambda: "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000), id="every-code-point",
    marks=pytest.mark.slow)])
def test_char96_normalisation_matches_ours_character_by_character(tmp_path, chars):
    text = chars()
    ours, hf = Char96Tokenizer(), _hf_tokenizer(Char96Tokenizer(), tmp_path / "c")
    chunks = [text[i:i + 4096] for i in range(0, len(text), 4096)]
    assert hf(chunks)["input_ids"] == [ours.encode(c) for c in chunks]


def test_greedy_generate_gives_our_tokens(tmp_path):
    model = _model("tiny", sharpen=6.0, seed=3)  # a seed whose greedy output is not one token repeated
    save_hf(model, Char96Tokenizer(), tmp_path / "m")
    hf, tok = _hf_model(tmp_path / "m"), transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    prompt = Char96Tokenizer().encode("Consciousness is")
    ours = list(generate_tokens(model, prompt, 20, temperature=0, top_k=None))
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=20, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours
    assert len(set(ours)) > 1
    assert tok.decode(out[0], skip_special_tokens=True) == Char96Tokenizer().decode(prompt + ours)


SUBPROCESS = """
import sys
sys.modules["sab_byon_omni"] = None  # this package cannot be imported here
try:
    import sab_byon_omni
    raise SystemExit("sab_byon_omni was importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, text, out = sys.argv[1:4]
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(ids).logits}, out)
"""


def test_folder_loads_without_this_package_offline(tmp_path, exported):
    model, path = exported
    text = "A café, 日本, and\ttabs."
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    r = subprocess.run([sys.executable, "-c", SUBPROCESS, str(path), text, str(tmp_path / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ids = Char96Tokenizer().encode(text)
    assert got["ids"][0].tolist() == ids
    torch.testing.assert_close(got["logits"], _logits(model, torch.tensor([ids])), rtol=0, atol=1e-4)


def _rebuilt(path):
    cfg, tok, state = load_hf(path)
    model = CausalTransformer(cfg.model)
    model.load_state_dict(state)  # strict
    return cfg, tok, model.eval()


def test_load_hf_round_trip_gives_identical_logits(tmp_path, exported, bpe):
    model, path = exported
    cfg, tok, back = _rebuilt(path)
    assert (cfg.model.fragmergent_mode, cfg.model.tie_embeddings, cfg.model.preset, tok.name) == ("off", False, "tiny",
                                                                                                  "char96")
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    # a folder re-saved by transformers (its own config and tensor names, lm_head.weight) reads back too
    _hf_model(path).save_pretrained(tmp_path / "resaved")
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(_logits(_rebuilt(tmp_path / "resaved")[2], ids), _logits(model, ids), rtol=0, atol=1e-5)
    # equal embedding and head (s == 1) come back tied; a BPE tokenizer comes back as itself
    tied = _model("tiny", vocab=bpe.vocab_size, fragmergent_mode="off")
    save_hf(tied, bpe, tmp_path / "tied")
    cfg, tok, back = _rebuilt(tmp_path / "tied")
    assert cfg.model.tie_embeddings and back.head.weight is back.embed.weight
    assert tok.to_spec() == bpe.to_spec()


def test_clock_mode_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(SabError, match="fragmergent_mode=clock"):
        save_hf(_model("tiny", fragmergent_mode="clock"), Char96Tokenizer(), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path, exported):
    model, _ = exported
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(SabError, match="already exists"):
        save_hf(model, Char96Tokenizer(), tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    with pytest.raises(SabError, match="not a sab-byon-omni export"):  # --force never deletes user files
        save_hf(model, Char96Tokenizer(), tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    (tmp_path / "m" / "keep.txt").unlink()
    save_hf(model, Char96Tokenizer(), tmp_path / "m", overwrite=True)  # an empty folder
    save_hf(model, Char96Tokenizer(), tmp_path / "m", overwrite=True)  # an export of ours
    assert (tmp_path / "m" / "config.json").is_file()


def _edit_config(**changes):
    def edit(path):
        conf = json.loads((path / "config.json").read_text())
        conf.update(changes)
        (path / "config.json").write_text(json.dumps(conf))
    return edit


def _nonzero_bias(path):
    tensors = load_file(str(path / "model.safetensors"))
    tensors["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"][3] = 0.5
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer_json(model_type):
    def edit(path):
        from tokenizers import Tokenizer, models

        model = models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>") if model_type == "WordLevel" else \
            models.BPE({"<unk>": 0, "a": 1}, merges=[])
        (path / "tokenizer.json").write_text(Tokenizer(model).to_str())
    return edit


@pytest.mark.parametrize("edit", [
    _edit_config(use_parallel_residual=True), _edit_config(hidden_act="gelu"),
    _edit_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    _edit_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 1.0}),
    _nonzero_bias, _tokenizer_json("WordLevel"),
], ids=["parallel", "gelu", "partial-rotary", "theta", "bias", "wordlevel"])
def test_a_gpt_neox_unlike_ours_imports_as_gpt_neox_with_transformers_logits(tmp_path, exported, edit):
    """Not our SAB shape, bias or tokenizer: the folder imports as family gpt_neox (parallel
    residual, exact GELU, partial rotary, another base, biases, its own tokenizer as it is) and
    computes what transformers computes from it."""
    import shutil

    shutil.copytree(exported[1], tmp_path / "m")
    edit(tmp_path / "m")
    cfg, tok, back = _rebuilt(tmp_path / "m")
    assert (cfg.model.family, cfg.model.bias, cfg.model.norm_bias, tok.name) == ("gpt_neox", True, True, "hf")
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(back, ids), _logits(_hf_model(tmp_path / "m"), ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("edit, message", [
    (_edit_config(model_type="llama"), "this llama model is not supported: hidden_act 'gelu_pytorch_tanh' is not silu"),
    (_edit_config(num_hidden_layers=3), "no gpt_neox.layers.2"),
    (_edit_config(model_type="gpt_bigcode"), "model_type 'gpt_bigcode' is not supported"),
], ids=["llama", "layers", "unknown"])
def test_a_folder_whose_weights_do_not_fit_is_refused(tmp_path, exported, edit, message):
    import shutil

    shutil.copytree(exported[1], tmp_path / "m")
    edit(tmp_path / "m")
    with pytest.raises(SabError, match=message):
        load_hf(tmp_path / "m")
