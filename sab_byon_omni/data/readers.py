"""Local files -> documents: finding the files, skipping binaries, reading each format, and the
corpus's documents in a fixed order with their train/validation split (see :mod:`.corpus`).

Text is read as UTF-8 (a leading byte-order mark is dropped); every invalid byte sequence becomes
U+FFFD and is counted in the :class:`ReadStats` of the read that decoded it.
"""

from __future__ import annotations

import codecs
import contextvars
import csv
import functools
import glob
import io
import json
import logging
import os
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import columnar
from sab_byon_omni.data.html_text import html_visible_text
from sab_byon_omni.data.tokenizers import utf8_safe
from sab_byon_omni.errors import SabError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # text files above this are read as several documents of whole lines
SNIFF_BYTES = 8192
SKIP_DIRS = {"__pycache__", "node_modules"}
BINARY_EXTENSIONS = {
    ".pyc", ".pyo", ".pyd", ".so", ".o", ".a", ".dll", ".dylib", ".exe", ".bin", ".class", ".jar",
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".tif", ".tiff", ".pdf", ".psd",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".tar", ".whl", ".egg", ".rar",
    ".npy", ".npz", ".pt", ".pth", ".ckpt", ".safetensors", ".onnx", ".pkl", ".pickle", ".h5",
    ".mp3", ".mp4", ".wav", ".flac", ".ogg", ".avi", ".mov", ".mkv", ".ttf", ".otf", ".woff", ".woff2",
    ".db", ".sqlite", ".sqlite3",
}
JSON_EXT, JSONL_EXT, CSV_EXT, HTML_EXT = {".json"}, {".jsonl", ".ndjson"}, {".csv"}, {".html", ".htm"}


@dataclass
class ReadStats:
    """What reading the corpus found; logged, stored in the cache metadata, used in error messages."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    bad_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> files

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (f"{self.files} file{'' if self.files == 1 else 's'}, {self.documents:,} "
                f"document{'' if self.documents == 1 else 's'}, {self.bytes / 1e6:.2f} MB"
                + (f"; skipped {skipped} ({why})" if skipped else "")
                + (f"; {self.bad_bytes} invalid UTF-8 sequences replaced by U+FFFD" if self.bad_bytes else ""))


class SkipFile(Exception):
    """This file holds no usable text (the message is the reason, counted in ReadStats)."""


# ------------------------------------------------------------------------------------ decoding
# The ReadStats of the read now decoding in this thread, set by _counted around each step of it.
_READING: contextvars.ContextVar[ReadStats | None] = contextvars.ContextVar("sab_reading", default=None)


def _count_bad(n: int) -> None:
    stats = _READING.get()
    if stats is not None:
        stats.bad_bytes += n


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _count_bad(1)
    return "\ufffd", err.end  # type: ignore[attr-defined]


@functools.cache
def _errors() -> str:
    """The name of the codec error handler that replaces and counts; registered on first use."""
    codecs.register_error("sab_count_replace", _replace_and_count)
    return "sab_count_replace"


def _counted(docs: Iterator[str], stats: ReadStats | None) -> Iterator[str]:
    """``docs``, with what decoding them replaced counted in ``stats`` (even when reads interleave)."""
    while True:
        token = _READING.set(stats)
        try:
            doc = next(docs)
        except StopIteration:
            return
        finally:
            _READING.reset(token)
        yield doc


def _open_text(path: Path) -> io.TextIOWrapper:
    return io.TextIOWrapper(open(path, "rb"), encoding="utf-8-sig", errors=_errors(), newline="")


def _clean(text: str) -> str:
    """``text`` (a JSON string) as valid UTF-8; each lone surrogate is replaced and counted."""
    safe = utf8_safe(text)
    if safe is not text:
        _count_bad(safe.count("\ufffd") - text.count("\ufffd"))
    return safe


# ------------------------------------------------------------------------------------ formats
def _sniff(path: Path) -> None:
    if path.suffix.lower() in BINARY_EXTENSIONS:
        raise SkipFile("binary")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise SkipFile("binary")


def _text_chunks(path: Path) -> Iterator[str]:
    """The file as pieces of about CHUNK_BYTES ending at line breaks (one piece if it is small)."""
    with _open_text(path) as f:
        rest = ""
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            block = rest + block
            cut = block.rfind("\n") + 1
            if cut == 0 or len(block) < CHUNK_BYTES // 2:  # no line break yet, or still small
                rest = block
                continue
            rest = block[cut:]
            yield block[:cut]
        if rest:
            yield rest


def _html_text(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        text = html_visible_text(f.read())
    if text:
        yield text


def _json_records(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise SkipFile(f"invalid JSON (line {e.lineno})") from None
        except ValueError:  # e.g. an integer of more digits than Python converts
            raise SkipFile("invalid JSON (a value Python cannot convert)") from None
        except RecursionError:
            raise SkipFile("JSON nested too deeply") from None
    records = data if isinstance(data, list) else [data]
    yield from _record_texts(((f"{path}: record {i}", r) for i, r in enumerate(records, 1)), text_field)


def _jsonl_records(path: Path, text_field: str) -> Iterator[str]:
    def parsed() -> Iterator[tuple[str, Any]]:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except (ValueError, RecursionError):  # not JSON, too deep, or an unconvertible number
                        log.warning("%s:%d: invalid JSON line skipped", path, n)
    yield from _record_texts(parsed(), text_field)


def _record_texts(records: Iterator[tuple[str, Any]], text_field: str) -> Iterator[str]:
    """The text of each ``(where, record)``. A record without the text field whose keys hold a near
    miss of a chat key or of the text field (``mesages``, ``outptu``) is a typo: a SabError naming it,
    never a silent skip; other such records are skipped, and a file of only those is skipped."""
    from sab_byon_omni.data.chat import CHAT_KEYS, FORMS_IN_WORDS, did_you_mean, key_list  # (torch: not at import)

    found = 0
    for where, rec in records:
        if isinstance(rec, str):
            value = rec
        elif isinstance(rec, dict) and isinstance(rec.get(text_field), str):
            value = rec[text_field]
        else:
            if isinstance(rec, dict) and (hint := did_you_mean(rec, (text_field, *CHAT_KEYS))):
                raise SabError(f"{where}: no {text_field!r} field and not a chat record (keys: {key_list(rec)}{hint})")
            continue
        found += 1
        if value:
            yield _clean(value)
    if not found:
        raise SkipFile(f"no {text_field!r} field (set data.text_field) and not chat data ({FORMS_IN_WORDS})")


def _csv_rows(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise SkipFile(f"no {column!r} column (set data.csv_column)")
        for row in reader:
            value = row.get(column)
            if value:
                yield value


def _column_texts(path: Path, column: str) -> Iterator[str]:
    try:
        for value in columnar.column_values(path, column):
            yield value.decode("utf-8", _errors())
    except columnar.Unusable as e:
        raise SkipFile(str(e)) from None


def _documents(path: Path, text_field: str, csv_column: str) -> Iterator[str]:
    ext = path.suffix.lower()
    try:
        if columnar.is_columnar(path):
            yield from _column_texts(path, text_field)
            return
        _sniff(path)
        if ext in JSON_EXT:
            yield from _json_records(path, text_field)
        elif ext in JSONL_EXT:
            yield from _jsonl_records(path, text_field)
        elif ext in CSV_EXT:
            yield from _csv_rows(path, csv_column)
        elif ext in HTML_EXT:
            yield from _html_text(path)
        else:
            yield from _text_chunks(path)
    except OSError as e:
        raise SkipFile(f"unreadable ({e.strerror or type(e).__name__})") from None
    except csv.Error as e:
        raise SkipFile(f"invalid CSV ({e})") from None


def read_documents(path: Path, text_field: str = "text", csv_column: str = "text",
                   stats: ReadStats | None = None) -> Iterator[str]:
    """The documents of one file; invalid UTF-8 sequences replaced are added to ``stats.bad_bytes``.
    Raises SkipFile (binary, unreadable, no such field/column) while iterating."""
    return _counted(_documents(path, text_field, csv_column), stats)


def is_plain_text(path: Path) -> bool:
    """Read as text pieces (not records): a large one is several documents of one file."""
    return path.suffix.lower() not in JSON_EXT | JSONL_EXT | CSV_EXT | HTML_EXT | columnar.EXTENSIONS


# ------------------------------------------------------------------------------------ finding
def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """(folders, other entries) of ``folder``, by name (a link to a folder is a folder); an
    unreadable folder is empty, as in ``os.walk``."""
    dirs, others = [], []
    try:
        with os.scandir(folder or os.curdir) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                (dirs if is_dir else others).append(entry.name)
    except OSError as e:
        log.debug("cannot list %s: %s", folder, e.strerror or e)
    return dirs, others


def _real_folder(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(folder or os.curdir)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: Path, seen: set[tuple[int, int]]) -> Iterator[Path]:
    """The files under ``root``, without following links to folders and without recursion (any
    depth). A folder in ``seen`` (real folders walked before) is not walked again."""
    stack = [str(root)]
    while stack:
        dirpath = stack.pop()
        real = _real_folder(dirpath)
        if real is None or real in seen:
            continue
        seen.add(real)
        dirnames, filenames = _scan(dirpath)
        dataset = columnar.dataset_files(Path(dirpath), filenames)
        if dataset is not None:  # a `datasets` folder is one dataset: its data files, not its metadata
            yield from dataset
            continue
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name
        stack.extend(os.path.join(dirpath, d) for d in sorted(dirnames, reverse=True)
                     if not d.startswith(".") and d not in SKIP_DIRS and not os.path.islink(os.path.join(dirpath, d)))


def _glob(pattern: str) -> Iterator[str]:
    """The paths ``glob.glob(pattern, recursive=True)`` gives, except that ``**`` searches each real
    folder once, without recursion: links that loop (a folder linking to itself or to a folder
    above it) or that reach one folder by many paths neither hang nor multiply the work, and a
    tree of any depth is searched. A link back to a folder above it is logged as a loop."""
    parts = pattern.split(os.sep)
    if "**" not in parts:  # no recursion: glob's work is bounded by the pattern's depth
        yield from glob.iglob(pattern)
        return
    i = parts.index("**")
    head = os.sep.join(parts[:i]) or (os.sep if i else "")
    rest = parts[i + 1:]
    while rest[:1] == ["**"]:
        rest = rest[1:]
    bases = (b for b in glob.iglob(head) if os.path.isdir(b)) if is_glob(head) else \
        [head] if os.path.isdir(head or os.curdir) else []
    seen: set[tuple[int, int]] = set()
    for base in bases:
        stack: list[tuple[str, tuple | None]] = [(base, None)]  # (folder, its parent's (real, parent) chain)
        while stack:
            folder, parent = stack.pop()
            real = _real_folder(folder)
            if real is None:
                continue
            if real in seen:  # reached before: by a link to a folder above it (a loop), or another path
                if _on_chain(real, parent):
                    log.warning("%s: %s is a link to a folder above it (a loop): not followed", pattern, folder)
                continue
            seen.add(real)
            dirnames, others = _scan(folder)
            if rest:  # what follows "**", from this folder
                yield from _glob(os.path.join(glob.escape(folder), *rest) if folder else os.path.join(*rest))
            else:  # "**" last: this folder and everything in it
                yield folder or os.curdir
                yield from (os.path.join(folder, n) for n in others if not n.startswith("."))
            node = (real, parent)
            stack.extend((os.path.join(folder, d), node) for d in sorted(dirnames, reverse=True)
                         if not d.startswith("."))


def _on_chain(real: tuple[int, int], node: tuple | None) -> bool:
    while node is not None:
        if node[0] == real:
            return True
        node = node[1]
    return False


def check_dataset(spec: str) -> None:
    """A SabError when ``data.dataset`` names no file or folder (a glob: :func:`find_files`); cheap."""
    expanded = os.path.expanduser(spec)
    if is_glob(expanded) or os.path.exists(expanded):
        return
    why = (f"{expanded.split(os.sep)[0]!r} is no user's home folder here" if expanded.startswith("~") else
           "a symbolic link to nothing (or a loop of them)" if os.path.islink(expanded) else
           "no such file or folder" + ("" if os.path.isabs(expanded) else f" (relative to {os.getcwd()})"))
    raise SabError(f"data.dataset={spec!r} (train's --data): {why}")


def find_files(spec: str) -> list[Path]:
    """The files that ``data.dataset`` names, sorted; a clear SabError if there are none."""
    check_dataset(spec)
    expanded = os.path.expanduser(spec)
    seen: set[tuple[int, int]] = set()  # real folders walked: each once, whatever links and matches lead to it
    if is_glob(expanded):
        matches = sorted(set(_glob(expanded)))
        if not matches:
            raise SabError(f"data.dataset={spec!r}: the pattern matches no file")
        files: list[Path] = []
        for m in matches:
            p = Path(m)
            files.extend(_walk(p, seen) if p.is_dir() else [p] if p.is_file() else [])
    else:
        p = Path(expanded)
        files = list(_walk(p, seen)) if p.is_dir() else [p]
        if not files:
            raise SabError(f"data.dataset={spec!r}: the folder holds no files")
    files = sorted(set(f.resolve() for f in files if f.is_file()))
    if not files:
        raise SabError(f"data.dataset={spec!r}: no files found")
    return files


def file_signature(files: list[Path]) -> list[list[Any]]:
    """[path, size, mtime_ns] per file: what a cache is valid for."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(f), -1, -1])
    return out


# ------------------------------------------------------------------------------ documents/split
FEW_DOCUMENTS = 10  # below this, no whole-document split comes near val_fraction: each document is cut


class Documents:
    """Streams the corpus's documents in a fixed order; pass 1 counts them and chooses the split."""

    def __init__(self, files: list[Path], cfg: DataConfig) -> None:
        self.files, self.cfg = files, cfg
        self.stats = ReadStats()
        self.sizes = array("q")  # bytes per document, in corpus order
        self.per_file = [self._count(path) for path in files]  # documents per file (0: skipped)
        n_docs = sum(self.per_file)
        if n_docs == 0:
            why = "; ".join(f"{n} file{'' if n == 1 else 's'}: {reason}" for reason, n in sorted(self.stats.skipped.items()))
            raise SabError(f"data.dataset={cfg.dataset!r}: no readable text in {len(files)} "
                           f"file{'' if len(files) == 1 else 's'}" + (f" ({why})" if why else " (all empty)"))
        self.single_cut = n_docs == 1
        self.n_docs = 2 if self.single_cut else n_docs
        self.stats.documents = n_docs  # as read (self.n_docs counts a single document as its two halves)
        self.is_val = np.zeros(self.n_docs, dtype=bool)
        self.cut_each = False  # every document cut: its last val_fraction held out
        if self.single_cut:
            self.is_val[1] = True
            return
        n_val = min(max(1, round(self.n_docs * cfg.val_fraction)), self.n_docs - 1)
        self.is_val[np.random.default_rng(cfg.data_seed).permutation(self.n_docs)[:n_val]] = True
        sizes = np.frombuffer(self.sizes, dtype=np.int64)
        held = float(sizes[self.is_val].sum()) / max(1, int(sizes.sum()))
        if n_docs < FEW_DOCUMENTS or held > 2 * cfg.val_fraction:
            self.cut_each, self.is_val[:] = True, False

    @property
    def split(self) -> str:
        """Which split the corpus gets, in words (the cache's metadata and the log say it)."""
        if self.single_cut or self.cut_each:
            return (f"inside documents: the last {self.cfg.val_fraction:g} of each document's text is held out "
                    f"(too few documents, {self.stats.documents:,}, for a whole-document split near "
                    f"val_fraction={self.cfg.val_fraction:g})")
        return f"whole documents: {int(self.is_val.sum()):,} of {self.n_docs:,} held out"

    def _count(self, path: Path) -> int:
        """Pass 1 over one file: its documents (0 if it is skipped), adding to ``self.stats``."""
        n = 0
        try:
            for doc in read_documents(path, self.cfg.text_field, self.cfg.csv_column, self.stats):
                n += 1
                self.sizes.append(len(doc.encode("utf-8")))
                self.stats.bytes += self.sizes[-1]
        except SkipFile as e:
            self.stats.skipped[str(e)] += 1
            log.debug("skipping %s: %s", path, e)
            n = 0
        self.stats.files += n > 0
        return n

    def __iter__(self) -> Iterator[tuple[bool, str]]:
        """(is_validation, text) for every document, in corpus order."""
        return ((is_val, doc) for is_val, doc, _ in self.pieces())

    def pieces(self) -> Iterator[tuple[bool, str, bool]]:
        """(is_validation, text, ends): ``ends`` is False only for a piece of a large text file whose
        next piece follows it in the same split (no ``<EOS>`` goes between them)."""
        i = 0
        for path, n in zip(self.files, self.per_file):
            if n == 0:
                continue
            plain = is_plain_text(path)
            try:
                for j, doc in enumerate(read_documents(path, self.cfg.text_field, self.cfg.csv_column)):
                    if j >= n:
                        raise SkipFile("it has more documents than before")
                    if self.single_cut or self.cut_each:
                        yield from zip((False, True), _cut(doc, 1.0 - self.cfg.val_fraction), (True, True))
                        i += 1
                        continue
                    ends = not plain or j == n - 1 or self.is_val[i + 1] != self.is_val[i]
                    yield bool(self.is_val[i]), doc, bool(ends)
                    i += 1
            except SkipFile as e:  # the file changed since pass 1
                raise SabError(f"{path} changed while the corpus was being read ({e}); run again") from None

    def texts(self, validation: bool) -> Iterator[str]:
        return (doc for is_val, doc in self if is_val == validation)


def _cut(text: str, frac: float) -> tuple[str, str]:
    """Split one document near ``frac`` of its length, at a line break when there is one."""
    target = min(max(int(len(text) * frac), 1), len(text) - 1) if len(text) > 1 else len(text)
    before, after = text.rfind("\n", 0, target), text.find("\n", target)
    candidates = [c + 1 for c in (before, after) if 0 <= c < len(text) - 1]
    cut = min(candidates, key=lambda c: abs(c - target)) if candidates else target
    return text[:cut], text[cut:]
