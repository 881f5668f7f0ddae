"""Corpora from parquet files, arrow files and Hugging Face ``datasets`` folders: one document per
row of ``data.text_field``, the same split, tokens and bad-input rules as the other formats, a
``datasets`` folder read as one dataset, a clear error without pyarrow, and memory that stays
bounded on a file larger than the memory a process is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import columnar
from sab_byon_omni.data import corpus as C
from sab_byon_omni.data import readers as R
from sab_byon_omni.errors import SabError

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: E402,F401 (pa.ipc)
import pyarrow.parquet as pq  # noqa: E402

TEXTS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1) + "é\n" for i in range(40)]


def cfg_for(data: Path | str, tmp: Path, **kw) -> DataConfig:
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("seq_len", 16)
    return DataConfig(dataset=str(data), cache_dir=str(tmp / f"cache-{Path(data).name}"), **kw)


def docs_of(path: Path, **kw) -> list[str]:
    return list(R.read_documents(path, **kw))


def write_parquet(path: Path, column: list, name: str = "text", row_group_size: int = 7, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: column, "id": list(range(len(column)))}), path, row_group_size=row_group_size,
                   **options)
    return path


def write_arrow_stream(path: Path, table, batch_rows: int = 5) -> Path:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=batch_rows):
            w.write_batch(batch)
    return path


def write_dataset_folder(folder: Path, texts: list, shards: int = 3, field: str = "text") -> Path:
    """What ``Dataset.save_to_disk`` writes (checked against the real thing below), made with pyarrow only."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per = -(-len(texts) // shards)
    for i, name in enumerate(names):
        write_arrow_stream(folder / name, pa.table({field: texts[i * per:(i + 1) * per]}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {field: {"dtype": "string"}}}))
    return folder


def write_jsonl(path: Path, texts: list, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def same_corpus(a: C.Corpus, b: C.Corpus) -> None:
    assert np.array_equal(a.train_tokens, b.train_tokens)
    assert np.array_equal(a.val_tokens, b.val_tokens)
    for key in ("documents", "val_documents", "train_bytes", "val_bytes"):
        assert a.meta[key] == b.meta[key], key


# --------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind", ["string", "large_string", "dictionary"])
def test_one_document_per_row_of_the_text_field(tmp_path, kind):
    values = ["first row", None, "", "second\nrow é", "third"]
    array = pa.array(values, type=pa.large_string() if kind == "large_string" else pa.string())
    if kind == "dictionary":
        array = array.dictionary_encode()
    p = write_parquet(tmp_path / "a.parquet", array, name="body", row_group_size=2)
    assert docs_of(p, text_field="body") == ["first row", "second\nrow é", "third"]  # nulls and "" skipped


def test_missing_or_non_text_column_is_a_skip_reason_like_json(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", ["x", "y"], name="body")
    with pytest.raises(R.SkipFile, match=r"no 'text' column \(set data.text_field\)"):
        docs_of(p)
    with pytest.raises(R.SkipFile, match="column 'id' is not text"):
        docs_of(p, text_field="id")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_invalid_file_is_skipped_and_counted_and_the_rest_is_read(tmp_path, damage):
    good = write_parquet(tmp_path / "d" / "a.parquet", TEXTS)
    bad = tmp_path / "d" / "b.parquet"
    raw = good.read_bytes()
    bad.write_bytes(b"not a parquet file at all" if damage == "garbage" else raw[: len(raw) // 2] + raw[-64:])
    (tmp_path / "d" / "c.arrow").write_bytes(b"\x00" * 40)
    docs = R.Documents(R.find_files(str(tmp_path / "d")), DataConfig(dataset=str(tmp_path / "d")))
    assert docs.stats.skipped == {"invalid parquet file": 1, "invalid arrow file": 1}
    assert docs.n_docs == len(TEXTS) and docs.stats.files == 1


def test_invalid_utf8_in_a_string_column_is_replaced_and_counted(tmp_path):
    raw = [b"ok", b"bad \xff byte", b"\xe9t\xe9"]
    offsets = np.cumsum([0] + [len(v) for v in raw]).astype(np.int32)
    array = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(raw))])
    p = write_parquet(tmp_path / "a.parquet", array)
    stats = R.ReadStats()
    assert list(R.read_documents(p, stats=stats)) == ["ok", "bad \ufffd byte", "\ufffdt\ufffd"]
    assert stats.bad_bytes == 3


def test_arrow_stream_and_file_formats(tmp_path):
    table = pa.table({"text": TEXTS[:9]})
    stream = write_arrow_stream(tmp_path / "s.arrow", table)
    with pa.OSFile(str(tmp_path / "f.feather"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    assert docs_of(stream) == docs_of(tmp_path / "f.feather") == TEXTS[:9]


def test_wide_rows_are_read_a_few_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(columnar, "TARGET_BYTES", 1000)
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size, **kw):
        for batch in real(self, batch_size=batch_size, **kw):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    texts = ["x" * 400] * 20
    assert docs_of(write_parquet(tmp_path / "a.parquet", texts, row_group_size=20, use_dictionary=False)) == texts
    assert sum(seen) == 20 and max(seen) <= 3  # about TARGET_BYTES of text at a time, not the row group


# ------------------------------------------------------------------- the same corpus as jsonl
@pytest.mark.parametrize("source", ["parquet", "arrow", "datasets-folder"])
def test_the_corpus_equals_the_same_records_as_jsonl(tmp_path, source):
    reference = C.open_corpus(cfg_for(write_jsonl(tmp_path / "a.jsonl", TEXTS, "body"), tmp_path,
                                      text_field="body", val_fraction=0.2))
    if source == "parquet":
        data = write_parquet(tmp_path / "a.parquet", TEXTS, name="body")
    elif source == "arrow":
        data = write_arrow_stream(tmp_path / "a.arrow", pa.table({"body": TEXTS}))
    else:
        data = write_dataset_folder(tmp_path / "ds", TEXTS, field="body")
    got = C.open_corpus(cfg_for(data, tmp_path, text_field="body", val_fraction=0.2))
    same_corpus(got, reference)  # same documents in the same order: the same split and tokens


def test_a_datasets_folder_is_one_dataset_not_loose_files(tmp_path):
    ds = write_dataset_folder(tmp_path / "corpus" / "ds", TEXTS)
    write_arrow_stream(ds / "cache-0123abcd.arrow", pa.table({"text": ["left by Dataset.map"]}))  # not listed
    (tmp_path / "corpus" / "notes.md").write_text("a loose file beside it\n")
    files = R.find_files(str(tmp_path / "corpus"))
    assert [f.name for f in files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)] + ["notes.md"]
    docs = R.Documents(files, DataConfig(dataset=str(tmp_path / "corpus")))
    assert docs.n_docs == len(TEXTS) + 1 and not docs.stats.skipped  # no metadata read as JSON


@pytest.mark.parametrize("breakage, match", [
    ("missing shard", r"lists 'data-00001-of-00003.arrow', which is missing"),
    ("not a list", "_data_files is not a list of files"),
    ("outside", "is not a file name in its folder"),
    ("bad json", "not valid JSON"),
])
def test_a_broken_datasets_folder_is_a_clear_error(tmp_path, breakage, match):
    ds = write_dataset_folder(tmp_path / "ds", TEXTS)
    state = ds / "state.json"
    if breakage == "missing shard":
        (ds / "data-00001-of-00003.arrow").unlink()
    elif breakage == "not a list":
        state.write_text(json.dumps({"_data_files": "data.arrow"}))
    elif breakage == "outside":
        state.write_text(json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}))
    else:
        state.write_text("{broken")
    with pytest.raises(SabError, match=match):
        R.find_files(str(ds))


def test_cache_is_reused_and_rebuilt_when_the_parquet_file_changes(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    p = write_parquet(tmp_path / "a.parquet", TEXTS)
    cfg = cfg_for(p, tmp_path)
    first = C.open_corpus(cfg)
    C.open_corpus(cfg)
    assert "reusing cache" in caplog.text
    write_parquet(p, TEXTS[:-5])
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    second = C.open_corpus(cfg)
    assert second.meta["documents"] == len(TEXTS) - 5 < first.meta["documents"]


def test_without_pyarrow_a_clear_error_names_the_install_command(in_tmp, capsys, monkeypatch):
    from sab_byon_omni.cli import main

    write_parquet(in_tmp / "data" / "a.parquet", TEXTS)
    for name in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow -> ImportError
    code = main(["train", "--data", "data", "--preset", "tiny", "--checkpoint_dir", "ck"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "pip install 'sab-byon-omni[data]'" in err[-1], err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["data"]  # nothing written


# ------------------------------------------------------------------------- the real `datasets`
def test_folders_written_by_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    datasets.DatasetDict({"train": ds.select(range(30)), "test": ds.select(range(30, 40))}).save_to_disk(
        str(tmp_path / "dict"))
    reference = C.open_corpus(cfg_for(write_jsonl(tmp_path / "a.jsonl", TEXTS), tmp_path))
    same_corpus(C.open_corpus(cfg_for(tmp_path / "one", tmp_path)), reference)
    files = R.find_files(str(tmp_path / "dict"))  # each split's data files, sorted by path: test, then train
    assert [f.parent.name for f in files] == ["test", "train"]
    docs = R.Documents(files, DataConfig(dataset=str(tmp_path / "dict")))
    assert docs.n_docs == len(TEXTS) and not docs.stats.skipped
    assert sorted(text for _, text in docs) == sorted(TEXTS)  # every row of both splits, once


# ------------------------------------------------------------------------------ bounded memory
LIMIT_MB, FILE_MB = 512, 560

CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, (%d << 20, %d << 20))
    if sys.argv[1] == "whole":  # the control: holding the file in memory does not fit under the limit
        import pyarrow.parquet as pq
        pq.read_table(sys.argv[2])
        sys.exit(0)
    from sab_byon_omni.data import cache
    from sab_byon_omni.data.readers import Documents, file_signature, find_files
    from sab_byon_omni.config import DataConfig
    cfg = DataConfig(dataset=sys.argv[2], tokenizer="byte")
    files = find_files(cfg.dataset)
    docs = Documents(files, cfg)
    out = Path(sys.argv[3])
    out.mkdir()
    cache.build(cfg, docs, file_signature(files), out, None, cache.tokenizer_recipe(cfg))  # writes meta.json last
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print("peak address space", status["VmPeak"].strip())
""") % (LIMIT_MB, LIMIT_MB)


def test_a_parquet_file_larger_than_the_memory_limit_is_read_in_bounded_memory(tmp_path):
    """The child may map at most LIMIT_MB of address space (interpreter, numpy and pyarrow included);
    the file is FILE_MB in one row group, stored without compression, so neither it nor its one row
    group can be held whole."""
    path, row = tmp_path / "big.parquet", ("The quick brown fox jumps over the lazy dog. " * 1500)[:1 << 16]
    rows = FILE_MB << 4
    table = pa.table({"text": pa.array([row] * rows)})
    pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=rows)  # one row group
    del table
    assert path.stat().st_size > LIMIT_MB << 20 and pq.ParquetFile(path).metadata.num_row_groups == 1
    # the system allocator with one arena: no address space reserved ahead by mimalloc or per-thread arenas
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "1"}
    try:
        def child(*args):
            return subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                                  timeout=600)

        control = child("whole", str(path))
        assert control.returncode != 0 and "MemoryError" in control.stderr, control.stderr[-2000:]
        out = child("stream", str(path), str(tmp_path / "cache"))
        assert out.returncode == 0, out.stderr[-3000:]
        meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
        assert meta["documents"] == rows and meta["train_tokens"] + meta["val_tokens"] == rows * (len(row) + 1)
    finally:  # 1.5 GB: not left behind in the temporary folders pytest keeps
        for p in (path, tmp_path / "cache" / "train.bin", tmp_path / "cache" / "val.bin"):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------- decompression bombs
BOMB_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    from sab_byon_omni.data import readers as R
    sizes, reason = [], None
    try:
        for doc in R.read_documents(Path(sys.argv[1])):
            sizes.append(len(doc))
            if len(sizes) == int(sys.argv[2]):
                break
    except R.SkipFile as e:
        reason = str(e)
    print(json.dumps({"sizes": sizes[:5], "n": len(sizes), "skipped": reason}))
""")


def write_dictionary_bomb(path: Path, padding: int) -> Path:
    """1,040 rows that repeat one 2.9 MB value, stored once in a zstd dictionary page (3 GB of text
    from 533 bytes of file), beside ``padding`` bytes of random data in another column. Written from
    a dictionary array (3 GB is never held here), without the arrow schema, so the file reads back
    as plain strings, as a file from another writer would."""
    rng = np.random.default_rng(0)
    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(1040, dtype=np.int32)), pa.array(["x" * 2_900_000]))
    pad = pa.array([rng.bytes(padding // 1040) for _ in range(1040)], pa.binary())
    pq.write_table(pa.table({"text": text, "pad": pad}), path, compression="zstd", use_dictionary=["text"],
                   dictionary_pagesize_limit=1 << 30, row_group_size=2000, store_schema=False)
    return path


@pytest.mark.parametrize("padding, read, expect", [
    (0, 3, "skipped"),  # declares 2.9 MB of text in 533 bytes: refused before reading
    (8 << 20, 3, "read"),  # plausible sizes: a slice of rows at a time, not 1,024 rows of 2.9 MB (3 GB)
    (1 << 20, 0, "skipped"),  # plausible sizes, but decodes past 1000x the file's size: stopped there
])
def test_a_parquet_dictionary_bomb_is_skipped_or_read_in_bounded_memory(tmp_path, padding, read, expect):
    """Read in a child capped at 1.5 GiB of address space: before, the first batch asked pyarrow for
    gigabytes (an ArrowMemoryError traceback, or 3 GB of memory without the cap)."""
    path = write_dictionary_bomb(tmp_path / "bomb.parquet", padding)
    out = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(path), str(read)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    if expect == "skipped":
        assert result["skipped"] == columnar.BOMB and result["n"] < 1040, result
    else:
        assert result["skipped"] is None and result["sizes"] == [2_900_000] * 3, result


def test_a_dictionary_encoded_column_reads_the_same_as_a_plain_one(tmp_path):
    texts = [TEXTS[i % 3] for i in range(50)] + [None, ""] + TEXTS[3:8]
    plain = docs_of(write_parquet(tmp_path / "plain.parquet", texts, row_group_size=20, use_dictionary=False))
    encoded = docs_of(write_parquet(tmp_path / "dict.parquet", texts, row_group_size=20, use_dictionary=True))
    assert plain == encoded == [t for t in texts if t]
    assert pq.ParquetFile(tmp_path / "dict.parquet").metadata.row_group(0).column(0).has_dictionary_page


WRITE_IPC_BOMB = textwrap.dedent("""
    import sys
    import pyarrow as pa, pyarrow.ipc
    table = pa.table({"text": pa.array(["z" * (20 << 20)] * 40)})  # 800 MiB, held by this writer only
    with pa.OSFile(sys.argv[1], "wb") as f, pa.ipc.new_stream(
            f, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
""")


def test_an_arrow_stream_compression_bomb_is_skipped_before_it_is_decompressed(tmp_path):
    """800 MiB of text in one zstd-compressed record batch of a 100 KB file: pyarrow decompresses a
    batch whole, so the sizes its buffers declare are added up first (before, the reader asked for
    the 800 MiB and, under a 1 GiB cap, failed with a MemoryError traceback)."""
    path = tmp_path / "bomb.arrow"
    subprocess.run([sys.executable, "-c", WRITE_IPC_BOMB, str(path)], check=True, timeout=300)
    assert path.stat().st_size < 1 << 20
    child = BOMB_CHILD.replace("1536 << 20", "1024 << 20")
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run([sys.executable, "-c", child, str(path), "0"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {"sizes": [], "n": 0, "skipped": columnar.BOMB}


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
def test_arrow_files_with_buffer_compression_and_dictionaries_read_as_written(tmp_path, compression):
    table = pa.table({"text": pa.array(TEXTS).dictionary_encode(), "id": list(range(len(TEXTS)))})
    options = pa.ipc.IpcWriteOptions(compression=compression)
    stream = tmp_path / "s.arrow"
    with pa.OSFile(str(stream), "wb") as f, pa.ipc.new_stream(f, table.schema, options=options) as w:
        for batch in table.to_batches(max_chunksize=7):
            w.write_batch(batch)
    with pa.OSFile(str(tmp_path / "f.feather"), "wb") as f, pa.ipc.new_file(f, table.schema, options=options) as w:
        w.write_table(table, max_chunksize=9)
    assert docs_of(stream) == docs_of(tmp_path / "f.feather") == TEXTS
