import json
import os
import re
import string
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sab_byon_omni import config
from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.pretrained_tokenizer import HFTokenizer
from sab_byon_omni.data.tokenizers import (
    TOKENIZERS,
    BPETokenizer,
    ByteTokenizer,
    Char96Tokenizer,
    build_tokenizer,
    from_spec,
    spec_equal,
    utf8_safe,
)
from sab_byon_omni.errors import SabError
from tests.helpers import tiny_run

PRINTABLE = "".join(chr(c) for c in range(32, 127))


def test_char96_vocabulary_layout():
    tok = Char96Tokenizer()
    assert tok.vocab_size == 96 and tok.pad_id == 0
    assert tok.encode(" ") == [1] and tok.encode("~") == [95]
    assert tok.decode(range(1, 96)) == PRINTABLE


@given(st.text(alphabet=PRINTABLE, max_size=200))
def test_char96_round_trip_on_printable_ascii(text):
    tok = Char96Tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(0 < i < 96 for i in ids)
    assert tok.decode(ids) == text


def test_char96_rule_for_whitespace_and_unicode():
    tok = Char96Tokenizer()
    assert tok.decode(tok.encode("a\nb\tc\r\nd")) == "a b c  d"
    assert tok.decode(tok.encode("café naïve")) == "cafe naive"
    assert tok.decode(tok.encode("日本")) == "??"
    assert tok.decode(tok.encode("½")) == "1?2"  # NFKD splits it into 1, fraction slash, 2


@settings(max_examples=200)
@given(st.text())
def test_char96_any_unicode_maps_into_the_vocabulary(text):
    ids = Char96Tokenizer().encode(text)
    assert all(0 < i < 96 for i in ids)


def test_decode_skips_padding():
    tok = Char96Tokenizer()
    assert tok.decode([0, *tok.encode("hi"), 0, 0]) == "hi"


@given(st.text())
def test_byte_tokenizer_is_lossless(text):
    tok = ByteTokenizer()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are not text; documented as replaced on decode
        return
    assert tok.decode(tok.encode(text)) == text


def test_specs_round_trip():
    for tok in (Char96Tokenizer(), ByteTokenizer()):
        again = from_spec(tok.to_spec())
        assert type(again) is type(tok)
        assert again.encode(string.ascii_letters) == tok.encode(string.ascii_letters)


# ------------------------------------------------------------------ encode_array and the registry
# any code point (lone surrogates included) mixed with the BPE fixture's training text, so that
# merges can span two texts; empty strings are frequent
any_char = st.one_of(st.sampled_from("Consciousness is awareness. def f(x): héllo ✓😀"),
                     st.integers(0, 0x10FFFF).map(chr))
any_texts = st.lists(st.one_of(st.just(""), st.text(any_char, max_size=20)), max_size=6)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(["Consciousness is awareness.", "def f(x): return x * 2", "héllo wörld ✓ 😀"] * 3,
                              vocab_size=300)


@pytest.fixture(scope="module")
def pretrained(bpe) -> HFTokenizer:
    """The hf kind: a tokenizer.json used as it is, here the BPE's, with its tokens named by a config."""
    return HFTokenizer.from_parts(bpe.to_spec()["json"], {"eos_token": "<EOS>", "pad_token": "<PAD>"})


@pytest.fixture(scope="module")
def all_tokenizers(bpe, pretrained):
    return [Char96Tokenizer(), ByteTokenizer(), bpe, pretrained]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=any_texts)
@example(texts=["Conscious", "ness", "", "\ud800", "\udc00"])
def test_encode_array_is_the_concatenation_of_encode(all_tokenizers, texts):
    for tok in all_tokenizers:
        ids = tok.encode_array(texts)
        assert ids.dtype == np.int64 and ids.ndim == 1, tok.name
        assert ids.tolist() == [i for t in texts for i in tok.encode(t)], tok.name
        assert [b.tolist() for b in tok.encode_batch(texts)] == [tok.encode(t) for t in texts], tok.name


def test_encode_array_of_nothing_is_empty(all_tokenizers):
    for tok in all_tokenizers:
        for texts in ([], [""], ["", ""]):
            ids = tok.encode_array(texts)
            assert ids.dtype == np.int64 and ids.shape == (0,), (tok.name, texts)


def test_every_registered_tokenizer_round_trips_through_its_spec(bpe, pretrained):
    made = {name: build_tokenizer(name) for name, cls in TOKENIZERS.items() if not cls.needs_file}
    made.update(bpe=bpe, hf=pretrained)
    assert tuple(TOKENIZERS) == config.TOKENIZERS  # the config accepts exactly the registered names
    for name, tok in made.items():
        assert type(tok) is TOKENIZERS[name] and tok.name == name
        again = from_spec(json.loads(json.dumps(tok.to_spec())))  # specs are plain JSON data
        assert type(again) is type(tok) and spec_equal(again.to_spec(), tok.to_spec())
        assert again.encode("héllo, wörld\n") == tok.encode("héllo, wörld\n")


@pytest.mark.parametrize("spec, match", [
    ({"name": "nope"}, "unknown tokenizer 'nope': use one of char96, byte, bpe, hf"),
    ({"name": ["char96"] * 1000}, "unknown tokenizer"),
    (["char96"], "invalid tokenizer spec: expected a mapping with a 'name', got list"),
    ("char96", "invalid tokenizer spec"),
    (None, "invalid tokenizer spec"),
    ({"json": "{}"}, "invalid tokenizer spec"),
    ({"name": "bpe"}, "BPE tokenizer spec has no 'json' field"),
    ({"name": "bpe", "json": "{not json" + "x" * 5000}, "invalid BPE tokenizer JSON"),
])
def test_a_bad_spec_is_a_short_sab_error(spec, match):
    with pytest.raises(SabError, match=re.escape(match)) as e:
        from_spec(spec)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_build_tokenizer_by_name_or_config(bpe, tmp_path):
    assert type(build_tokenizer("byte")) is ByteTokenizer
    assert type(build_tokenizer(DataConfig(tokenizer="char96"))) is Char96Tokenizer
    with pytest.raises(SabError, match="unknown tokenizer 'nope': use one of char96, byte, bpe"):
        build_tokenizer("nope")
    with pytest.raises(SabError, match="bpe needs a trained tokenizer: set data.tokenizer_path"):
        build_tokenizer("bpe")
    bpe.save(tmp_path / "tok.json")
    loaded = build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(tmp_path / "tok.json")), texts=["unused"])
    assert spec_equal(loaded.to_spec(), bpe.to_spec())  # a file wins over training texts
    trained = build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=300), texts=iter([["abc abd"] * 10]))
    assert trained.vocab_size <= 300 and trained.decode(trained.encode("abc abd")) == "abc abd"


@pytest.mark.parametrize("text, want", [
    ("plain é 🙂", "plain é 🙂"),
    ("a\ud800b", "a\ufffdb"),  # one U+FFFD per lone surrogate
    ("\udce9\udcff", "\ufffd\ufffd"),  # undecodable argv bytes (surrogateescape)
    ("\ud83d\ude00", "\U0001f600"),  # a surrogate pair is the character it encodes
])
def test_utf8_safe_replaces_each_lone_surrogate(text, want):
    assert utf8_safe(text) == want


# ------------------------------------------------------------------ panics inside `tokenizers`
def evil_tokenizer_json(bpe: BPETokenizer) -> str:
    """A valid tokenizer.json whose normalizer regex backtracks without end on ``"a" * 40 + "!"``:
    the regex engine gives up and the library panics (pyo3's PanicException, a BaseException)."""
    spec = json.loads(bpe.to_spec()["json"])
    spec["normalizer"] = {"type": "Replace", "pattern": {"Regex": "(a|aa)+$"}, "content": "b"}
    return json.dumps(spec)


def test_a_panic_in_the_tokenizers_library_is_a_sab_error_naming_the_file(bpe, tmp_path):
    path = tmp_path / "evil_tokenizer.json"
    path.write_text(evil_tokenizer_json(bpe))
    tok = BPETokenizer.load(path)
    assert tok.encode("aaa") != []  # harmless text encodes
    for call in (lambda: tok.encode("a" * 40 + "!"), lambda: tok.encode_batch(["ok", "a" * 40 + "!"]),
                 lambda: tok.encode_array(["a" * 40 + "!"])):
        with pytest.raises(SabError, match=re.escape(str(path)) + ".*failed while encoding.*retry-limit"):
            call()
    with pytest.raises(SabError, match="stored with the model"):
        from_spec({"name": "bpe", "json": path.read_text()}).encode("a" * 40 + "!")


def test_rust_calls_turns_only_panics_into_sab_errors(bpe):
    from sab_byon_omni.data.tokenizers import rust_calls

    from tokenizers import Tokenizer as HFTokenizer

    try:
        HFTokenizer.from_str(evil_tokenizer_json(bpe)).encode("a" * 40 + "!")  # the library: a panic
    except Exception:  # noqa: BLE001
        pytest.fail("a panic is not an Exception")
    except BaseException as e:  # noqa: BLE001
        panic = e
    assert not isinstance(panic, Exception)
    with pytest.raises(SabError, match="^x.json: the tokenizers library failed while decoding"):
        with rust_calls("x.json", "decoding"):
            raise panic
    with pytest.raises(SabError, match=r"^x.json: .* \(WordLevel error: Missing \[UNK\]"):  # the library's own error
        with rust_calls("x.json", "encoding"):
            raise Exception("WordLevel error: Missing [UNK] token from the vocabulary")
    for other in (KeyboardInterrupt(), SystemExit(3), ValueError("not ours to rename")):
        with pytest.raises(type(other)):
            with rust_calls("x.json", "decoding"):
                raise other


def test_a_hostile_tokenizer_file_through_train_is_one_error_line(bpe, tmp_path):
    """Before: exit 1 with a PanicException traceback that named no file."""
    (tmp_path / "evil.json").write_text(evil_tokenizer_json(bpe))
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.txt").write_text("a" * 40 + "!\n" + "hello world\n" * 20)
    out = subprocess.run([sys.executable, "-m", "sab_byon_omni", "train", "--data", "data", "--tokenizer", "bpe",
                          "--tokenizer_path", "evil.json", *tiny_run(num_samples=None), "--checkpoint_dir", "ck"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RUST_BACKTRACE": "0"})
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert err[-1].startswith("error: ") and "evil.json" in err[-1] and "failed while encoding" in err[-1], err[-1]
