"""Corpora from local files: formats, bad bytes and binaries, split, cache reuse/invalidation,
windows without padding, bad input through the CLI, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sab_byon_omni.cli import main
from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import cache as corpus_cache
from sab_byon_omni.data import corpus as C
from sab_byon_omni.data import readers as R
from sab_byon_omni.data.tokenizers import ByteTokenizer, Char96Tokenizer
from sab_byon_omni.data.windows import TokenWindows
from sab_byon_omni.errors import SabError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def docs_of(path: Path, **kw) -> list[str]:
    return list(R.read_documents(path, **kw))


def cfg_for(data: Path | str, tmp: Path, **kw) -> DataConfig:
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("seq_len", 16)
    return DataConfig(dataset=str(data), cache_dir=str(tmp / "cache"), **kw)


def stream_text(tok, tokens: np.ndarray) -> str:
    return tok.decode(np.asarray(tokens))


# --------------------------------------------------------------------------------------- formats
def test_plain_text_markdown_and_source_are_read_verbatim(tmp_path):
    files = {"a.txt": "hello\nworld\n", "b.md": "# Title\n\n* item é\n", "c.py": "def f(x):\n\treturn x\n"}
    for name, text in files.items():
        assert docs_of(write(tmp_path / name, text)) == [text]


def test_json_records_list_single_object_and_strings(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"body": "no field"}, {"text": "two"}, "three"]))
    assert docs_of(p) == ["one", "two", "three"]
    p = write(tmp_path / "b.json", json.dumps({"content": "single"}))
    assert docs_of(p, text_field="content") == ["single"]
    with pytest.raises(R.SkipFile, match="no 'text' field"):
        docs_of(p)
    with pytest.raises(R.SkipFile, match="invalid JSON"):
        docs_of(write(tmp_path / "bad.json", "{not json"))


def test_jsonl_with_a_configurable_field_skips_bad_lines(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"body": "x1"}\n\n{"body": "x2", "other": 1}\nnot json\n"x3"\n'
              '{"body": "x4", "n": ' + "9" * 5000 + '}\n')  # valid JSON that Python cannot convert
    assert docs_of(p, text_field="body") == ["x1", "x2", "x3"]


def test_csv_column_with_quoted_newlines(tmp_path):
    p = write(tmp_path / "a.csv", 'id,content\n1,"first, with comma"\n2,"multi\nline"\n3,\n')
    assert docs_of(p, csv_column="content") == ["first, with comma", "multi\nline"]
    with pytest.raises(R.SkipFile, match="no 'text' column"):
        docs_of(p)


def test_html_visible_text_only(tmp_path):
    html = ("<html><head><title>T</title><style>p {color: red}</style></head><body><h1>Head&amp;line</h1>"
            "<script>var x = 1;</script><p>Some   <b>bold</b> text</p><p>second</p></body></html>")
    (text,) = docs_of(write(tmp_path / "a.html", html))
    assert text == "Head&line\n\nSome bold text\n\nsecond"
    assert "color" not in text and "var x" not in text and "T" not in text.split()


def test_html_constructs_are_read_as_a_browser_shows_them():
    cases = {
        "<p title='a>b'>x &lt; y</p><!-- a comment --><p>z</p>": "x < y\n\nz",  # ">" inside a quoted value
        "<div>a<script>if (a<b && c>d) {}</script>b</div>": "ab",  # script content is not markup
        "<!DOCTYPE html><body>caf&eacute; &#233; 3 < 4 and x<3 &nosuch;</body>": "café é 3 < 4 and x<3 &nosuch;",
        "<svg><text>hidden</text></svg>after<svg/>shown": "aftershown",
        "<P>Upper</P><SCRIPT>x</SCRIPT>ok": "Upper\nok",
        "<![CDATA[ in html, a bogus comment ]]>after": "after",
        "line1<br>line2<br/>line3": "line1\nline2\nline3",
        "kept <b>text</b> <a href='x": "kept text",  # a tag left open at the end swallows the rest
        "kept <!-- never closed <p>gone</p>": "kept",
    }
    for html, text in cases.items():
        assert R.html_visible_text(html) == text, html


READ_DOCS = ("import json, sys\nfrom pathlib import Path\nfrom sab_byon_omni.data import readers as R\n"
             "print(json.dumps(list(R.read_documents(Path(sys.argv[1])))))")


@pytest.mark.parametrize("unit", ["<a", "<!--", "<![", '<a b="', "<a title='x'"])
def test_html_left_open_a_hundred_thousand_times_is_read_in_one_pass(tmp_path, unit):
    """600 KB or more of one construct left open: html.parser rescanned the rest of the file from
    each one (quadratic: minutes for "<a", "<!--"), or raised AssertionError ("<!["). Read in a
    child with a generous time limit, so a hang fails this test instead of the whole run."""
    p = write(tmp_path / "a.html", "<p>kept <b>text</b></p>" + unit * 300_000)
    out = subprocess.run([sys.executable, "-c", READ_DOCS, str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == ["kept text"]


def test_bad_utf8_is_replaced_and_counted(tmp_path):
    p = write(tmp_path / "latin1.txt", "caf\xe9 ok\n".encode("latin-1") + "real \ufffd kept\n".encode())
    stats = R.ReadStats()
    assert docs_of(p, stats=stats) == ["caf\ufffd ok\nreal \ufffd kept\n"]
    assert stats.bad_bytes == 1  # only the invalid byte, not the genuine U+FFFD


def test_lone_surrogates_in_json_become_one_replacement_each_and_are_counted(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "x\\ud800y \\ud83d\\ude00 \\udce9\\udcff"}\n')
    stats = R.ReadStats()
    assert docs_of(p, stats=stats) == ["x\ufffdy \U0001f600 \ufffd\ufffd"]
    assert stats.bad_bytes == 3


def test_interleaved_reads_count_their_own_bad_bytes(tmp_path):
    a = write(tmp_path / "a.txt", b"\xff1\n" * 3)
    b = write(tmp_path / "b.txt", b"ok\n")
    sa, sb = R.ReadStats(), R.ReadStats()
    ra, rb = R.read_documents(a, stats=sa), R.read_documents(b, stats=sb)
    assert next(rb) == "ok\n" and next(ra) == "\ufffd1\n" * 3
    assert (sa.bad_bytes, sb.bad_bytes) == (3, 0)


def test_importing_the_data_package_registers_nothing():
    import subprocess
    import sys

    code = ("import codecs, sab_byon_omni.data.corpus, sab_byon_omni.data.factory\n"
            "try:\n    codecs.lookup_error('sab_count_replace')\nexcept LookupError:\n    print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "clean"


def test_binary_files_are_skipped(tmp_path):
    with pytest.raises(R.SkipFile, match="binary"):
        docs_of(write(tmp_path / "x.dat", b"abc\x00def"))
    with pytest.raises(R.SkipFile, match="binary"):
        docs_of(write(tmp_path / "x.png", b"looks like text"))


def test_large_text_files_stream_as_chunks_of_whole_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "CHUNK_BYTES", 64)
    text = "".join(f"line number {i}\n" for i in range(100))
    chunks = docs_of(write(tmp_path / "big.txt", text))
    assert len(chunks) > 5 and "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)


# ---------------------------------------------------------------------------------- finding files
def test_folder_is_recursive_and_skips_hidden_and_pycache(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    write(tmp_path / "d" / "sub" / "deeper" / "b.py", "b")
    write(tmp_path / "d" / ".git" / "c.txt", "c")
    write(tmp_path / "d" / "__pycache__" / "d.txt", "d")
    write(tmp_path / "d" / ".hidden.txt", "e")
    assert [p.name for p in R.find_files(str(tmp_path / "d"))] == ["a.txt", "b.py"]


def test_glob_and_single_file(tmp_path):
    for n in ("a.py", "b.py", "c.txt"):
        write(tmp_path / "g" / n, n)
    write(tmp_path / "g" / "sub" / "d.py", "d")
    assert [p.name for p in R.find_files(str(tmp_path / "g" / "*.py"))] == ["a.py", "b.py"]
    assert [p.name for p in R.find_files(str(tmp_path / "g" / "**" / "*.py"))] == ["a.py", "b.py", "d.py"]
    assert [p.name for p in R.find_files(str(tmp_path / "g" / "c.txt"))] == ["c.txt"]


def test_links_that_loop_are_searched_once(tmp_path, caplog):
    """A folder with two links back into itself: glob's ``**`` followed them without end (2 ways
    down at every level, until the path was too long). Found in a child with a time limit."""
    write(tmp_path / "d" / "a.txt", "a")
    write(tmp_path / "d" / "sub" / "b.txt", "b")
    (tmp_path / "d" / "self").symlink_to(".")
    (tmp_path / "d" / "sub" / "up").symlink_to("..")
    code = ("import sys\nfrom sab_byon_omni.data.readers import find_files\n"
            "print(*[p.name for p in find_files(sys.argv[1])])")
    for spec in ("d/**", "d/**/*.txt", "d", "d/*"):
        out = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.split() == ["a.txt", "b.txt"], (spec, out.stderr[-2000:])
    with caplog.at_level("WARNING"):
        R.find_files(str(tmp_path / "d" / "**"))
    assert "a link to a folder above it (a loop)" in caplog.text


def test_folders_nested_deeper_than_the_recursion_limit(tmp_path):
    """os.walk and glob recurse once per level: a folder 1200 deep raised RecursionError."""
    depth, fd = 1200, os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(depth):  # relative to a descriptor: no path gets long while making it
            os.mkdir("n", dir_fd=fd)
            fd, old = os.open("n", os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        for spec in ("n", "n/**", "n/**/*.txt"):
            assert [p.name for p in R.find_files(str(tmp_path / spec))] == ["deep.txt"], spec
    finally:
        os.close(fd)
        leaf = tmp_path.joinpath(*["n"] * depth)  # removed bottom up: shutil.rmtree recurses too
        (leaf / "deep.txt").unlink(missing_ok=True)
        for level in range(depth, 0, -1):
            tmp_path.joinpath(*["n"] * level).rmdir()


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing", "no such file or folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no files"),
    (lambda d: d / "nothing*.txt", "matches no file"),
])
def test_find_files_errors(tmp_path, make, match):
    with pytest.raises(SabError, match=match):
        R.find_files(str(make(tmp_path)))


# ------------------------------------------------------------------------------------------ split
def make_docs(root: Path, n: int = 20) -> Path:
    for i in range(n):
        write(root / f"doc{i:02d}.txt", f"document {i}: " + "abc " * (5 + i) + "\n")
    return root


def test_split_is_by_document_and_deterministic_for_a_seed(tmp_path):
    root = make_docs(tmp_path / "d")
    files = R.find_files(str(root))

    def val_set(seed: int) -> set[str]:
        docs = R.Documents(files, DataConfig(dataset=str(root), val_fraction=0.2, data_seed=seed))
        return {d for v, d in docs if v}

    a, b, c = val_set(1), val_set(1), val_set(2)
    assert a == b and len(a) == 4 and a != c
    all_docs = [d for _, d in R.Documents(files, DataConfig(dataset=str(root)))]
    assert sorted(all_docs) == sorted(p.read_text() for p in files)  # each document whole, exactly once


def test_a_single_document_is_cut_at_a_line_break(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    p = write(tmp_path / "one.txt", text)
    docs = list(R.Documents([p], DataConfig(dataset=str(p), val_fraction=0.1)))
    (tv, train), (vv, val) = docs
    assert (tv, vv) == (False, True) and train + val == text
    assert train.endswith("\n") and 5 <= val.count("\n") <= 15


def test_a_one_row_csv_is_one_document_though_it_is_cut_in_two(tmp_path):
    p = write(tmp_path / "one.csv", "text\n" + "a row of text " * 50 + "\n")  # the header row is no document
    docs = R.Documents([p], DataConfig(dataset=str(p), val_fraction=0.1))
    assert docs.single_cut and len(list(docs)) == 2  # its two halves: training and validation
    assert docs.stats.summary().startswith("1 file, 1 document,") and "too few documents, 1," in docs.split


def test_a_few_documents_are_each_cut_so_validation_is_near_val_fraction(tmp_path):
    """3 files: a whole-document split would hold out a third of the text (the newcomer's 77%)."""
    root = tmp_path / "d"
    texts = [write(root / f"f{i}.txt", "".join(f"file {i} line {j}\n" for j in range(50 * (i + 1)))).read_text()
             for i in range(3)]
    docs = R.Documents(R.find_files(str(root)), DataConfig(dataset=str(root), val_fraction=0.1))
    assert docs.cut_each and docs.split.startswith("inside documents")
    pieces = list(docs)
    assert [v for v, _ in pieces] == [False, True] * 3
    assert [pieces[2 * i][1] + pieces[2 * i + 1][1] for i in range(3)] == texts  # each cut at a line break
    held = sum(len(d) for v, d in pieces if v) / sum(map(len, texts))
    assert 0.08 < held < 0.12, held


def test_a_held_out_share_over_twice_val_fraction_cuts_inside_documents(tmp_path):
    root = make_docs(tmp_path / "d", 12)
    files = R.find_files(str(root))
    cfg = DataConfig(dataset=str(root), val_fraction=0.1)
    even = R.Documents(files, cfg)
    assert not even.cut_each and even.split == "whole documents: 1 of 12 held out"
    held_out = [d for v, d in even if v][0]
    big = next(p for p in files if p.read_text() == held_out)
    write(big, held_out + "more words\n" * 500)  # now most of the corpus
    assert R.Documents(files, cfg).cut_each


def test_the_cache_records_the_split_it_used(tmp_path):
    root = tmp_path / "d"
    for i in range(2):
        write(root / f"f{i}.txt", "".join(f"line {j}\n" for j in range(200)))
    corpus = C.open_corpus(cfg_for(root, tmp_path))
    assert corpus.meta["split"].startswith("inside documents")
    assert 0.08 < corpus.meta["val_bytes"] / (corpus.meta["val_bytes"] + corpus.meta["train_bytes"]) < 0.12


def test_a_changed_tokenizer_is_named_in_words_when_the_cache_is_rebuilt(tmp_path, caplog):
    root = make_docs(tmp_path / "d")
    C.open_corpus(cfg_for(root, tmp_path, tokenizer="char96"))
    with caplog.at_level("INFO"):
        C.open_corpus(cfg_for(root, tmp_path, tokenizer="bpe", bpe_vocab_size=300))
    said = [r.getMessage() for r in caplog.records if "tokenizer changed" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        "the tokenizer changed (the cache was built with char96; this run asks for bpe trained to 300 ids)"), said
    assert "{" not in said[0]


@pytest.mark.parametrize("files, warned", [
    ({"a.py": "def f(x):\n    return x\n", "b.js": "function g() {\n  return 1;\n}\n"}, "2 of 2 files"),
    ({"notes.txt": "if x:\n    y = 1\n    z = 2\n    w = 3\nprint(y)\n"}, "60% of the lines begin indented"),
    ({"notes.txt": "Dear diary,\ntoday was fine.\n  (an aside)\nThe end.\n"}, None),
])
def test_code_read_with_char96_is_warned_about_once(tmp_path, caplog, files, warned):
    from sab_byon_omni.data.factory import load_datasets

    for name, text in files.items():
        write(tmp_path / "d" / name, text * 40)
    for tokenizer in ("char96", "byte"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            load_datasets(cfg_for(tmp_path / "d", tmp_path, tokenizer=tokenizer))
        said = [r.getMessage() for r in caplog.records if "looks like code" in r.getMessage()]
        if warned is None or tokenizer == "byte":
            assert said == []
        else:
            assert len(said) == 1 and warned in said[0] and "--tokenizer byte or bpe" in said[0]


def test_stats_count_skipped_files_and_bad_bytes(tmp_path, monkeypatch):
    root = make_docs(tmp_path / "d", 4)
    write(root / "blob.bin", b"\x00\x01")
    write(root / "pic.png", b"png")
    write(root / "bad.txt", b"x\xff\xfey\n")
    write(root / "locked.txt", "secret")
    real = R._sniff

    def sniff(path):
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(R, "_sniff", sniff)
    docs = R.Documents(R.find_files(str(root)), DataConfig(dataset=str(root)))
    assert docs.stats.skipped == {"binary": 2, "unreadable (Permission denied)": 1}
    assert docs.stats.files == 5 and docs.stats.bad_bytes == 2  # two invalid bytes
    assert "skipped 3 (2 binary, 1 unreadable" in docs.stats.summary()


def test_no_readable_text_names_the_reasons(tmp_path):
    write(tmp_path / "d" / "a.bin", b"\x00" * 10)
    write(tmp_path / "d" / "b.jsonl", '{"body": "x"}\n')
    want = r"no readable text in 2 files \(1 file: binary; 1 file: no 'text'"
    with pytest.raises(SabError, match=want):
        R.Documents(R.find_files(str(tmp_path / "d")), DataConfig(dataset=str(tmp_path / "d")))


# ------------------------------------------------------------------------------------------ cache
def test_cache_holds_all_documents_with_eos_and_memmaps(tmp_path):
    root = make_docs(tmp_path / "d", 10)
    cfg = cfg_for(root, tmp_path, val_fraction=0.3)
    corpus = C.open_corpus(cfg)
    tok = corpus.tokenizer
    assert isinstance(corpus.train_tokens, np.memmap) and corpus.train_tokens.dtype == np.uint16
    assert corpus.meta["documents"] == 10 and corpus.meta["val_documents"] == 3
    texts = {p.read_text() for p in root.iterdir()}
    for stream in (corpus.train_tokens, corpus.val_tokens):
        ids = np.asarray(stream)
        assert ids[-1] == tok.eos_id
        pieces = np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]
        assert all(tok.decode(p) in texts for p in pieces)
    assert corpus.meta["train_tokens"] + corpus.meta["val_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert corpus.meta["val_bytes"] + corpus.meta["train_bytes"] == sum(len(t.encode()) for t in texts)


def test_second_run_reuses_the_cache_without_reading_files(tmp_path, monkeypatch):
    root = make_docs(tmp_path / "d")
    cfg = cfg_for(root, tmp_path)
    first = C.open_corpus(cfg)
    monkeypatch.setattr(R, "read_documents", lambda *a, **k: pytest.fail("the cache was not reused"))
    second = C.open_corpus(cfg)
    assert np.array_equal(first.train_tokens, second.train_tokens)
    assert np.array_equal(first.val_tokens, second.val_tokens)


def _mtime(p: Path) -> int:
    return (p / "meta.json").stat().st_mtime_ns


@pytest.mark.parametrize("change", ["edit", "add", "remove", "tokenizer", "seed", "truncate"])
def test_cache_is_rebuilt_when_something_changed(tmp_path, change):
    root = make_docs(tmp_path / "d")
    cfg = cfg_for(root, tmp_path)
    C.open_corpus(cfg)
    cache = Path(cfg.cache_dir)
    stamp = _mtime(cache)
    time.sleep(0.01)
    if change == "edit":
        p = root / "doc03.txt"
        p.write_text("changed text\n")
        os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    elif change == "add":
        write(root / "new.md", "new file\n")
    elif change == "remove":
        (root / "doc05.txt").unlink()
    elif change == "tokenizer":
        cfg = cfg_for(root, tmp_path, tokenizer="char96")
    elif change == "seed":
        cfg = cfg_for(root, tmp_path, data_seed=7)
    else:
        with open(cache / "train.bin", "r+b") as f:
            f.truncate(10)
    corpus = C.open_corpus(cfg)
    assert _mtime(cache) != stamp
    assert corpus.meta["files"] == R.file_signature(R.find_files(str(root)))
    if change == "tokenizer":
        assert isinstance(corpus.tokenizer, Char96Tokenizer)


def test_a_given_tokenizer_must_match_the_cache_and_nothing_is_written(tmp_path):
    root = make_docs(tmp_path / "d")
    C.open_corpus(cfg_for(root, tmp_path, tokenizer="char96"))
    cache = Path(tmp_path / "cache")
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    with pytest.raises(SabError, match=r"built with tokenizer char96.*checkpoint's is byte.*--cache-dir"):
        C.open_corpus(cfg_for(root, tmp_path), ByteTokenizer())
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    # a matching tokenizer reuses it
    assert C.open_corpus(cfg_for(root, tmp_path), Char96Tokenizer()).meta["recipe"] == {"name": "char96"}


def test_bad_input_writes_no_cache(tmp_path):
    write(tmp_path / "bins" / "a.so", b"\x7fELF\x00")
    with pytest.raises(SabError, match="no readable text"):
        C.load_corpus(cfg_for(tmp_path / "bins", tmp_path))
    assert not (tmp_path / "cache").exists()


def test_too_short_for_seq_len_is_a_clear_error(tmp_path):
    root = make_docs(tmp_path / "d", 3)
    with pytest.raises(SabError, match="fewer than data.seq_len=4096"):
        C.load_corpus(cfg_for(root, tmp_path, seq_len=4096))


def test_default_cache_dir_is_under_cwd_and_named_after_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_docs(tmp_path / "mydocs", 3)
    d = corpus_cache.default_cache_dir(DataConfig(dataset=str(root)))
    assert d.parts[0] == ".sab_cache" and d.name.startswith("mydocs-")
    assert corpus_cache.default_cache_dir(DataConfig(dataset=str(root / "*.txt"))).name.startswith("mydocs-")
    assert corpus_cache.default_cache_dir(DataConfig(dataset=str(root), data_seed=5)) != d


# ---------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n, seq_len", [(2, 2), (17, 4), (100, 16), (101, 11), (10, 20)])
def test_training_windows_cover_every_target_once_without_padding(n, seq_len):
    tokens = np.arange(n, dtype=np.uint16)
    w = TokenWindows(tokens, seq_len, drop_last=True)
    targets = []
    for i in range(len(w)):
        win = w[i]
        assert len(win) == seq_len and win.dtype == np.int64  # never padded
        if i:
            assert win[0] == w[i - 1][-1]  # consecutive windows share one token
        targets.extend(win[1:].tolist())
    assert targets == list(range(1, 1 + len(targets)))  # each target exactly once, in order
    assert n - 1 - len(targets) < seq_len - 1  # at most a partial window is left over
    assert w.num_targets == len(targets)


@pytest.mark.parametrize("n, seq_len", [(2, 2), (17, 4), (101, 11), (10, 20)])
def test_validation_windows_cover_all_targets(n, seq_len):
    w = TokenWindows(np.arange(n), seq_len, drop_last=False)
    targets = [t for i in range(len(w)) for t in w[i][1:].tolist()]
    assert targets == list(range(1, n))
    with pytest.raises(IndexError):
        w[len(w)]


def test_load_corpus_windows_feed_the_trainer_batches(tmp_path):
    from sab_byon_omni.data.batching import iterate_batches

    root = make_docs(tmp_path / "d")
    tok, train, val = C.load_corpus(cfg_for(root, tmp_path, seq_len=12))
    batches = list(iterate_batches(train, 4, pad_id=tok.pad_id, epoch=0, seed=1, shuffle=True))
    assert sum(b.n_targets for b in batches) == len(train) * 11
    assert all((b.labels != -100).all() for b in batches)  # no padding in any training batch
    again = list(iterate_batches(train, 4, pad_id=tok.pad_id, epoch=0, seed=1, shuffle=True))
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(batches, again))


# ------------------------------------------------------------------------------ CLI, end to end
def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("setup, match", [
    ("missing", "no such file or folder"),
    ("empty", "the folder holds no files"),
    ("binaries", "no readable text in 2 files (2 files: binary)"),
    ("nofield", "no 'text' field"),
])
def test_bad_data_is_one_line_exit_2_and_nothing_written(in_tmp, capsys, setup, match):
    data = in_tmp / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "binaries":
        write(data / "a.bin", b"\x00\x01\x02")
        write(data / "b.dat", b"MZ\x00\x00")
    elif setup == "nofield":
        write(data / "a.jsonl", '{"body": "hello"}\n')
    before = sorted(p.name for p in in_tmp.iterdir())
    code, out, err = run_cli(["train", "--data", str(data), "--preset", "tiny", "--checkpoint_dir", "ck"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], err
    assert not any("Traceback" in line for line in lines)
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # no cache, no checkpoints


def test_tiny_end_to_end_train_on_files(in_tmp, capsys, caplog):
    caplog.set_level("INFO")
    data = in_tmp / "notes"
    for i in range(6):
        write(data / f"n{i}.md", ("the quick brown fox jumps over the lazy dog. " * 8 + "\n") * 2)
    write(data / "img.png", b"\x89PNG\x00")
    common = ["train", "--data", str(data), "--tokenizer", "byte", "--preset", "tiny", "--seq_len", "32",
              "--batch_size", "8", "--val_fraction", "0.34", "--progress", "false"]
    code, out, err = run_cli([*common, "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3",
                              "--epochs", "2", "--checkpoint_dir", "ck"], capsys)
    assert code == 0, err
    assert "skipped 1 (1 binary)" in caplog.text
    losses = [float(x) for x in out.split("validation loss per epoch: ")[1].split(" (")[0].split(", ")]
    assert len(losses) == 2 and losses[1] < losses[0] < 5.6  # learned something (ln 258 = 5.55)
    assert (in_tmp / "ck" / "best_model.pt").is_file()
    assert list((in_tmp / ".sab_cache").iterdir())
    caplog.clear()
    code, out, err = run_cli([*common, "--epochs", "1", "--checkpoint_dir", "ck2", "--max_steps", "1"], capsys)
    assert code == 0 and "reusing cache" in caplog.text


def test_processes_starting_together_build_the_cache_once(tmp_path, monkeypatch):
    import threading

    root = make_docs(tmp_path / "d")
    cfg = cfg_for(root, tmp_path)
    builds = []
    real = corpus_cache.build

    def counting_build(*a, **k):
        builds.append(1)
        time.sleep(0.2)  # give the other one time to arrive at the lock
        return real(*a, **k)

    monkeypatch.setattr(corpus_cache, "build", counting_build)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(C.open_corpus(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len(builds) == 1
    assert np.array_equal(results[0].train_tokens, results[1].train_tokens)


def test_a_large_file_read_in_pieces_gets_eos_only_where_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "CHUNK_BYTES", 64)
    big = "".join(f"row {i}\n" for i in range(200))
    write(tmp_path / "d" / "big.txt", big)
    write(tmp_path / "d" / "small.txt", "small\n")
    corpus = C.open_corpus(cfg_for(tmp_path / "d", tmp_path, val_fraction=0.2))
    assert corpus.meta["documents"] > 10
    tok = corpus.tokenizer
    for stream in (corpus.train_tokens, corpus.val_tokens):
        ids = np.asarray(stream)
        pieces = [tok.decode(p) for p in np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]]
        for p in pieces:  # each run between <EOS> is the small file or a contiguous stretch of the big one
            assert p == "small\n" or p in big
    n_eos = sum(int((np.asarray(s) == tok.eos_id).sum()) for s in (corpus.train_tokens, corpus.val_tokens))
    assert n_eos < corpus.meta["documents"]  # not one per piece
