"""Columnar corpora: ``.parquet`` files, arrow IPC files (``.arrow``, ``.feather``) and the folders
that Hugging Face ``datasets`` writes with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

One row is one document: the string in the column ``data.text_field``. Files are read with pyarrow
(an optional dependency: ``pip install 'sab-byon-omni[data]'``) a slice of rows at a time, so the
memory a read holds is bounded by :data:`TARGET_BYTES` of text (or by one stored record batch of an
arrow file), never by the size of the file: nothing is memory-mapped and parquet pages are read
through a buffer of :data:`READ_BUFFER` bytes. A dictionary-encoded column (one stored value that
many rows repeat) is decoded a slice of rows at a time too.

A few hundred bytes of parquet can declare gigabytes of text (a compressed dictionary of one long
value that a million rows repeat), so the sizes a file declares are checked against its real size
before it is read: column data larger than the file is a damaged file, and a file that would give
more than :data:`MAX_EXPANSION` times its size in text (or rows) is skipped as a decompression bomb;
the text actually decoded is held to the same bound while reading. An arrow file's compressed
batches are held to it by the sizes their buffers declare, before pyarrow decompresses one whole.

A ``datasets`` folder (``state.json`` listing its ``_data_files`` beside ``dataset_info.json``) is
one dataset: its data files are read in the order ``state.json`` gives, and nothing else in it
(metadata, the ``cache-*.arrow`` files that ``Dataset.map`` leaves there) is read. A
``DatasetDict`` folder (``dataset_dict.json``) is the data files of each of its splits.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.untrusted import read_json

EXTENSIONS = {".parquet", ".arrow", ".feather"}  # .feather: an arrow IPC file
STATE_FILE, INFO_FILE, DICT_FILE = "state.json", "dataset_info.json", "dataset_dict.json"
TARGET_BYTES = 4 << 20  # text converted to Python strings at a time
READ_BUFFER = 1 << 20  # parquet pages are read through a buffer this size (0 would read whole column chunks)
MAX_ROWS = 1024  # also the bound where a dictionary-encoded column makes the stored size look small
MAX_EXPANSION = 1000  # text (and rows) per byte of file; real text compresses 3-10x, a bomb by millions
BOMB = f"it would decode to more than {MAX_EXPANSION}x its size (a decompression bomb?)"
INSTALL = "pip install 'sab-byon-omni[data]' (or pip install pyarrow)"


class Unusable(Exception):
    """This file holds no usable text column (the message is the reason, counted like a skip)."""


def is_columnar(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SabError(f"{path}: reading {path.suffix} files needs pyarrow: {INSTALL}") from None
    return pyarrow


# ------------------------------------------------------------------------------------ reading
def column_values(path: Path, column: str) -> Iterator[bytes]:
    """The non-empty values of ``column`` in ``path``, as UTF-8 bytes (the caller decodes them);
    raises :class:`Unusable` (no such column, not text, not a valid file, a decompression bomb) or
    OSError (unreadable)."""
    pa = _pyarrow(path)
    kind = "parquet" if path.suffix.lower() == ".parquet" else "arrow"
    budget = MAX_EXPANSION * path.stat().st_size  # bytes of text this file may decode to
    try:
        arrays = _parquet_arrays(pa, path, column, budget) if kind == "parquet" else _ipc_arrays(pa, path, column,
                                                                                                   budget)
        for array in arrays:
            for value in _values(pa, array):
                budget -= len(value)
                if budget < 0:
                    raise Unusable(BOMB)
                yield value
    except pa.ArrowMemoryError:  # an allocation that sizes stored in the file asked for (our slices are bounded)
        raise Unusable(f"invalid {kind} file (it asks for more memory than this machine gives)") from None
    except pa.ArrowException as e:
        raise Unusable(f"invalid {kind} file") from e
    except OSError as e:
        if e.errno is None:  # pyarrow's own I/O errors: a truncated or corrupt file
            raise Unusable(f"invalid {kind} file") from e
        raise


def _check_column(pa: Any, schema: Any, column: str) -> int:
    """The index of ``column`` in ``schema``; Unusable when it is missing or not text."""
    i = schema.get_field_index(column)
    if i < 0:
        raise Unusable(f"no {column!r} column (set data.text_field)")
    t = schema.field(i).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise Unusable(f"column {column!r} is not text (set data.text_field)")
    return i


def _parquet_arrays(pa: Any, path: Path, column: str, budget: int) -> Iterator[Any]:
    meta = pa.parquet.read_metadata(path)
    _check_column(pa, meta.schema.to_arrow_schema(), column)
    chunks = [group.column(c) for group in map(meta.row_group, range(meta.num_row_groups))
              for c in range(group.num_columns) if group.column(c).path_in_schema == column]
    _check_sizes(meta, chunks, path.stat().st_size, budget)
    dictionary = [column] if any(c.has_dictionary_page for c in chunks) else None  # keep it encoded: decode slices
    f = pa.parquet.ParquetFile(path, memory_map=False, buffer_size=READ_BUFFER, pre_buffer=False,
                               read_dictionary=dictionary)
    rows = _rows_per_batch(meta, column)
    for batch in f.iter_batches(batch_size=rows, columns=[column], use_threads=False):
        yield batch.column(0)


def _check_sizes(meta: Any, chunks: list[Any], size: int, budget: int) -> None:
    """The sizes the footer declares against the file's real ``size``: each column chunk must lie
    inside the file, and the rows and the text they decode to must be within ``budget``."""
    for c in chunks:
        start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
        if not (0 <= start and 0 <= c.total_compressed_size and start + c.total_compressed_size <= size):
            raise Unusable("invalid parquet file (its column data lies outside the file)")
    if meta.num_rows > budget or sum(max(c.total_uncompressed_size, 0) for c in chunks) > budget:
        raise Unusable(BOMB)


def _rows_per_batch(meta: Any, column: str) -> int:
    """Rows of about TARGET_BYTES of ``column``, from the largest average row of any row group."""
    widest = 1.0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                   if group.column(c).path_in_schema == column)
        widest = max(widest, size / max(group.num_rows, 1))
    return int(min(max(TARGET_BYTES // widest, 1), MAX_ROWS))


def _ipc_arrays(pa: Any, path: Path, column: str, budget: int) -> Iterator[Any]:
    """An arrow IPC stream (what ``datasets`` writes) or file (feather v2), one record batch at a time."""
    with pa.OSFile(str(path)) as f:
        is_file = f.read(6) == b"ARROW1"
        f.seek(8 if is_file else 0)  # a file is the stream format after 8 bytes
        if _ipc_unpacked_size(pa, f) > budget:
            raise Unusable(BOMB)
        f.seek(0)
        reader = pa.ipc.open_file(f) if is_file else pa.ipc.open_stream(f)
        i = _check_column(pa, reader.schema, column)
        if is_file:
            for b in range(reader.num_record_batches):
                yield reader.get_batch(b).column(i)
        else:
            for batch in reader:
                yield batch.column(i)


def _ipc_unpacked_size(pa: Any, f: Any) -> int:
    """The bytes the batches of an arrow IPC stream take once decompressed, from what it declares
    (nothing is decompressed): a batch body with buffer compression starts each buffer with its
    length uncompressed (the batch's metadata, a flatbuffer, says where the buffers are); an
    uncompressed body is its own size."""
    total = 0
    reader = pa.ipc.MessageReader.open_stream(f)
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            return total
        if message.type not in ("record batch", "dictionary") or message.body is None:
            continue
        try:
            total += _unpacked_body(bytes(message.metadata), memoryview(message.body))
        except (IndexError, ValueError, struct.error):  # offsets outside the metadata or the body
            raise pa.ArrowInvalid("batch metadata out of bounds") from None


def _unpacked_body(meta: bytes, body: memoryview) -> int:
    """One batch message (flatbuffers, Arrow's Message.fbs): Message.header (field 2) is a
    RecordBatch, or a DictionaryBatch whose ``data`` (field 1) is; RecordBatch.buffers (field 2)
    are (offset, length) pairs into the body, RecordBatch.compression (field 3) is set when they
    are compressed."""
    def field(table: int, i: int) -> int | None:  # where field i of the table at ``table`` is stored
        vtable = table - struct.unpack_from("<i", meta, table)[0]
        if 4 + 2 * i >= struct.unpack_from("<H", meta, vtable)[0]:
            return None
        at = struct.unpack_from("<H", meta, vtable + 4 + 2 * i)[0]
        return table + at if at else None

    def target(at: int | None) -> int:  # the table or vector an offset field points to
        if at is None:
            raise ValueError("a field the batch needs is missing")
        return at + struct.unpack_from("<I", meta, at)[0]

    message = target(0)
    header_type = field(message, 1)
    batch = target(field(message, 2))
    if header_type is not None and meta[header_type] == 2:  # a DictionaryBatch: its RecordBatch
        batch = target(field(batch, 1))
    if field(batch, 3) is None:  # not compressed
        return len(body)
    buffers = target(field(batch, 2))
    total = 0
    for k in range(struct.unpack_from("<I", meta, buffers)[0]):
        offset, length = struct.unpack_from("<qq", meta, buffers + 4 + 16 * k)
        if length >= 8:
            (unpacked,) = struct.unpack_from("<q", body, offset)
            total += length - 8 if unpacked == -1 else unpacked
    return total


def _values(pa: Any, array: Any) -> Iterator[bytes]:
    """The non-empty values of one string array, converted about TARGET_BYTES at a time (a
    dictionary-encoded one decoded a slice of rows at a time: its rows may repeat a long value).
    Offsets and dictionary indices outside their buffers raise ArrowInvalid (an invalid file)."""
    n = len(array)
    if pa.types.is_dictionary(array.type):
        text = _binary(pa, array.dictionary)
        lengths = np.asarray(pa.compute.binary_length(text).fill_null(0), dtype=np.int64)
        indices = np.asarray(array.indices.fill_null(0), dtype=np.int64)
        if n and not 0 <= indices.min() <= indices.max() < len(lengths):
            raise pa.ArrowInvalid("a dictionary index out of range")
        ends = np.cumsum(lengths[indices])
        start = 0
        while start < n:  # rows of about TARGET_BYTES of text, at least one
            base = ends[start - 1] if start else 0
            stop = max(int(np.searchsorted(ends, base + TARGET_BYTES, side="right")), start + 1)
            yield from (v for v in pa.compute.take(text, array.indices.slice(start, stop - start)).to_pylist() if v)
            start = stop
        return
    array = _binary(pa, array)
    step = int(min(max(TARGET_BYTES * n // max(array.nbytes, 1), 1), n or 1))
    for start in range(0, n, step):
        for value in array.slice(start, step).to_pylist():
            if value:
                yield value


def _binary(pa: Any, array: Any) -> Any:
    """A string array as bytes (invalid UTF-8 is the caller's to replace), checked to be well-formed."""
    array = array.cast(pa.large_binary() if pa.types.is_large_string(array.type) else pa.binary())
    array.validate(full=True)
    return array


# ------------------------------------------------------------------------------------ folders
def dataset_files(folder: Path, names: list[str]) -> list[Path] | None:
    """The data files of ``folder`` when it is a ``datasets`` folder (``names``: the files in it),
    in the order it lists them; None when it is not one. A SabError when it is one but broken."""
    if DICT_FILE in names:
        splits = _read_json(folder / DICT_FILE).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise SabError(f"{folder / DICT_FILE}: no list of splits: re-save it with DatasetDict.save_to_disk")
        out: list[Path] = []
        for split in splits:
            sub = folder / _plain_name(folder / DICT_FILE, split)
            files = dataset_files(sub, _listdir(sub)) if sub.is_dir() else None
            if files is None:
                raise SabError(f"{folder / DICT_FILE} lists the split {bounded(split)}, which is not a "
                               "datasets folder here: the folder is incomplete")
            out.extend(files)
        return out
    if STATE_FILE not in names or INFO_FILE not in names:
        return None
    state = _read_json(folder / STATE_FILE)
    if "_data_files" not in state:
        return None  # a state.json of something else
    listed = state["_data_files"]
    if not isinstance(listed, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                               for f in listed):
        raise SabError(f"{folder / STATE_FILE}: _data_files is not a list of files: re-save the dataset")
    paths = [folder / _plain_name(folder / STATE_FILE, f["filename"]) for f in listed]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SabError(f"{folder / STATE_FILE} lists {bounded(missing[0])}, which is missing: the dataset folder "
                       "is incomplete (re-save it with save_to_disk)")
    return paths


def _plain_name(where: Path, name: str) -> str:
    if not name or Path(name).name != name or name in (".", ".."):
        raise SabError(f"{where}: {bounded(name)} is not a file name in its folder")
    return name


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise SabError(f"{path}: not a JSON object")
    return data


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise SabError(f"cannot list {folder}: {e.strerror or e}") from None
