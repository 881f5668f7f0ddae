"""Byte and BPE tokenizers on arbitrary unicode (hypothesis), BPE trained on the training documents
only, saved as tokenizer.json and reused, and carried inside checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import corpus as C
from sab_byon_omni.data.tokenizers import BPETokenizer, ByteTokenizer, Char96Tokenizer, from_spec, spec_equal, spec_hash

TRAIN_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "Le café est très bon. Ünïcödé ✓ — 日本語のテキスト 🙂\n",
    "for i in range(10):\n\tprint(i, 'tab\\t', \"quote\")\r\n",
] * 20

# any text: all planes, controls, combining marks, emoji; no lone surrogates (they are not valid text)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXT, vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(2 <= i < 258 for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_corpus_fast_paths_equal_encode(bpe, text):
    for tok in (ByteTokenizer(), Char96Tokenizer(), bpe):
        assert tok.encode_array([text]).tolist() == tok.encode(text)


def test_special_token_text_is_ordinary_text(bpe):
    ids = bpe.encode("x <EOS> <PAD> y")
    assert bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids) == "x <EOS> <PAD> y"
    assert bpe.decode(ids + [bpe.eos_id]) == "x <EOS> <PAD> y"  # the real end token decodes to nothing


def test_bpe_compresses_what_it_was_trained_on(bpe):
    text = TRAIN_TEXT[0]
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_spec_round_trip_and_save_load(bpe, tmp_path):
    again = from_spec(bpe.to_spec())
    assert spec_equal(again.to_spec(), bpe.to_spec())
    bpe.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.encode("def add(x):") == bpe.encode("def add(x):")
    assert spec_hash(loaded.to_spec()) == spec_hash(bpe.to_spec())


# ------------------------------------------------------------------------- BPE inside the corpus
WORDS = ["zebra", "quilt", "mango", "vortex", "jigsaw", "plumb", "frost", "knight", "yacht", "dwarf"]


def word_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for w in WORDS:
        (root / f"{w}.txt").write_text((f" {w}" * 60) + "\n", encoding="utf-8")
    return root


def test_bpe_is_trained_on_the_training_documents_only(tmp_path):
    root = word_corpus(tmp_path / "words")
    cfg = DataConfig(dataset=str(root), tokenizer="bpe", bpe_vocab_size=330, val_fraction=0.2, seq_len=8,
                     cache_dir=str(tmp_path / "cache"))
    corpus = C.open_corpus(cfg)
    tok = corpus.tokenizer
    val_words = set(tok.decode(np.asarray(corpus.val_tokens)).split())
    assert len(val_words) == 2
    for w in WORDS:
        n = len(tok.encode(" " + w))
        assert (n > 1) if w in val_words else (n == 1), (w, n)  # training words became one token each
    assert (tmp_path / "cache" / "tokenizer.json").is_file()


def test_saved_tokenizer_is_reused_through_tokenizer_path(tmp_path):
    root = word_corpus(tmp_path / "words")
    first = C.open_corpus(DataConfig(dataset=str(root), tokenizer="bpe", bpe_vocab_size=330, seq_len=8,
                                     cache_dir=str(tmp_path / "c1")))
    path = tmp_path / "c1" / "tokenizer.json"
    other = word_corpus(tmp_path / "other")
    (other / "extra.txt").write_text("completely different words here\n" * 5, encoding="utf-8")
    cfg = DataConfig(dataset=str(other), tokenizer="bpe", tokenizer_path=str(path), seq_len=8,
                     cache_dir=str(tmp_path / "c2"))
    second = C.open_corpus(cfg)
    assert spec_equal(second.tokenizer.to_spec(), first.tokenizer.to_spec())
    assert C.open_corpus(cfg).meta["recipe"]["path_sha"] == second.meta["recipe"]["path_sha"]  # cache reused
    with pytest.raises(Exception, match="file not found"):
        C.open_corpus(DataConfig(dataset=str(other), tokenizer="bpe", tokenizer_path=str(tmp_path / "none.json")))


def test_bpe_vocab_size_change_rebuilds_the_cache(tmp_path):
    root = word_corpus(tmp_path / "words")
    kw = dict(dataset=str(root), tokenizer="bpe", seq_len=8, cache_dir=str(tmp_path / "c"))
    a = C.open_corpus(DataConfig(bpe_vocab_size=304, **kw))  # this corpus has merges for ~305 ids
    b = C.open_corpus(DataConfig(bpe_vocab_size=300, **kw))
    assert a.tokenizer.vocab_size == 304 and b.tokenizer.vocab_size == 300
    assert b.meta["recipe"] == {"name": "bpe", "vocab_size": 300}


def test_bpe_model_vocabulary_follows_the_tokenizer_and_travels_in_the_checkpoint(in_tmp, capsys):
    from sab_byon_omni.cli import main
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    root = word_corpus(in_tmp / "words")
    assert main(["train", "--data", str(root), "--tokenizer", "bpe", "--bpe_vocab_size", "300", "--preset", "tiny",
                 "--seq_len", "16", "--max_steps", "2", "--checkpoint_dir", "ck", "--progress", "false"]) == 0
    capsys.readouterr()
    sab = SABTranscendentV2.from_checkpoint("ck/best_model.pt")  # step_2.pt, or epoch_N.pt if an epoch ended there
    assert sab.tokenizer.name == "bpe" and sab.config.model.vocab_size == sab.tokenizer.vocab_size == 300
    cached = BPETokenizer.load(next((in_tmp / ".sab_cache").iterdir()) / "tokenizer.json")
    assert spec_equal(cached.to_spec(), sab.tokenizer.to_spec())


def test_a_bpe_corpus_run_resumes_with_the_same_tokenizer(in_tmp, capsys):
    from sab_byon_omni.cli import main
    from sab_byon_omni.files.checkpoint import load_checkpoint

    root = word_corpus(in_tmp / "words")
    args = ["train", "--data", str(root), "--tokenizer", "bpe", "--bpe_vocab_size", "300", "--preset", "tiny",
            "--seq_len", "16", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--checkpoint_dir", "ck",
            "--progress", "false"]
    assert main([*args, "--max_steps", "2"]) == 0
    assert main([*args, "--max_steps", "4", "--resume", "auto"]) == 0  # cache and tokenizer reused
    capsys.readouterr()
    ck = load_checkpoint("ck/step_4.pt")
    assert ck["global_step"] == 4 and spec_equal(ck["tokenizer"], load_checkpoint("ck/step_2.pt")["tokenizer"])


def test_resume_tokenises_with_the_checkpoints_tokenizer_even_if_settings_changed(in_tmp, capsys):
    from sab_byon_omni.cli import main
    from sab_byon_omni.files.checkpoint import load_checkpoint

    root = word_corpus(in_tmp / "words")
    args = ["train", "--data", str(root), "--tokenizer", "bpe", "--preset", "tiny", "--seq_len", "16",
            "--batch_size", "2", "--gradient_accumulation_steps", "1", "--checkpoint_dir", "ck", "--progress", "false"]
    assert main([*args, "--bpe_vocab_size", "300", "--max_steps", "2"]) == 0
    caches = sorted(p.name for p in (in_tmp / ".sab_cache").iterdir())
    # a different vocabulary size on resume: the run continues with the tokenizer it began with
    assert main([*args, "--bpe_vocab_size", "304", "--max_steps", "4", "--resume", "auto"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (in_tmp / ".sab_cache").iterdir()) == caches  # no BPE retrained, no new cache
    assert spec_equal(load_checkpoint("ck/step_4.pt")["tokenizer"], load_checkpoint("ck/step_2.pt")["tokenizer"])


def test_a_vocabulary_too_large_for_the_corpus_is_warned_about(caplog):
    words = [f"w{i}x{i * 7 % 13}" for i in range(3000)]  # ~24 KB of distinct words: plenty of merges
    texts = [" ".join(words[i:i + 50]) for i in range(0, 3000, 50)]
    with caplog.at_level("WARNING"):
        big = BPETokenizer.build(DataConfig(tokenizer="bpe", bpe_vocab_size=4096), texts)
    assert big.vocab_size > 4 * 512 and "--bpe_vocab_size 512" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        BPETokenizer.build(DataConfig(tokenizer="bpe", bpe_vocab_size=512), texts)
    assert "BPE:" not in caplog.text
