"""The header of a GGUF file we did not write, read within limits before anything trusts it.

A GGUF file is a little-endian header (magic ``GGUF``, version, tensor count, key/value count,
the key/value metadata, then one record per tensor: name, dimensions, ggml type, offset) followed
by the tensor data at an aligned offset. Every count and length in it is the file's word. The
``gguf`` package's ``GGUFReader`` walks an array as long as its stated length, one element at a
time, even past the end of the file (where each element reads as nothing): 30 bytes claiming
2^63 elements keep it busy forever. So the header is read here instead, with each length checked
against the bytes that remain and against limits no model comes near (:data:`MAX_ITEMS` values
in all, :data:`MAX_STRING_BYTES` per string, :data:`MAX_TENSORS` tensors, :data:`MAX_DEPTH` levels
of arrays), and every tensor's extent checked against the file's real size: positive dimensions,
at most :data:`MAX_DIMS` of them, whole blocks of its type, aligned, inside the file, and not
overlapping another. Memory and time are then bounded by the file's size. Nothing in the file is
executed or evaluated: metadata values are numbers, booleans, strings and lists of them.

This module knows the layout only; which architectures and types a model may use is decided above
it (``interop.gguf``), which passes the block sizes of the ggml types in :func:`read_gguf_header`.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.untrusted import file_kind

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEYS = 10_000  # key/value pairs (a model has 30-60)
MAX_TENSORS = 1 << 16  # a large mixture-of-experts model has a few thousand
MAX_KEY_BYTES = 1024
MAX_NAME_BYTES = 1024
MAX_STRING_BYTES = 16 << 20  # one string value (a chat template is a few KB)
MAX_ITEMS = 1 << 22  # array elements in the whole header (a 262k-token vocabulary with scores and types: 0.8M)
MAX_DEPTH = 3  # arrays inside arrays
MAX_ALIGNMENT = 1 << 16
# value types: fixed-size ones as struct codes; 7 bool, 8 string, 9 array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
BOOL, STRING, ARRAY = 7, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's record: ``shape`` in torch order (rows first: the reverse of GGUF's
    ``ne``), ``offset`` from the start of the file, ``nbytes`` of its data there."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_size: int


class _Truncated(Exception):
    pass


class _Cursor:
    """Reads little-endian values from ``buf``, never past its end, counting array elements."""

    def __init__(self, buf: Any, source: str) -> None:
        self.buf, self.at, self.size, self.source, self.items = buf, 0, len(buf), source, 0

    def refuse(self, why: str) -> SabError:
        return SabError(f"{self.source}: refused to load: {why} (a damaged or hostile GGUF file?)")

    def unpack(self, code: str, count: int = 1) -> tuple[Any, ...]:
        n = struct.calcsize(f"<{count}{code}")
        if self.at + n > self.size:
            raise _Truncated
        values = struct.unpack_from(f"<{count}{code}", self.buf, self.at)
        self.at += n
        return values

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def string(self, limit: int = MAX_STRING_BYTES, what: str = "a string") -> str:
        n = self.u64()
        if n > limit:
            raise self.refuse(f"{what} of {n:,} bytes (at most {limit:,})")
        if self.at + n > self.size:
            raise _Truncated
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.refuse(f"{what} that is not UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])[0]
        if kind == BOOL:
            return bool(self.unpack("B")[0])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise self.refuse(f"a metadata value of unknown type {kind}")
        if depth >= MAX_DEPTH:
            raise self.refuse(f"arrays nested more than {MAX_DEPTH} deep")
        item, count = self.u32(), self.u64()
        self.items += count
        if self.items > MAX_ITEMS:
            raise self.refuse(f"arrays of more than {MAX_ITEMS:,} values in all")
        if item in _SCALARS:  # read at once: the count is bounded above and by the bytes left
            return list(self.unpack(_SCALARS[item], count))
        if item == BOOL:
            return [bool(b) for b in self.unpack("B", count)]
        if item in (STRING, ARRAY) and self.at + 8 * count > self.size:  # each element holds a length at least
            raise _Truncated
        return [self.value(item, depth + 1) for _ in range(count)]


def read_gguf_header(path: str | Path, block_sizes: Mapping[int, tuple[int, int]]) -> GGUFHeader:
    """The checked header of the GGUF file at ``path``; ``block_sizes``: for every ggml type id
    this code knows, (values per block, bytes per block). A SabError names what is wrong."""
    p = Path(path)
    if not p.is_file():  # a pipe or a device would never end
        raise SabError(f"{p}: not found, or not a regular file")
    try:
        with open(p, "rb") as f:
            size = p.stat().st_size
            if size < 24:
                raise SabError(f"{p}: not a GGUF file: {size} bytes is shorter than its fixed header (truncated?)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _read(_Cursor(buf, str(p)), block_sizes)
    except OSError as e:
        raise SabError(f"cannot read {p}: {e.strerror or e}") from None


def _read(c: _Cursor, block_sizes: Mapping[int, tuple[int, int]]) -> GGUFHeader:
    if bytes(c.buf[:4]) != MAGIC:
        raise SabError(f"{c.source}: not a GGUF file: it {file_kind(bytes(c.buf[:16]))}")
    c.at = 4
    version = c.u32()
    if version & 0xFFFF == 0 and version:
        raise SabError(f"{c.source}: a big-endian GGUF file; only little-endian ones are read")
    if version not in VERSIONS:
        raise SabError(f"{c.source}: GGUF version {version} is not one this reads ({', '.join(map(str, VERSIONS))})")
    n_tensors, n_keys = c.u64(), c.u64()
    if n_keys > MAX_KEYS or n_tensors > MAX_TENSORS:
        raise c.refuse(f"it claims {n_keys:,} metadata keys and {n_tensors:,} tensors (at most {MAX_KEYS:,} "
                       f"and {MAX_TENSORS:,})")
    try:
        metadata = _metadata(c, n_keys)
        records = [_tensor_record(c) for _ in range(n_tensors)]
    except _Truncated:
        raise SabError(f"{c.source}: truncated GGUF file: its header runs past the end of the file's {c.size:,} "
                       "bytes (an interrupted download?)") from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise c.refuse(f"general.alignment {bounded(alignment)} is not a power of two up to {MAX_ALIGNMENT:,}")
    data_start = -(-c.at // alignment) * alignment
    tensors = [_place(c, r, data_start, alignment, block_sizes) for r in records]
    _check_disjoint(c, tensors)
    return GGUFHeader(version, metadata, tensors, c.size)


def _metadata(c: _Cursor, n_keys: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = c.string(MAX_KEY_BYTES, "a metadata key")
        if key in metadata:
            raise c.refuse(f"the metadata key {bounded(key)} appears twice")
        metadata[key] = c.value(c.u32())
    return metadata


def _tensor_record(c: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = c.string(MAX_NAME_BYTES, "a tensor name")
    n_dims = c.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.refuse(f"tensor {bounded(name)} has {n_dims} dimensions (1 to {MAX_DIMS})")
    ne = c.unpack("Q", n_dims)
    kind, offset = c.u32(), c.u64()
    return name, ne, kind, offset


def _place(c: _Cursor, record: tuple[str, tuple[int, ...], int, int], data_start: int, alignment: int,
           block_sizes: Mapping[int, tuple[int, int]]) -> TensorInfo:
    """A tensor record checked against the file: a known type, whole blocks, inside the file."""
    name, ne, kind, offset = record
    if kind not in block_sizes:
        raise c.refuse(f"tensor {bounded(name)} has ggml type {kind}, which no GGUF version this knows defines")
    per_block, block_bytes = block_sizes[kind]
    if any(n < 1 for n in ne) or ne[0] % per_block:
        raise c.refuse(f"tensor {bounded(name)} has dimensions {list(ne)}: each must be positive and the first a "
                       f"multiple of its type's block of {per_block}")
    elements = 1
    for n in ne:
        elements *= n
    nbytes = elements // per_block * block_bytes
    if offset % alignment:
        raise c.refuse(f"tensor {bounded(name)} starts at offset {offset:,}, not a multiple of the alignment "
                       f"{alignment}")
    start = data_start + offset
    if start + nbytes > c.size:
        raise SabError(f"{c.source}: truncated GGUF file: tensor {bounded(name)} needs bytes {start:,} to "
                       f"{start + nbytes:,} but the file has {c.size:,} (an interrupted download?)")
    return TensorInfo(name, kind, tuple(reversed(ne)), start, nbytes)


def _check_disjoint(c: _Cursor, tensors: list[TensorInfo]) -> None:
    names: set[str] = set()
    end, last = 0, ""
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.name in names:
            raise c.refuse(f"the tensor {bounded(t.name)} appears twice")
        if t.offset < end:
            raise c.refuse(f"tensors {bounded(last)} and {bounded(t.name)} overlap")
        names.add(t.name)
        end, last = t.offset + t.nbytes, t.name
