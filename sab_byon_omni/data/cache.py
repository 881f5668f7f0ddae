"""The tokenised corpus on disk: one folder holding ``train.bin`` / ``val.bin`` (token ids),
``tokenizer.json`` (a learned tokenizer) and ``meta.json`` (written last: what the cache is valid
for). This module builds the folder, says whether it is still valid, and opens its streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.readers import Documents, is_glob
from sab_byon_omni.data.tokenizers import Tokenizer, build_tokenizer, describe_tokenizer, spec_hash, tokenizer_class
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import plural
from sab_byon_omni.files.atomic import atomic_write_text, fsync_dir, open_temp, remove_stale_temps
from sab_byon_omni.files.lock import FolderLock
from sab_byon_omni.files.untrusted import not_a_file

log = logging.getLogger(__name__)

# 2: a lone surrogate in a JSON string is one U+FFFD (the tokenizers' rule), no longer three
CACHE_VERSION = 3  # 3: a corpus of few documents is split inside its documents (meta 'split')
FLUSH_BYTES = 1 << 20  # text tokenised per call
META_FILE, TOKENIZER_FILE = "meta.json", "tokenizer.json"
SPLITS = ("train", "val")


def default_cache_dir(cfg: DataConfig, tokenizer: str | None = None) -> Path:
    """``./.sab_cache/<name>-<hash>``: one folder per data spec, reading/splitting options and
    tokenizer kind (``tokenizer``, default ``cfg.tokenizer``), so that char96, byte and BPE runs
    (and evaluations) on the same files never share or overwrite a cache."""
    key = json.dumps([os.path.abspath(os.path.expanduser(cfg.dataset)), cfg.text_field, cfg.csv_column,
                      cfg.val_fraction, cfg.data_seed, tokenizer or cfg.tokenizer])
    plain = [part for part in Path(cfg.dataset).parts if not is_glob(part)]  # a glob is named by its folder
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (plain[-1] if plain else "data"))[:40]
    return Path(".sab_cache") / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def tokenizer_recipe(cfg: DataConfig) -> dict[str, Any]:
    """What decides the tokenizer when none is given: name, and for a learned one the size it is
    trained to or the content of the file it is loaded from."""
    out: dict[str, Any] = {"name": cfg.tokenizer}
    if tokenizer_class(cfg.tokenizer).needs_file:
        if cfg.tokenizer_path:
            p = Path(cfg.tokenizer_path).expanduser()
            if (why := not_a_file(p)) is not None:
                raise SabError(f"data.tokenizer_path={cfg.tokenizer_path!r}: {why}")
            out["path_sha"] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        else:
            out["vocab_size"] = cfg.bpe_vocab_size
    return out


def read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


@contextlib.contextmanager
def removed_on_failure(directory: Path) -> Iterator[None]:
    """Remove ``directory`` (and the parents this block creates for it) if the block fails and
    the folder did not exist before: bad input leaves no half-built cache behind."""
    new = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        if new:
            shutil.rmtree(new[-1], ignore_errors=True)
        raise


def stale_reason(meta: dict[str, Any] | None, directory: Path, cfg: DataConfig, signature: list,
                 kind: str = "text") -> str | None:
    """Why the cache in ``directory`` does not hold these files read with these options as a
    corpus of ``kind`` (text, or chat: :mod:`.chat_corpus`), or None."""
    if meta is None:
        return "no cache yet"
    if meta.get("kind", "text") != kind:
        return f"a {meta.get('kind', 'text')} corpus was cached here"
    if meta.get("version") != CACHE_VERSION:
        return "cache format changed"
    for key in ("text_field", "csv_column", "val_fraction", "data_seed"):
        if meta.get(key) != getattr(cfg, key):
            return f"data.{key} changed"
    if meta.get("files") != signature:
        old = {f[0]: f[1:] for f in meta.get("files", [])}
        new = {f[0]: f[1:] for f in signature}
        changed = sorted(set(old) ^ set(new)) or sorted(k for k in new if old.get(k) != new[k])
        return f"the corpus changed ({plural(len(changed), 'file')}, e.g. {changed[0] if changed else '?'})"
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split in SPLITS:
        p = directory / f"{split}.bin"
        if not p.is_file() or p.stat().st_size != meta.get(f"{split}_tokens", -1) * itemsize:
            return f"{p.name} is missing or truncated"
    return None


def load_tokenizer(directory: Path, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a valid cache was built with."""
    spec = meta["tokenizer_spec"]
    cls = tokenizer_class(spec.get("name"))
    tok = cls.load(directory / TOKENIZER_FILE) if cls.needs_file else cls.from_spec(spec)
    if spec_hash(tok.to_spec()) != meta["tokenizer_hash"]:
        raise SabError(f"{directory / TOKENIZER_FILE} does not match {directory / META_FILE}: "
                       "delete the cache folder and run again")
    return tok


def open_streams(directory: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token ids, memory-mapped."""
    dtype = np.dtype(meta["dtype"])

    def mm(split: str) -> np.ndarray:
        n = meta[f"{split}_tokens"]
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))

    return mm("train"), mm("val")


@contextlib.contextmanager
def lock(directory: Path) -> Iterator[None]:
    """Held by one process at a time (processes that start together take turns building); the one
    lock of files/lock.py, which deleting ``.lock`` does not release."""
    held = FolderLock(directory)
    held.acquire(wait=True)
    try:
        remove_stale_temps(directory)  # a build killed outright (a Rust abort, SIGKILL) left them; none is ours now
        yield
    finally:
        held.release()


# ---------------------------------------------------------------------------------------- build
def build(cfg: DataConfig, docs: Documents, signature: list, directory: Path, tokenizer: Tokenizer | None,
          recipe: dict[str, Any] | None) -> tuple[Tokenizer, dict[str, Any]]:
    """Tokenise ``docs`` into ``directory`` (pass 2) and write ``meta.json`` last; returns the
    tokenizer (``cfg``'s, trained on the training documents if it learns) and the metadata."""
    t0 = time.perf_counter()
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, _batched(docs.texts(validation=False)))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    (directory / META_FILE).unlink(missing_ok=True)  # an interrupted build leaves no valid cache
    if tokenizer.needs_file:
        tokenizer.save(directory / TOKENIZER_FILE)  # type: ignore[attr-defined]
    t1 = time.perf_counter()
    writers = _tokenise(docs, tokenizer, directory, dtype)
    seconds = time.perf_counter() - t1
    spec = tokenizer.to_spec()
    meta = {
        "version": CACHE_VERSION, "dataset": cfg.dataset, "files": signature,
        "text_field": cfg.text_field, "csv_column": cfg.csv_column, "val_fraction": cfg.val_fraction,
        "data_seed": cfg.data_seed, "recipe": recipe, "tokenizer_spec": {"name": spec["name"]},
        "tokenizer_hash": spec_hash(spec), "tokenizer_desc": describe_tokenizer(spec), "dtype": dtype.name,
        "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
        "train_bytes": writers["train"].bytes, "val_bytes": writers["val"].bytes,
        "documents": docs.n_docs, "val_documents": int(docs.is_val.sum()), "single_document_cut": docs.single_cut,
        "split": docs.split,
        "stats": {"files": docs.stats.files, "bytes": docs.stats.bytes, "bad_bytes": docs.stats.bad_bytes,
                  "skipped": dict(docs.stats.skipped)},
        "tokenize_seconds": round(seconds, 3),
    }
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1), what="data cache")  # written last
    total = meta["train_bytes"] + meta["val_bytes"]
    log.info("corpus: tokenised %.2f MB into %s train + %s validation tokens in %.1f s (%.2f MB/s; %.1f s in all) "
             "-> %s", total / 1e6, f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}", seconds,
             total / 1e6 / max(seconds, 1e-9), time.perf_counter() - t0, directory)
    return tokenizer, meta


def _tokenise(docs: Documents, tokenizer: Tokenizer, directory: Path, dtype: np.dtype) -> dict[str, "_SplitWriter"]:
    """Stream every document's ids into ``train.bin`` / ``val.bin``, never holding the corpus in memory."""
    writers: dict[str, _SplitWriter] = {}
    try:
        for s in SPLITS:
            writers[s] = _SplitWriter(directory / f"{s}.bin", tokenizer, dtype)
        for is_val, doc, ends in docs.pieces():
            writers["val" if is_val else "train"].add(doc, ends)
        for w in writers.values():
            w.finish()
    except BaseException:  # a full disk, an interrupt: no temporary is left behind
        for w in writers.values():
            w.discard()
        raise
    return writers


class _SplitWriter:
    """One split's token file: pieces are tokenised in batches of about FLUSH_BYTES and appended to
    a temporary that becomes ``path`` when finished. With an ``<EOS>`` token each piece that ends a
    document is followed by it."""

    def __init__(self, path: Path, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        self.path, self.tokenizer, self.dtype = path, tokenizer, dtype
        self.f, self.tmp = open_temp(path, "data cache")  # a new file of its own: never a link
        self.tokens = self.bytes = 0
        self.pending: list[tuple[str, bool]] = []
        self.pending_bytes = 0

    def add(self, text: str, ends: bool) -> None:
        n = len(text.encode("utf-8"))
        self.pending.append((text, ends))
        self.pending_bytes += n
        self.bytes += n
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ids = _encode_pieces(self.tokenizer, self.pending)
        if len(ids):
            self.f.write(ids.astype(self.dtype).tobytes())
            self.tokens += len(ids)
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> None:
        self.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)  # a link at path is replaced, never followed
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        try:
            self.f.close()  # flushing what is buffered can fail again on a full disk
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def _encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]) -> np.ndarray:
    texts = [text for text, _ in pieces]
    if tokenizer.eos_id is None:
        return tokenizer.encode_array(texts)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    ids = tokenizer.encode_batch(texts)
    return np.concatenate([p for x, (_, ends) in zip(ids, pieces) for p in ((x, eos) if ends else (x,))])


def _batched(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
