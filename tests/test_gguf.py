"""GGUF files (interop.gguf): read in every supported type exactly as transformers reads them
(same dequantised tensors, logits within 1e-4 in fp32), the vocabulary inside as a tokenizer that
encodes like transformers' and like llama.cpp's pre-tokenizer, and written back as F32, F16 and
Q8_0 files that the gguf reader and transformers read with logits within the stated tolerance."""

from __future__ import annotations

import json
import os

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

from tokenizers import Tokenizer  # noqa: E402

from tests.gguf_files import (  # noqa: E402
    CHAT_TEMPLATE, SPECIALS, logits, model_from_parts, parts_of, random_model, tiny_vocab, transformers_load,
    transformers_tokenizer, write_gguf_file,
)
from sab_byon_omni.errors import SabError  # noqa: E402
from sab_byon_omni.interop.gguf import read_gguf, write_gguf  # noqa: E402
from sab_byon_omni.interop.gguf_tokenizer import GGUFVocab, tokenizer_json, vocab_from_json  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
transformers.utils.logging.set_verbosity_error()

IDS = torch.tensor([[1, 40, 60, 260, 261, 3, 70, 80, 100, 200, 262, 263, 264, 265, 90, 33, 2]])
# the 8-bit and 4/5-bit block types the gguf package can also write; K-quants are read from raw blocks below
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# max |logit difference| to the original fp32 model, over max |logit|: measured on the tiny models
# (logits up to 15-24, 5 seeds, llama and qwen2) at f16 <= 0.0007 and q8_0 <= 0.022 (docs/HF_EXPORT.md)
WRITE_TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "q8_0": 4e-2}


def _same_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tied: bool) -> None:
    expected = set(theirs) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name in expected:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("qtype", TYPES)
def test_each_type_reads_as_transformers_reads_it(tmp_path, qtype):
    model = random_model(tie=qtype != "Q8_0")  # one untied head among them
    path = write_gguf_file(tmp_path / f"tiny-{qtype}.gguf", model, qtype)
    parts = read_gguf(path)
    reference = transformers_load(path)
    _same_state(parts.tensors, reference.state_dict(), model.config.tie_word_embeddings)  # the same dequantisation
    ours = logits(model_from_parts(parts), IDS)
    assert (ours - logits(reference, IDS)).abs().max() <= 1e-4
    if qtype == "F32":  # lossless: the permutation of q/k is undone exactly
        _same_state(parts.tensors, model.state_dict(), model.config.tie_word_embeddings)
        assert (ours - logits(model, IDS)).abs().max() <= 1e-5
    assert parts.config["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert parts.config["head_dim"] == 16 and parts.config["rope_theta"] == 10000.0


def test_k_quant_blocks_read_as_transformers_reads_them(tmp_path):
    """K-quants (llama.cpp's Q4_K_M mixes Q4_K and Q6_K): random blocks, dequantised alike."""
    model = random_model(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4)
    rng = torch.Generator().manual_seed(0)
    path = write_gguf_file(tmp_path / "k.gguf", model, "F16", drop=("blk.0.ffn_up.weight", "blk.0.ffn_down.weight",
                                                                     "blk.0.attn_v.weight", "blk.0.attn_output.weight"),
                           extra={name: (torch.randint(0, 0x7C, (256, 256 // 256 * gguf.GGML_QUANT_SIZES[kind][1]),
                                                       generator=rng, dtype=torch.uint8).numpy(), kind)
                                  for name, kind in [("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q4_K),
                                                     ("blk.0.ffn_down.weight", gguf.GGMLQuantizationType.Q6_K),
                                                     ("blk.0.attn_v.weight", gguf.GGMLQuantizationType.Q5_K),
                                                     ("blk.0.attn_output.weight", gguf.GGMLQuantizationType.Q3_K)]})
    _same_state(read_gguf(path).tensors, transformers_load(path).state_dict(), tied=True)


def test_qwen2_reads_as_transformers_reads_it(tmp_path):
    model = random_model("qwen2")
    path = write_gguf_file(tmp_path / "qwen.gguf", model, "Q8_0", arch="qwen2", pre="qwen2")
    parts = read_gguf(path)
    assert parts.config["model_type"] == "qwen2" and "model.layers.1.self_attn.k_proj.bias" in parts.tensors
    reference = transformers_load(path)
    _same_state(parts.tensors, reference.state_dict(), tied=True)
    assert (logits(model_from_parts(parts), IDS) - logits(reference, IDS)).abs().max() <= 1e-4


def test_greedy_tokens_equal_transformers(tmp_path):
    path = write_gguf_file(tmp_path / "tiny.gguf", random_model(seed=3), "Q4_1")
    ours, theirs = model_from_parts(read_gguf(path)), transformers_load(path)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 2, "eos_token_id": None}
    assert torch.equal(ours.generate(IDS[:, :6], **kw), theirs.generate(IDS[:, :6], **kw))


# ------------------------------------------------------------------------------- tokenizer
TEXTS = ["Hello, world! 123", "the world's 1234 in the inn", "<|im_start|>user\nhi<|im_end|>\n", "<think>x</think>",
         "café naïve 日本語 😀", "def f(x):\n\treturn x  # 42\r\n", "  leading and   trailing  ", ""]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_the_vocabulary_encodes_as_transformers_does(tmp_path, pre):
    path = write_gguf_file(tmp_path / "tok.gguf", random_model(), pre=pre, add_bos=None)
    parts = read_gguf(path)
    ours, theirs = Tokenizer.from_str(parts.tokenizer_json), transformers_tokenizer(path)
    for text in TEXTS:  # the BOS aside: transformers adds none where the file does not say
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    cfg = parts.tokenizer_config
    assert cfg["add_bos_token"] is (pre == "llama-bpe")  # llama.cpp's default for the Llama 3 family
    assert ours.encode("in").ids[:1] == ([1] if pre == "llama-bpe" else [theirs("in")["input_ids"][0]])
    assert [cfg[f"{k}_token"] for k in ("bos", "eos", "unk", "pad")] == [SPECIALS[1], SPECIALS[2], SPECIALS[0],
                                                                          SPECIALS[2]]
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["model_max_length"] == 128
    assert ours.encode("<|im_start|>").ids[-1] == 1
    assert ours.encode("<think>").ids[-1] == len(tiny_vocab()["tokens"]) - 1  # user-defined: matched whole


def test_the_smollm_split_cuts_digits_apart_as_llama_cpp_does(tmp_path):
    """``smollm`` (and starcoder...) cut every digit apart before the merges: the merges 1+2 and
    12+3 never apply. transformers' GGUF tokenizer uses GPT-2's split here and would give "123"."""
    vocab = {t: i for i, t in enumerate(tiny_vocab()["tokens"])}
    for pre, want in [("smollm", ["1", "2", "3"]), ("gpt2", ["123"])]:
        parts = read_gguf(write_gguf_file(tmp_path / f"{pre}.gguf", random_model(), pre=pre))
        assert Tokenizer.from_str(parts.tokenizer_json).encode("123").ids == [vocab[t] for t in want]


def test_the_chat_template_renders_in_a_sandbox_to_the_same_ids(tmp_path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = write_gguf_file(tmp_path / "chat.gguf", random_model())
    parts, theirs = read_gguf(path), transformers_tokenizer(path)
    messages = [{"role": "user", "content": "the world 123"}, {"role": "assistant", "content": "in"}]
    text = ImmutableSandboxedEnvironment().from_string(parts.tokenizer_config["chat_template"]).render(
        messages=messages, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert Tokenizer.from_str(parts.tokenizer_json).encode(text).ids == list(
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_add_bos_token_adds_the_bos(tmp_path):
    for flag in (True, False):
        parts = read_gguf(write_gguf_file(tmp_path / f"bos{flag}.gguf", random_model(), add_bos=flag))
        assert (Tokenizer.from_str(parts.tokenizer_json).encode("in").ids[0] == 1) is flag


def test_the_vocabulary_survives_a_round_trip():
    v = tiny_vocab()
    vocab = GGUFVocab(v["tokens"], v["types"], v["merges"], "smollm", {"bos": 1, "eos": 2, "unk": 0, "pad": 2},
                      True, False, CHAT_TEMPLATE)
    config = {"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "unk_token": SPECIALS[0], "pad_token": SPECIALS[2],
              "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    n = len(v["tokens"])
    back = vocab_from_json(tokenizer_json(vocab), config, n + 2)  # an embedding with two rows to spare
    assert back.tokens == v["tokens"] + [f"[PAD{n}]", f"[PAD{n + 1}]"] and back.token_types[-3:] == [4, 5, 5]
    assert (back.merges, back.pre, back.special_ids, back.add_bos, back.chat_template) == \
        (v["merges"], "smollm", vocab.special_ids, True, CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------- write
@pytest.mark.parametrize("dtype, arch, tie", [("f32", "llama", False), ("f16", "llama", True), ("q8_0", "llama", True),
                                              ("q8_0", "qwen2", False)])
def test_written_files_read_back_in_the_gguf_reader_and_transformers(tmp_path, dtype, arch, tie):
    pre = "qwen2" if arch == "qwen2" else "smollm"
    source = write_gguf_file(tmp_path / "src.gguf", random_model(arch), arch=arch, pre=pre)
    model = random_model(arch, tie=tie, seed=1)
    _, _, tok_json, tok_config = read_gguf(source)
    out = write_gguf(tmp_path / f"out-{dtype}.gguf", *parts_of(model, tok_json, tok_config), dtype=dtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    matrix = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.1.ffn_down.weight"] == matrix
    assert ("output.weight" in kinds) is not tie
    back, theirs = read_gguf(out), transformers_load(out)
    _same_state(back.tensors, theirs.state_dict(), tie)
    want = logits(model, IDS)
    error = (logits(theirs, IDS) - want).abs().max() / want.abs().max()
    assert error <= WRITE_TOLERANCE[dtype], (dtype, float(error))
    assert (logits(model_from_parts(back), IDS) - logits(theirs, IDS)).abs().max() <= 1e-4
    assert back.tokenizer_json == tok_json and back.tokenizer_config == tok_config
    text = "the world's inn <|im_start|>hi<|im_end|> <think>"  # no digits: transformers splits smollm as gpt2
    assert Tokenizer.from_str(tok_json).encode(text).ids == transformers_tokenizer(out)(text)["input_ids"]
    if dtype == "f32":
        _same_state(back.tensors, model.state_dict(), tie)  # permuted and back: exact


def test_what_a_gguf_cannot_hold_is_refused_in_one_line(tmp_path):
    source = write_gguf_file(tmp_path / "src.gguf", random_model())
    _, _, tok_json, tok_config = read_gguf(source)
    model = random_model()
    config, tensors, *_ = parts_of(model, tok_json, tok_config)
    cases = [({**config, "model_type": "gpt_neox"}, tensors, tok_json, "only Llama-shaped models"),
             ({**config, "hidden_act": "gelu"}, tensors, tok_json, "hidden_act must be silu"),
             ({k: v for k, v in config.items() if k != "hidden_size"}, tensors, tok_json, "no hidden_size"),
             ({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, tensors, tok_json, "RoPE"),
             (config, {**tensors, "extra.weight": torch.zeros(1)}, tok_json, "an unexpected tensor"),
             (config, {k: v for k, v in tensors.items() if "ffn_up" not in k and "up_proj" not in k}, tok_json,
              "no tensor model.layers.0.mlp.up_proj.weight"),
             (config, tensors, json.dumps({**json.loads(tok_json), "normalizer": {"type": "NFC"}}), "normalizer")]
    for i, (cfg, ts, tj, needle) in enumerate(cases):
        with pytest.raises(SabError, match=needle):
            write_gguf(tmp_path / f"bad{i}.gguf", cfg, ts, tj, tok_config)
        assert not (tmp_path / f"bad{i}.gguf").exists()
    with pytest.raises(SabError, match="already exists"):
        write_gguf(source, config, tensors, tok_json, tok_config)
