"""Import and export of the open families (Llama 3 with llama3 rope scaling, TinyLlama/Llama 2,
Mistral, Qwen2, GPT-2, Pythia/GPT-NeoX): tiny models written by transformers in the test, read
by every command that takes a model, with logits within 1e-4 of transformers' own (fp32) and the
same greedy tokens; exported back in their own architecture, loadable without this package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sab_byon_omni.cli import main  # noqa: E402
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2  # noqa: E402
from sab_byon_omni.interop.hf import from_hf_parts, load_hf, save_hf, to_hf_parts  # noqa: E402
from sab_byon_omni.model.generate import generate_tokens  # noqa: E402
from tests.hf_models import CONTEXT, FAMILIES, TEXTS, write_family  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
transformers.utils.logging.set_verbosity_error()
ARCHITECTURE = {"llama": "LlamaForCausalLM", "tinyllama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "pythia": "GPTNeoXForCausalLM"}
FAMILY = {"tinyllama": "llama", "pythia": "gpt_neox"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (folder, the transformers model written there)."""
    root = tmp_path_factory.mktemp("families")
    return {f: (root / f, write_family(root / f, f, seed=i, sharpen=4.0)) for i, f in enumerate(FAMILIES)}


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, CONTEXT - 4), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ours(path) -> SABTranscendentV2:
    sab = SABTranscendentV2.load(path)
    sab.model.float().eval()  # fp32 (the test pins the precision: no autocast below)
    return sab


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers_and_greedy_tokens_too(folders, family):
    path, theirs = folders[family]
    sab = _ours(path)
    m = sab.config.model
    assert (m.family, m.fragmergent_mode, sab.tokenizer.name) == (FAMILY.get(family, family), "off", "hf")
    ids = _ids(m.vocab_size)
    with torch.no_grad():
        ours = sab.model(ids)
    theirs_logits = _hf_logits(theirs, ids)
    assert theirs_logits.abs().max() > 1.0  # logits far from zero: a wrong weight would show
    torch.testing.assert_close(ours, theirs_logits, rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = sab.tokenizer.encode("Hello world! The quick")
    assert prompt == tok("Hello world! The quick")["input_ids"]
    mine = list(generate_tokens(sab.model, prompt, 16, temperature=0, top_k=None, eos_id=sab.tokenizer.eos_id))
    out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=sab.tokenizer.eos_id,
                          pad_token_id=sab.tokenizer.pad_id)
    assert out[0, len(prompt):].tolist() == mine
    assert len(set(mine)) > 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_writes_the_family_back_with_its_tokenizer(folders, family, tmp_path, capsys):
    path, theirs = folders[family]
    assert main(["export", "--checkpoint", str(path), "-o", str(tmp_path / "out"), "--format", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == ARCHITECTURE[family]
    ids = _ids(theirs.config.vocab_size, seed=2)
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(theirs, ids), rtol=0, atol=1e-4)
    before, after = (transformers.AutoTokenizer.from_pretrained(p) for p in (path, tmp_path / "out"))
    for text in TEXTS:
        assert after(text)["input_ids"] == before(text)["input_ids"], text
    assert (after.bos_token, after.eos_token) == (before.bos_token, before.eos_token)
    if before.chat_template:
        chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
        assert after.apply_chat_template(chat, tokenize=False) == before.apply_chat_template(chat, tokenize=False)
    # and back in once more: the same logits
    torch.testing.assert_close(_ours(tmp_path / "out").model(ids), _hf_logits(theirs, ids), rtol=0, atol=1e-4)


NO_PACKAGE = """
import sys, json
sys.modules["sab_byon_omni"] = None  # this package cannot be imported here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for path in sys.argv[1:]:
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok("Hello world! The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        out[path] = {"arch": type(model).__name__, "ids": ids[0].tolist(), "logits": model(ids).logits[0, -1].tolist()}
print(json.dumps(out))
"""


def test_exports_load_without_this_package_offline(folders, tmp_path):
    paths, ours = [], {}
    for family in FAMILIES:
        sab = _ours(folders[family][0])
        save_hf(sab.model, sab.tokenizer, tmp_path / family)
        paths.append(str(tmp_path / family))
        ids = sab.tokenizer.encode("Hello world! The quick brown fox")
        with torch.no_grad():
            ours[str(tmp_path / family)] = (ids, sab.model(torch.tensor([ids]))[0, -1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    r = subprocess.run([sys.executable, "-c", NO_PACKAGE, *paths], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for family, path in zip(FAMILIES, paths):
        assert got[path]["arch"] == ARCHITECTURE[family]
        assert got[path]["ids"] == ours[path][0]
        torch.testing.assert_close(torch.tensor(got[path]["logits"]), ours[path][1], rtol=0, atol=1e-4)


def test_parts_in_memory_round_trip(folders):
    """to_hf_parts / from_hf_parts: what a GGUF reader and writer exchange."""
    sab = _ours(folders["llama"][0])
    config, tensors, text, tok_config = to_hf_parts(sab.model, sab.tokenizer)
    assert config["architectures"] == ["LlamaForCausalLM"] and "model.layers.1.self_attn.k_proj.weight" in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # 2 key/value heads of 16
    assert tok_config["chat_template"] == sab.tokenizer.chat_template and isinstance(text, str)
    w = from_hf_parts(config, tensors, text, tok_config, "memory")
    assert w.config.model == sab.config.model
    assert w.tokenizer.to_spec() == sab.tokenizer.to_spec()
    state = sab.model.state_dict()
    assert all(torch.equal(w.state_dict[k], state[k]) for k in state)


def test_sharded_safetensors_read_like_one_file(folders, tmp_path):
    path, theirs = folders["qwen2"]
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    for f in path.glob("*token*"):
        (tmp_path / "sharded" / f.name).write_bytes(f.read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, many = load_hf(path), load_hf(tmp_path / "sharded")
    assert all(torch.equal(one[2][k], many[2][k]) for k in one[2])


def test_every_source_place_takes_a_folder_and_a_cached_hub_id(folders, in_tmp, monkeypatch, capsys):
    path, _ = folders["qwen2"]
    snap = in_tmp / "hub" / "models--someone--tiny-qwen" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in path.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(in_tmp / "hub"))
    assert main(["generate", "--checkpoint", "someone/tiny-qwen", "--prompt", "Hello", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    (in_tmp / "notes.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "--checkpoint", str(path), "--data", "notes.txt", "--seq-len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["train", "--init_from", "someone/tiny-qwen", "--max_steps", "2", "--data", "notes.txt",
                 "--seq_len", "32", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--precision", "fp32",
                 "--checkpoint_dir", "run", "--progress", "false"]) == 0
    tuned = SABTranscendentV2.load("run/best_model.pt")
    assert (tuned.config.model.family, tuned.config.model.n_kv_heads, tuned.tokenizer.name) == ("qwen2", 2, "hf")
    assert tuned.tokenizer.chat_template == _ours(path).tokenizer.chat_template
    assert main(["export", "--checkpoint", "run/best_model.pt", "-o", "tuned_hf"]) == 0
    assert type(transformers.AutoModelForCausalLM.from_pretrained("tuned_hf")).__name__ == "Qwen2ForCausalLM"


def _edit(**changes):
    def edit(path):
        conf = json.loads((path / "config.json").read_text())
        conf.update(changes)
        (path / "config.json").write_text(json.dumps(conf))
    return edit


def _bin_only(path):
    (path / "model.safetensors").rename(path / "pytorch_model.bin")


@pytest.mark.parametrize("family, edit, message", [
    ("llama", _edit(model_type="bert"), "model_type 'bert' is not supported"),
    ("llama", _edit(quantization_config={"quant_method": "gptq", "bits": 4}), r"quantized weights \('gptq'\)"),
    ("mistral", _edit(sliding_window=16), "sliding_window 16 is shorter than max_position_embeddings"),
    ("qwen2", _edit(use_sliding_window=True), "use_sliding_window is true"),
    ("llama", _edit(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope scaling 'yarn' is not supported"),
    ("tinyllama", _edit(hidden_act="gelu"), "hidden_act 'gelu' is not silu"),
    ("tinyllama", _edit(attention_bias=True), "attention_bias is true"),
    ("gpt2", _edit(activation_function="relu"), "activation 'relu' is not one of"),
    ("pythia", _edit(num_hidden_layers=3), "the weights have no gpt_neox.layers.2"),
    ("qwen2", _edit(hidden_size=32), "would have shape"),
    ("llama", _bin_only, "pytorch_model.bin is a pickle, which is never read"),
], ids=["model-type", "quantized", "mistral-window", "qwen-window", "yarn", "act", "attention-bias", "gpt2-act",
        "layers", "shape", "bin-only"])
def test_what_our_model_cannot_compute_is_one_line_and_exit_2(folders, tmp_path, capsys, family, edit, message):
    import shutil

    shutil.copytree(folders[family][0], tmp_path / "m")
    edit(tmp_path / "m")
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


@pytest.mark.parametrize("family, changes, message", [
    ("llama", {"num_attention_heads": 0}, r"num_attention_heads 0 is out of range \(it must be >= 1"),
    ("llama", {"hidden_size": True}, "hidden_size True is not an integer"),
    ("llama", {"rms_norm_eps": "x"}, "rms_norm_eps 'x' is not a number"),
    ("llama", {"rms_norm_eps": -1}, r"rms_norm_eps -1.0 is out of range \(it must be > 0.0"),
    ("llama", {"rope_theta": "abc", "rope_parameters": None}, "rope_theta 'abc' is not a number"),
    ("llama", {"rope_theta": [1], "rope_parameters": None}, r"rope_theta \[1\] is not a number"),
    ("llama", {"rope_theta": 10 ** 400, "rope_parameters": None}, "rope_theta 1000.* is not a number"),
    ("llama", {"rope_parameters": {**_LLAMA3, "original_max_position_embeddings": "x"}},
     "original_max_position_embeddings 'x' is not an integer"),
    ("llama", {"rope_parameters": {**_LLAMA3, "original_max_position_embeddings": float("inf")}},
     "original_max_position_embeddings inf is not an integer"),
    ("llama", {"rope_parameters": {"rope_type": ["x"]}}, r"rope_type \['x'\] is not a string"),
    ("llama", {"rope_parameters": "x"}, "rope_parameters 'x' is not a mapping"),
    ("mistral", {"sliding_window": "x"}, "sliding_window 'x' is not an integer"),
    ("qwen2", {"layer_types": 5}, "layer_types 5 is not a list"),
    ("gpt2", {"layer_norm_epsilon": "x"}, "layer_norm_epsilon 'x' is not a number"),
    ("gpt2", {"activation_function": ["gelu"]}, r"activation \['gelu'\] is not one of"),
    ("tinyllama", {"tie_word_embeddings": "no"}, "tie_word_embeddings 'no' is not true or false"),
    ("pythia", {"use_parallel_residual": 1}, "use_parallel_residual 1 is not true or false"),
    ("llama", {"num_key_value_heads": "2"}, "num_key_value_heads '2' is not an integer"),
], ids=["heads-0", "hidden-bool", "eps-str", "eps-negative", "theta-str", "theta-list", "theta-huge-int",
        "llama3-omax-str", "llama3-omax-inf", "rope-type-list", "rope-parameters-str", "window-str", "layer-types-int",
        "gpt2-eps-str", "gpt2-act-list", "tie-str", "neox-residual-int", "kv-heads-str"])
def test_a_config_json_field_of_the_wrong_type_or_range_is_one_line(folders, tmp_path, capsys, family, changes,
                                                                      message):
    """Each of these was a traceback (ZeroDivisionError, ValueError, TypeError, OverflowError) or,
    for ``"tie_word_embeddings": "no"``, read as true (hostile review items 3, 12)."""
    import shutil

    shutil.copytree(folders[family][0], tmp_path / "m")
    _edit(**changes)(tmp_path / "m")
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "config.json" in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize("options, message", [
    (dict(family="llama"), "model.norm='layernorm' has no exact form in LlamaForCausalLM"),
    (dict(family="llama", norm="rmsnorm", mlp="swiglu", qkv_bias=True), "model.qkv_bias=True has no exact form"),
    (dict(family="gpt2", positions="learned", n_kv_heads=2), "model.n_kv_heads=2 has no exact form in GPT2LMHead"),
    (dict(family="gpt_neox", rope_scaling="linear", rope_scaling_factor=2.0), "model.rope_scaling='linear'"),
    (dict(family="sab", mlp="swiglu"), "model.mlp='swiglu' has no exact form in GPTNeoXForCausalLM"),
    (dict(fragmergent_mode="clock"), "fragmergent_mode=clock"),
    (dict(family="llama", norm="rmsnorm", mlp="swiglu", qk_norm=True), "model.qk_norm=True has no exact form in Llama"),
    (dict(family="qwen3", norm="rmsnorm", mlp="swiglu"), "model.qk_norm=False has no exact form in Qwen3ForCausalLM"),
    (dict(family="qwen3", norm="rmsnorm", mlp="relu2", qk_norm=True), "model.mlp='relu2' has no exact form in Qwen3"),
    (dict(mlp="relu2"), "model.mlp='relu2' has no exact form in GPTNeoXForCausalLM"),
    (dict(qk_norm=True), "model.qk_norm=True has no exact form in GPTNeoXForCausalLM .* only Qwen3 computes it"),
    (dict(family="gpt2", positions="learned", qk_norm=True), "model.qk_norm=True has no exact form in GPT2LMHead"),
    (dict(logit_softcap=15.0), "model.logit_softcap=15.0 has no exact form"),
    (dict(value_embed=True), "model.value_embed=True has no exact form"),
    (dict(unet_skips=True), "model.unet_skips=True has no exact form"),
    (dict(document_mask_id=1), "model.document_mask_id=1 has no exact form"),
], ids=["layernorm-as-llama", "qkv-bias-as-llama", "gqa-as-gpt2", "scaled-rope-as-neox", "swiglu-as-sab", "clock",
        "qk-norm-as-llama", "qwen3-without-qk-norm", "relu2-as-qwen3", "relu2-as-sab", "qk-norm-as-sab",
        "qk-norm-as-gpt2", "softcap", "value-embed", "unet-skips", "document-mask"])
def test_an_export_that_would_not_be_exact_is_refused_and_writes_nothing(tmp_path, options, message):
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.data.tokenizers import Char96Tokenizer
    from sab_byon_omni.errors import SabError
    from sab_byon_omni.model.transformer import CausalTransformer

    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96, **options))
    with pytest.raises(SabError, match=message):
        save_hf(model, Char96Tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_trained_here_with_llama_options_exports_as_llama_with_a_folded_factor(tmp_path):
    """From scratch (our tokenizer, fragmergent on): LlamaForCausalLM, the factor in the embedding, untied."""
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.data.tokenizers import ByteTokenizer
    from sab_byon_omni.model.transformer import CausalTransformer

    torch.manual_seed(0)
    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=258, family="llama", norm="rmsnorm",
                                                    mlp="swiglu", n_kv_heads=2, rope_base=1e5)).eval()
    model.fragmergent.set_step(7)
    assert model.fragmergent.scale() != 1.0
    save_hf(model, ByteTokenizer(), tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and not hf.config.tie_word_embeddings
    ids = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("héllo")["input_ids"] == ByteTokenizer().encode("héllo")


def test_qk_norm_rmsnorm_swiglu_exports_as_qwen3_exactly_and_comes_back(tmp_path):
    """The levers' stock form: QK-norm + RMSNorm + SwiGLU (+ zero-initialised projections, an
    initialisation only) is Qwen3ForCausalLM; its logits equal ours, and importing it gives our model back."""
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.data.tokenizers import ByteTokenizer
    from sab_byon_omni.model.transformer import CausalTransformer

    torch.manual_seed(0)
    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=258, family="qwen3", norm="rmsnorm",
                                                    mlp="swiglu", qk_norm=True, n_kv_heads=2, zero_init_proj=True,
                                                    fragmergent_mode="off")).eval()
    with torch.no_grad():  # gains and the zero projections away from their initial values, so that they count
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    save_hf(model, ByteTokenizer(), tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
        cfg, _, state = load_hf(tmp_path / "out")
        assert cfg.model.qk_norm and cfg.model.family == "qwen3"
        back = CausalTransformer(cfg.model).eval()
        back.load_state_dict(state)
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-5)
