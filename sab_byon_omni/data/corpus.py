"""Local files -> token ids on disk (a numpy memmap), split into train/validation by document.

The pipeline, for ``data.dataset = PATH`` (a file, a folder searched recursively, or a glob):

1. **Find files.** Hidden files and folders (``.git``, ``.sab_cache``...) and ``__pycache__`` are
   skipped; so are files with a known binary extension and files whose first 8 KiB hold a NUL byte.
2. **Read documents** (pass 1, counting only). A document is one file of text or source code, one
   record of a ``.json`` / ``.jsonl`` file (``data.text_field``), one row of a ``.csv`` file
   (``data.csv_column``), or the visible text of an ``.html`` file. Text files larger than
   :data:`CHUNK_BYTES` are read as several documents of whole lines, so no file is ever held in
   memory whole. Bytes that are not valid UTF-8 become U+FFFD and are counted; unreadable files
   are skipped and counted.
3. **Split.** ``round(n_documents * val_fraction)`` documents (at least one) chosen by a
   permutation seeded with ``data.data_seed`` form the validation set. A corpus of a single
   document is cut at the line nearest ``1 - val_fraction`` of its text.
4. **Tokenizer.** ``char96`` and ``byte`` need no training; ``bpe`` is trained on the training
   documents only (or loaded from ``data.tokenizer_path``) and saved as ``tokenizer.json`` in the
   cache directory, from where ``--tokenizer_path`` can reuse it.
5. **Tokenise once** (pass 2), streaming document by document into ``train.bin`` / ``val.bin``
   (uint16, or uint32 for vocabularies over 65,536 ids); with the byte and BPE tokenizers each
   document (each file, for a large file read in pieces) ends with ``<EOS>``. ``meta.json`` is written last and records the tokenizer spec hash
   and every source file's size and mtime; a later run with the same settings reuses the cache
   without reading a file, and a changed file, option or tokenizer rebuilds it.

Training samples are windows of ``seq_len`` tokens taken with stride ``seq_len - 1``: consecutive
windows share one token, so every token after the first is a target exactly once per epoch and
no window is padded. This is nanoGPT's ``x = ids[i:i+T], y = ids[i+1:i+T+1]`` with ``T = seq_len - 1``,
because the loss shifts the labels inside the model's window.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.tokenizers import BPETokenizer, ByteTokenizer, Char96Tokenizer, Tokenizer, build_tokenizer
from sab_byon_omni.errors import SabError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CHUNK_BYTES = 1 << 20  # text files above this are read as several documents of whole lines
SNIFF_BYTES = 8192
SKIP_DIRS = {"__pycache__", "node_modules"}
BINARY_EXTENSIONS = {
    ".pyc", ".pyo", ".pyd", ".so", ".o", ".a", ".dll", ".dylib", ".exe", ".bin", ".class", ".jar",
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".tif", ".tiff", ".pdf", ".psd",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".tar", ".whl", ".egg", ".rar",
    ".npy", ".npz", ".pt", ".pth", ".ckpt", ".safetensors", ".onnx", ".pkl", ".pickle", ".h5",
    ".mp3", ".mp4", ".wav", ".flac", ".ogg", ".avi", ".mov", ".mkv", ".ttf", ".otf", ".woff", ".woff2",
    ".db", ".sqlite", ".sqlite3", ".parquet", ".arrow",
}
JSON_EXT, JSONL_EXT, CSV_EXT, HTML_EXT = {".json"}, {".jsonl", ".ndjson"}, {".csv"}, {".html", ".htm"}


# ------------------------------------------------------------------------------------- reading
class _BadBytes:
    """A codec error handler that replaces each invalid UTF-8 sequence with U+FFFD and counts it."""

    count = 0

    @classmethod
    def handler(cls, err: UnicodeError) -> tuple[str, int]:
        cls.count += 1
        return "\ufffd", err.end  # type: ignore[attr-defined]


codecs.register_error("sab_count_replace", _BadBytes.handler)


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
        return (f"{self.files} files, {self.documents:,} documents, {self.bytes / 1e6:.2f} MB"
                + (f"; skipped {skipped} ({why})" if skipped else "")
                + (f"; {self.bad_bytes} invalid UTF-8 sequences replaced by U+FFFD" if self.bad_bytes else ""))


class _SkipFile(Exception):
    """This file holds no usable text (the message is the reason, counted in ReadStats)."""


class _VisibleText(HTMLParser):
    """The text a browser would show: no script/style/head, line breaks at block elements."""

    HIDDEN = {"script", "style", "head", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "pre", "blockquote",
             "h1", "h2", "h3", "h4", "h5", "h6", "hr", "header", "footer", "title", "dd", "dt"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(self.hidden - 1, 0)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        out, blank = [], False
        for line in lines:
            if line or not blank:
                out.append(line)
            blank = not line
        return "\n".join(out).strip("\n")


def html_visible_text(html: str) -> str:
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    return parser.text()


def _clean(text: str) -> str:
    """Lone surrogates (possible in JSON escapes) cannot be encoded as UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "sab_count_replace")


def _open_text(path: Path) -> io.TextIOWrapper:
    return io.TextIOWrapper(open(path, "rb"), encoding="utf-8-sig", errors="sab_count_replace", newline="")


def _sniff(path: Path) -> None:
    if path.suffix.lower() in BINARY_EXTENSIONS:
        raise _SkipFile("binary")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise _SkipFile("binary")


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


def _json_records(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise _SkipFile(f"invalid JSON (line {e.lineno})") from None
    records = data if isinstance(data, list) else [data]
    yield from _record_texts(records, text_field)


def _jsonl_records(path: Path, text_field: str) -> Iterator[str]:
    def parsed() -> Iterator[Any]:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        log.warning("%s:%d: invalid JSON line skipped", path, n)
    yield from _record_texts(parsed(), text_field)


def _record_texts(records: Any, text_field: str) -> Iterator[str]:
    found = 0
    for rec in records:
        if isinstance(rec, str):
            value = rec
        elif isinstance(rec, dict) and isinstance(rec.get(text_field), str):
            value = rec[text_field]
        else:
            continue
        found += 1
        if value:
            yield _clean(value)
    if not found:
        raise _SkipFile(f"no {text_field!r} field (set data.text_field)")


def _csv_rows(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise _SkipFile(f"no {column!r} column (set data.csv_column)")
        for row in reader:
            value = row.get(column)
            if value:
                yield value


def read_documents(path: Path, text_field: str = "text", csv_column: str = "text") -> Iterator[str]:
    """The documents of one file. Raises _SkipFile (binary, unreadable, no such field/column)."""
    ext = path.suffix.lower()
    try:
        _sniff(path)
        if ext in JSON_EXT:
            yield from _json_records(path, text_field)
        elif ext in JSONL_EXT:
            yield from _jsonl_records(path, text_field)
        elif ext in CSV_EXT:
            yield from _csv_rows(path, csv_column)
        elif ext in HTML_EXT:
            with _open_text(path) as f:
                text = html_visible_text(f.read())
            if text:
                yield text
        else:
            yield from _text_chunks(path)
    except OSError as e:
        raise _SkipFile(f"unreadable ({e.strerror or type(e).__name__})") from None
    except csv.Error as e:
        raise _SkipFile(f"invalid CSV ({e})") from None


# ------------------------------------------------------------------------------------- finding
def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def find_files(spec: str) -> list[Path]:
    """The files that ``data.dataset`` names, sorted; a clear SabError if there are none."""
    expanded = os.path.expanduser(spec)
    if _is_glob(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise SabError(f"data.dataset={spec!r}: the pattern matches no file")
        files: list[Path] = []
        for m in matches:
            p = Path(m)
            files.extend(_walk(p) if p.is_dir() else [p] if p.is_file() else [])
    else:
        p = Path(expanded)
        if not p.exists():
            raise SabError(f"data.dataset={spec!r}: no such file or folder")
        files = list(_walk(p)) if p.is_dir() else [p]
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


# ------------------------------------------------------------------------------- documents/split
class Documents:
    """Streams the corpus's documents in a fixed order; pass 1 counts them and chooses the split."""

    def __init__(self, files: list[Path], cfg: DataConfig) -> None:
        self.files, self.cfg = files, cfg
        self.stats = ReadStats()
        self.per_file: list[int] = []  # documents per file (0: skipped)
        self.single_cut = False
        bad0 = _BadBytes.count
        for path in files:
            n = 0
            try:
                for doc in read_documents(path, cfg.text_field, cfg.csv_column):
                    n += 1
                    self.stats.bytes += len(doc.encode("utf-8"))
            except _SkipFile as e:
                self.stats.skipped[str(e)] += 1
                log.debug("skipping %s: %s", path, e)
                n = 0
            self.per_file.append(n)
            self.stats.files += n > 0
        self.stats.bad_bytes = _BadBytes.count - bad0
        n_docs = sum(self.per_file)
        if n_docs == 0:
            why = "; ".join(f"{n} file(s): {reason}" for reason, n in sorted(self.stats.skipped.items()))
            raise SabError(f"data.dataset={cfg.dataset!r}: no readable text in {len(files)} file(s)"
                           + (f" ({why})" if why else " (all empty)"))
        self.single_cut = n_docs == 1
        self.n_docs = 2 if self.single_cut else n_docs
        self.stats.documents = self.n_docs
        self.is_val = np.zeros(self.n_docs, dtype=bool)
        if self.single_cut:
            self.is_val[1] = True
        else:
            n_val = min(max(1, round(self.n_docs * cfg.val_fraction)), self.n_docs - 1)
            self.is_val[np.random.default_rng(cfg.data_seed).permutation(self.n_docs)[:n_val]] = True

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
            plain = path.suffix.lower() not in JSON_EXT | JSONL_EXT | CSV_EXT | HTML_EXT
            try:
                for j, doc in enumerate(read_documents(path, self.cfg.text_field, self.cfg.csv_column)):
                    if self.single_cut:
                        yield from zip((False, True), _cut(doc, 1.0 - self.cfg.val_fraction), (True, True))
                        return
                    if j >= n:
                        raise _SkipFile("it has more documents than before")
                    ends = not plain or j == n - 1 or self.is_val[i + 1] != self.is_val[i]
                    yield bool(self.is_val[i]), doc, bool(ends)
                    i += 1
            except _SkipFile as e:  # the file changed since pass 1
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


# --------------------------------------------------------------------------------- tokenising
def encode_array(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of the concatenated texts as one int64 array (fast paths for byte and char96)."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64) + 2
    if isinstance(tokenizer, Char96Tokenizer):
        data = Char96Tokenizer.normalize("".join(texts)).encode("ascii")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 31
    if isinstance(tokenizer, BPETokenizer):
        return np.fromiter((i for ids in tokenizer.encode_batch(texts) for i in ids), dtype=np.int64)
    return np.fromiter((i for t in texts for i in tokenizer.encode(t)), dtype=np.int64)


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def describe_tokenizer(spec: dict[str, Any]) -> str:
    vocab = ""
    if spec.get("name") == "bpe":
        try:
            vocab = f", {len(json.loads(spec['json'])['model']['vocab']):,} ids"
        except (KeyError, TypeError, ValueError):
            pass
    return f"{spec.get('name')}{vocab}, spec {spec_hash(spec)}"


class _TokenWriter:
    """Appends token ids to a binary file of ``dtype`` (written incrementally, never all in memory)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.n = path, dtype, 0
        self.f = open(path, "wb")

    def write(self, ids: np.ndarray) -> None:
        if len(ids):
            self.f.write(ids.astype(self.dtype).tobytes())
            self.n += len(ids)

    def close(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------------- windows
class TokenWindows:
    """Windows of ``seq_len`` tokens with stride ``seq_len - 1`` over a 1-D array of ids.

    ``drop_last=True`` (training) keeps full windows only, so nothing is ever padded; the at most
    ``seq_len - 2`` targets after the last full window are not visited. ``drop_last=False``
    (validation) adds one shorter window so every token after the first is a target.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, drop_last: bool = True) -> None:
        if seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, seq_len - 1
        targets = max(len(tokens) - 1, 0)
        self.n = targets // self.stride if drop_last else math.ceil(targets / self.stride)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.stride
        return np.asarray(self.tokens[start:start + self.seq_len], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_targets(self) -> int:
        return min(self.n * self.stride, max(len(self.tokens) - 1, 0))


# --------------------------------------------------------------------------------------- cache
@dataclass
class Corpus:
    """A tokenised corpus on disk: the tokenizer, the two token streams and the metadata."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    meta: dict[str, Any]
    directory: Path

    def windows(self, seq_len: int) -> tuple[TokenWindows, TokenWindows]:
        train = TokenWindows(self.train_tokens, seq_len, drop_last=True)
        val = TokenWindows(self.val_tokens, seq_len, drop_last=False)
        if len(train) == 0:
            raise SabError(f"the training split of {self.meta['dataset']!r} has {len(self.train_tokens):,} tokens, "
                           f"fewer than data.seq_len={seq_len}: lower --seq_len or add data")
        if len(val) == 0:
            raise SabError(f"the validation split of {self.meta['dataset']!r} has {len(self.val_tokens)} token(s): "
                           "raise data.val_fraction or add data")
        return train, val


def default_cache_dir(cfg: DataConfig) -> Path:
    """``./.sab_cache/<name>-<hash>``: one folder per data spec and reading/splitting options."""
    key = json.dumps([os.path.abspath(os.path.expanduser(cfg.dataset)), cfg.text_field, cfg.csv_column,
                      cfg.val_fraction, cfg.data_seed])
    plain = [part for part in Path(cfg.dataset).parts if not _is_glob(part)]  # a glob is named by its folder
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (plain[-1] if plain else "data"))[:40]
    return Path(".sab_cache") / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _recipe(cfg: DataConfig) -> dict[str, Any]:
    """What decides the tokenizer when none is given: name, BPE size, the file it is loaded from."""
    recipe: dict[str, Any] = {"name": cfg.tokenizer}
    if cfg.tokenizer == "bpe":
        if cfg.tokenizer_path:
            p = Path(cfg.tokenizer_path).expanduser()
            if not p.is_file():
                raise SabError(f"data.tokenizer_path={cfg.tokenizer_path!r}: file not found")
            recipe["path_sha"] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        else:
            recipe["vocab_size"] = cfg.bpe_vocab_size
    return recipe


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stale_reason(meta: dict[str, Any] | None, directory: Path, cfg: DataConfig, signature: list) -> str | None:
    if meta is None:
        return "no cache yet"
    if meta.get("version") != CACHE_VERSION:
        return "cache format changed"
    for key in ("text_field", "csv_column", "val_fraction", "data_seed"):
        if meta.get(key) != getattr(cfg, key):
            return f"data.{key} changed"
    if meta.get("files") != signature:
        old = {f[0]: f[1:] for f in meta.get("files", [])}
        new = {f[0]: f[1:] for f in signature}
        changed = sorted(set(old) ^ set(new)) or sorted(k for k in new if old.get(k) != new[k])
        return f"the corpus changed ({len(changed)} file(s), e.g. {changed[0] if changed else '?'})"
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split in ("train", "val"):
        p = directory / f"{split}.bin"
        if not p.is_file() or p.stat().st_size != meta.get(f"{split}_tokens", -1) * itemsize:
            return f"{p.name} is missing or truncated"
    return None


def _open(directory: Path, meta: dict[str, Any], tokenizer: Tokenizer) -> Corpus:
    dtype = np.dtype(meta["dtype"])

    def mm(split: str) -> np.ndarray:
        n = meta[f"{split}_tokens"]
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))

    return Corpus(tokenizer, mm("train"), mm("val"), meta, directory)


def open_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """The tokenised corpus for ``cfg``, from the cache when it is valid, else built now.

    With ``tokenizer`` given (a checkpoint's), the cache must have been built with exactly that
    tokenizer, or not exist yet; otherwise the tokenizer comes from ``cfg`` and a cache built with
    a different tokenizer recipe is rebuilt. Processes that start together (torchrun) take turns
    through a lock file: the first builds, the others then reuse its cache.
    """
    files = find_files(cfg.dataset)
    directory = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir(cfg)
    signature = file_signature(files)
    recipe = _recipe(cfg) if tokenizer is None else None
    found = _reuse(cfg, directory, signature, tokenizer, recipe)
    if isinstance(found, Corpus):
        return found
    docs = Documents(files, cfg)  # validates the input: raises before anything is written
    log.info("corpus %s: %s", cfg.dataset, docs.stats.summary())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SabError(f"cannot create the cache folder {directory}: {e.strerror or e}") from None
    with _lock(directory):
        again = _reuse(cfg, directory, signature, tokenizer, recipe)  # built meanwhile by another process?
        if isinstance(again, Corpus):
            return again
        if _read_meta(directory) is not None:
            log.info("corpus: rebuilding cache %s: %s", directory, again)
        return _build(cfg, docs, signature, directory, tokenizer, recipe)


def _reuse(cfg: DataConfig, directory: Path, signature: list, tokenizer: Tokenizer | None,
           recipe: dict[str, Any] | None) -> Corpus | str:
    """The cached corpus if it is valid for these files and this tokenizer, else why not."""
    meta = _read_meta(directory)
    stale = _stale_reason(meta, directory, cfg, signature)
    if stale is not None:
        return stale
    assert meta is not None
    if tokenizer is not None:
        want = tokenizer.to_spec()
        if meta.get("tokenizer_hash") != spec_hash(want):
            raise SabError(f"the data cache {directory} was built with tokenizer {meta.get('tokenizer_desc')}, "
                           f"but the checkpoint's is {describe_tokenizer(want)}: pass --cache-dir to a new folder")
    elif meta.get("recipe") != recipe:
        return f"the tokenizer changed ({meta.get('recipe')} -> {recipe})"
    else:
        tokenizer = _load_cached_tokenizer(directory, meta)
    log.info("corpus: reusing cache %s (%s train + %s validation tokens, %s)", directory,
             f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}", meta["tokenizer_desc"])
    return _open(directory, meta, tokenizer)


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_cached_tokenizer(directory: Path, meta: dict[str, Any]) -> Tokenizer:
    spec = meta["tokenizer_spec"]
    if spec.get("name") == "bpe":
        tok = BPETokenizer.load(directory / "tokenizer.json")
        if spec_hash(tok.to_spec()) != meta["tokenizer_hash"]:
            raise SabError(f"{directory / 'tokenizer.json'} does not match {directory / 'meta.json'}: "
                           "delete the cache folder and run again")
        return tok
    return build_tokenizer(spec["name"])


def _build(cfg: DataConfig, docs: Documents, signature: list, directory: Path, tokenizer: Tokenizer | None,
           recipe: dict[str, Any] | None) -> Corpus:
    t0 = time.perf_counter()
    if tokenizer is None:
        if cfg.tokenizer == "bpe" and not cfg.tokenizer_path:
            t1 = time.perf_counter()
            tokenizer = BPETokenizer.train(_batched(docs.texts(validation=False)), cfg.bpe_vocab_size)
            log.info("trained a BPE tokenizer (%d ids) on the training documents in %.1f s", tokenizer.vocab_size,
                     time.perf_counter() - t1)
        else:
            tokenizer = build_tokenizer(cfg.tokenizer, path=cfg.tokenizer_path)
    spec = tokenizer.to_spec()
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    (directory / "meta.json").unlink(missing_ok=True)  # an interrupted build leaves no valid cache
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(directory / "tokenizer.json")
    writers = {s: _TokenWriter(directory / f"{s}.bin.tmp{os.getpid()}", dtype) for s in ("train", "val")}
    eos = np.array([tokenizer.eos_id] if tokenizer.eos_id is not None else [], dtype=np.int64)
    nbytes = {"train": 0, "val": 0}
    t1 = time.perf_counter()
    try:
        pending: dict[str, list[tuple[str, bool]]] = {"train": [], "val": []}
        size = {"train": 0, "val": 0}

        def flush(split: str) -> None:
            if not pending[split]:
                return
            texts = [t for t, _ in pending[split]]
            if eos.size:  # each document ends with <EOS>
                if isinstance(tokenizer, BPETokenizer):
                    ids = [np.asarray(x, dtype=np.int64) for x in tokenizer.encode_batch(texts)]
                else:
                    ids = [encode_array(tokenizer, [t]) for t in texts]
                parts = [p for x, (_, ends) in zip(ids, pending[split]) for p in ((x, eos) if ends else (x,))]
                writers[split].write(np.concatenate(parts))
            else:
                writers[split].write(encode_array(tokenizer, texts))
            pending[split], size[split] = [], 0

        for is_val, doc, ends in docs.pieces():
            split = "val" if is_val else "train"
            pending[split].append((doc, ends))
            n = len(doc.encode("utf-8"))
            size[split] += n
            nbytes[split] += n
            if size[split] >= CHUNK_BYTES:
                flush(split)
        flush("train")
        flush("val")
    finally:
        for w in writers.values():
            w.close()
    for split, w in writers.items():
        os.replace(w.path, directory / f"{split}.bin")
    seconds = time.perf_counter() - t1
    meta = {
        "version": CACHE_VERSION, "dataset": cfg.dataset, "files": signature,
        "text_field": cfg.text_field, "csv_column": cfg.csv_column, "val_fraction": cfg.val_fraction,
        "data_seed": cfg.data_seed, "recipe": recipe, "tokenizer_spec": {"name": spec["name"]},
        "tokenizer_hash": spec_hash(spec), "tokenizer_desc": describe_tokenizer(spec), "dtype": dtype.name,
        "train_tokens": writers["train"].n, "val_tokens": writers["val"].n,
        "train_bytes": nbytes["train"], "val_bytes": nbytes["val"],
        "documents": docs.n_docs, "val_documents": int(docs.is_val.sum()), "single_document_cut": docs.single_cut,
        "stats": {"files": docs.stats.files, "bytes": docs.stats.bytes, "bad_bytes": docs.stats.bad_bytes,
                  "skipped": dict(docs.stats.skipped)},
        "tokenize_seconds": round(seconds, 3),
    }
    tmp = directory / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, directory / "meta.json")
    total = nbytes["train"] + nbytes["val"]
    log.info("corpus: tokenised %.2f MB into %s train + %s validation tokens in %.1f s (%.2f MB/s; %.1f s in all) "
             "-> %s", total / 1e6, f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}", seconds,
             total / 1e6 / max(seconds, 1e-9), time.perf_counter() - t0, directory)
    return _open(directory, meta, tokenizer)


def _batched(texts: Iterator[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenWindows, TokenWindows]:
    """(tokenizer, training windows, validation windows) for ``data.dataset = PATH``."""
    corpus = open_corpus(cfg, tokenizer)
    train, val = corpus.windows(cfg.seq_len)
    return corpus.tokenizer, train, val
