"""The hf tokenizer kind: a pretrained model's tokenizer.json used as it is, encoding and decoding
as transformers' AutoTokenizer, with its special tokens and chat template kept through specs,
checkpoints and exports; hostile files refused in one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sab_byon_omni.cli import main  # noqa: E402
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2  # noqa: E402
from sab_byon_omni.data.pretrained_tokenizer import MAX_ENTRIES, HFTokenizer  # noqa: E402
from sab_byon_omni.data.tokenizers import from_spec  # noqa: E402
from sab_byon_omni.errors import SabError  # noqa: E402
from tests.hf_models import TEXTS, write_family, write_tokenizer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
transformers.utils.logging.set_verbosity_error()
KINDS = ["gpt2", "neox", "qwen2", "llama2", "llama3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    for kind in KINDS:
        write_tokenizer(kind, root / kind)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_ids_and_text_as_autotokenizer(saved, kind):
    theirs, ours = transformers.AutoTokenizer.from_pretrained(saved / kind), HFTokenizer.load(saved / kind)
    for text in TEXTS + ["".join(TEXTS)]:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert [a.tolist() for a in ours.encode_batch(TEXTS)] == theirs(TEXTS)["input_ids"]
    every = list(range(ours.vocab_size))  # the specials and byte pieces too
    assert ours.decode(every) == theirs.decode(every, skip_special_tokens=True)
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)
    assert ours.add_bos == (kind in ("llama2", "llama3"))  # as those models' files say
    assert ours.chat_template == theirs.chat_template


@pytest.mark.parametrize("kind", KINDS)
def test_the_spec_round_trips_and_travels_in_checkpoints(saved, kind, tmp_path):
    ours = HFTokenizer.load(saved / kind)
    again = from_spec(json.loads(json.dumps(ours.to_spec())))  # plain JSON data
    assert again.to_spec() == ours.to_spec() and again.encode(TEXTS[5]) == ours.encode(TEXTS[5])
    ours.save(tmp_path / "spec.json")  # the corpus cache's copy
    assert HFTokenizer.load(tmp_path / "spec.json").to_spec() == ours.to_spec()
    assert HFTokenizer.load(saved / kind / "tokenizer.json").to_spec() == ours.to_spec()  # the file, its folder read


def test_the_chat_template_comes_with_the_model_through_every_format(tmp_path):
    write_family(tmp_path / "qwen", "qwen2")
    sab = SABTranscendentV2.load(tmp_path / "qwen")
    template = sab.tokenizer.chat_template
    assert template and "<|im_start|>" in template
    for out in ("m.pt", "m.safetensors", "again_hf"):
        assert main(["export", "--checkpoint", str(tmp_path / "qwen"), "-o", str(tmp_path / out)]) == 0
        back = SABTranscendentV2.load(tmp_path / out)
        assert back.tokenizer.chat_template == template and back.tokenizer.to_spec() == sab.tokenizer.to_spec()
    chat = [{"role": "user", "content": "Hi"}]
    a, b = (transformers.AutoTokenizer.from_pretrained(tmp_path / d) for d in ("qwen", "again_hf"))
    assert b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_special_tokens_from_the_config_and_the_model_ids(saved):
    text = (saved / "gpt2" / "tokenizer.json").read_text()
    tok = HFTokenizer.from_parts(text, {}, {"bos_token_id": 0, "eos_token_id": [0, 1]})  # ids only, eos a list
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.tokens["eos"]) == (0, 0, 0, "<|endoftext|>")
    named = HFTokenizer.from_parts(text, {"eos_token": {"content": "<|endoftext|>"}, "chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    assert (named.eos_id, named.chat_template) == (0, "D")
    split = HFTokenizer.from_parts(text, {"eos_token": "<|endoftext|>", "split_special_tokens": True})
    assert split.encode("<|endoftext|>") != [0] and tok.encode("<|endoftext|>") == [0]


def _tokenizer_json(saved, change):
    raw = json.loads((saved / "gpt2" / "tokenizer.json").read_text())
    change(raw)
    return json.dumps(raw)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["model"].update(merges=["a b"] * (MAX_ENTRIES + 1)), "merges is more than a tokenizer has"),
    (lambda r: r["model"]["vocab"].update({"huge": 1 << 30}), "token id 1073741824 is not an integer in"),
    (lambda r: r["model"]["vocab"].update({"neg": -1}), "token id -1 is not an integer"),
    (lambda r: r["added_tokens"].append({"id": "7", "content": "x"}), "token id '7' is not an integer"),
    (lambda r: r["model"].update(type="Mystery"), "tokenizer model 'Mystery' is not one of"),
    (lambda r: r.update(model=[]), "not a tokenizers JSON file"),
    (lambda r: r["model"].update(vocab=[1, 2]), "not a tokenizer the tokenizers library reads"),
    (lambda r: r.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated",
                                       "invert": False}), None),
], ids=["merges", "huge-id", "negative-id", "string-id", "model-type", "no-model", "vocab-list", "regex"])
def test_hostile_tokenizer_json_is_one_line(saved, change, message):
    text = _tokenizer_json(saved, change)
    try:
        tok = HFTokenizer.from_parts(text, {}, source="hostile.json")
        tok.encode("a" * 50_000 + "b")  # a backtracking regex: the library gives up (a panic), never hangs
    except SabError as e:
        assert "hostile.json" in str(e) and "\n" not in str(e)
        assert message is None or message in str(e), str(e)
    else:
        assert message is None


def test_deep_nesting_and_size_are_refused_before_parsing(saved, tmp_path):
    with pytest.raises(SabError, match="nested too deeply"):
        HFTokenizer.from_parts("[" * 100_000 + "]" * 100_000, {}, source="deep.json")
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "tokenizer.json", "wb") as f:
        f.truncate(64 << 20)  # 64 MB (sparse): refused by its size, never read
    with pytest.raises(SabError, match="bytes is more than a tokenizer file can need"):
        HFTokenizer.load(tmp_path / "big")


@pytest.mark.parametrize("change, message", [
    (lambda r: r["model"]["vocab"].update({"huge": 1 << 30}), "token id 1073741824 is not an integer in"),
    (lambda r: r["model"]["vocab"].update({f"extra{i}": 5000 + i for i in range(3)}),
     "its tokenizer has 5,003 ids but the model's vocab_size is"),
    (lambda r: r.update(normalizer="NEST"), "nested too deeply"),
    (lambda r: r.update(post_processor=_template([299999])), "its tokenizer has 300,000 ids but the model's vocab_size"),
    (lambda r: r.update(post_processor=_template([5] * 17)), "a special token of its post_processor has not a list"),
    (lambda r: r.update(post_processor={**_template([5]), "single": [{"SpecialToken": {"id": "<X>", "type_id": 0}}] * 17}),
     "its post_processor template adds more than 16 pieces"),
    (lambda r: r.update(pre_tokenizer={"type": "Whitespace"}, model={"type": "WordLevel", "vocab": {"the": 0, "a": 1},
                                                                     "unk_token": "[UNK]"}), "Missing [UNK] token"),
    (lambda r: r.update(model={**r["model"], "vocab": {"t": 0, "h": 1, "e": 2}, "merges": [], "unk_token": "<unk>"}),
     "not found in the vocabulary"),
], ids=["huge-id", "more-ids-than-the-model", "nested", "post-processor-id-beyond-the-model", "post-processor-ids-long",
        "post-processor-template-long", "wordlevel-without-its-unk", "bpe-unk-not-in-vocab"])
def test_a_model_folder_with_a_hostile_tokenizer_exits_2_in_one_line(tmp_path, capsys, change, message):
    write_family(tmp_path / "m", "gpt2")
    raw = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    change(raw)
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(raw).replace('"NEST"', "[" * 5000 + "]" * 5000))
    capsys.readouterr()  # what transformers printed while writing the folder
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hi"]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert out in ("", "Hi\n"), out  # the echoed prompt ends its line: no "Hierror: ..." on a terminal
    shutil.rmtree(tmp_path / "m")


def _template(ids):
    """A TemplateProcessing post processor that puts the special token ``<X>`` (``ids``) before every text."""
    return {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<X>", "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {"<X>": {"id": "<X>", "ids": ids, "tokens": ["<X>"] * len(ids)}}}


@pytest.mark.parametrize("field, value", [
    ("padding", {"strategy": {"Fixed": 100_000}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                 "pad_type_id": 0, "pad_token": "x"}),  # the review's 10^8 took 11 GB per encoding
    ("truncation", {"direction": "Right", "max_length": 0, "strategy": "LongestFirst", "stride": 0}),
])
def test_padding_and_truncation_of_a_tokenizer_file_are_dropped(saved, field, value):
    plain = HFTokenizer.from_parts(_tokenizer_json(saved, lambda r: None), {})
    tok = HFTokenizer.from_parts(_tokenizer_json(saved, lambda r: r.update({field: value})), {})
    assert tok.encode(TEXTS[0]) == plain.encode(TEXTS[0]) and len(plain.encode(TEXTS[0])) > 1
    assert [len(a) for a in tok.encode_batch(TEXTS)] == [len(a) for a in plain.encode_batch(TEXTS)]
    assert json.loads(tok.to_spec()["json"])[field] is None  # what travels in checkpoints and caches


def test_a_folder_without_tokenizer_json_says_so(tmp_path, capsys):
    write_family(tmp_path / "m", "tinyllama")
    (tmp_path / "m" / "tokenizer.json").unlink()
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_the_model_sees_the_same_ids_as_transformers_gives_it(tmp_path):
    """Prompt ids through our generate == AutoTokenizer's, BOS included (Llama 2 style)."""
    write_family(tmp_path / "m", "tinyllama")
    sab, tok = SABTranscendentV2.load(tmp_path / "m"), transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = sab.tokenizer.encode("Hello world")
    assert ids == tok("Hello world")["input_ids"] and ids[0] == tok.bos_token_id
    text = sab.generate("Hello world", max_new_tokens=4, temperature=0, precision="fp32")
    assert isinstance(text, str)
    assert torch.is_tensor(sab.model.embed.weight)
