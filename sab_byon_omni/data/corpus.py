"""Local files -> token ids on disk (a numpy memmap), split into train/validation by document.

The pipeline, for ``data.dataset = PATH`` (a file, a folder searched recursively, or a glob):

1. **Find files** (:mod:`.readers`). Hidden files and folders (``.git``, ``.sab_cache``...) and
   ``__pycache__`` are skipped; so are files with a known binary extension and files whose first
   8 KiB hold a NUL byte.
2. **Read documents** (pass 1, counting only). A document is one file of text or source code, one
   record of a ``.json`` / ``.jsonl`` file (``data.text_field``), one row of a ``.csv`` file
   (``data.csv_column``), or the visible text of an ``.html`` file. Text files larger than
   ``readers.CHUNK_BYTES`` are read as several documents of whole lines, so no file is ever held
   in memory whole. Bytes that are not valid UTF-8 become U+FFFD and are counted; unreadable files
   are skipped and counted.
3. **Split.** ``round(n_documents * val_fraction)`` documents (at least one) chosen by a
   permutation seeded with ``data.data_seed`` form the validation set. A corpus of fewer than
   ``readers.FEW_DOCUMENTS`` (10) documents, or whose chosen documents hold more than twice
   ``val_fraction`` of its bytes, is split inside its documents instead: each is cut at the line
   nearest ``1 - val_fraction`` of its text (the log and the cache's ``meta.json`` say which).
4. **Tokenizer.** ``char96`` and ``byte`` need no training; ``bpe`` is trained on the training
   documents only (or loaded from ``data.tokenizer_path``) and saved as ``tokenizer.json`` in the
   cache directory, from where ``--tokenizer_path`` can reuse it.
5. **Tokenise once** (pass 2, :mod:`.cache`), streaming document by document into ``train.bin`` /
   ``val.bin`` (uint16, or uint32 for vocabularies over 65,536 ids); with the byte and BPE
   tokenizers each document (each file, for a large file read in pieces) ends with ``<EOS>``.
   ``meta.json`` is written last and records the tokenizer spec hash and every source file's size
   and mtime; a later run with the same settings reuses the cache without reading a file, and a
   changed file, option or tokenizer rebuilds it.

Training samples are windows of ``seq_len`` tokens taken with stride ``seq_len - 1``
(:class:`~.windows.TokenWindows`), so no window is padded.

Chat and instruction JSONL files (:mod:`.chat`) take another path (:mod:`.chat_corpus`): each
conversation is a sample whose labels are the assistant's tokens only.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import cache
from sab_byon_omni.data.batching import TokenDataset
from sab_byon_omni.data.chat_corpus import chat_forms, load_chat_corpus
from sab_byon_omni.data.readers import Documents, file_signature, find_files
from sab_byon_omni.data.tokenizers import Tokenizer, describe_tokenizer, spec_hash
from sab_byon_omni.data.windows import TokenWindows
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import plural
from sab_byon_omni.files.atomic import reason

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """A tokenised corpus on disk: the tokenizer, the two token streams and the metadata."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    meta: dict[str, Any]
    directory: Path

    @classmethod
    def open(cls, directory: Path, meta: dict[str, Any], tokenizer: Tokenizer) -> "Corpus":
        return cls(tokenizer, *cache.open_streams(directory, meta), meta, directory)

    def windows(self, seq_len: int) -> tuple[TokenWindows, TokenWindows]:
        train = TokenWindows(self.train_tokens, seq_len, drop_last=True)
        val = TokenWindows(self.val_tokens, seq_len, drop_last=False)
        if len(train) == 0:
            raise SabError(f"the training split of {self.meta['dataset']!r} has {len(self.train_tokens):,} tokens, "
                           f"fewer than data.seq_len={seq_len}: lower --seq_len or add data")
        if len(val) == 0:
            raise SabError(f"the validation split of {self.meta['dataset']!r} has {plural(len(self.val_tokens), 'token')}: "
                           "raise data.val_fraction or add data")
        return train, val


def cache_directory(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Path:
    """Where the tokenised corpus for ``cfg`` lives: ``data.cache_dir``, else a default folder per
    data spec and tokenizer kind. A given tokenizer (a checkpoint's) that differs from the one a
    default folder was built with gets a folder of its own: a cache is never reused or rebuilt
    for another tokenizer behind the back of the run that made it."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    directory = cache.default_cache_dir(cfg, tokenizer.name if tokenizer is not None else None)
    meta = cache.read_meta(directory) if tokenizer is not None else None
    if meta is not None and meta.get("tokenizer_hash") != spec_hash(tokenizer.to_spec()):
        directory = directory.with_name(f"{directory.name}-{spec_hash(tokenizer.to_spec())[:8]}")
    return directory


def open_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """The tokenised corpus for ``cfg``, from the cache when it is valid, else built now.

    With ``tokenizer`` given (a checkpoint's), the cache must have been built with exactly that
    tokenizer, or not exist yet; otherwise the tokenizer comes from ``cfg`` and a cache built with
    a different tokenizer recipe is rebuilt. Processes that start together (torchrun) take turns
    through a lock file: the first builds, the others then reuse its cache. A failed build leaves
    no folder it created and no temporary file.
    """
    files = find_files(cfg.dataset)
    directory = cache_directory(cfg, tokenizer)
    signature = file_signature(files)
    recipe = cache.tokenizer_recipe(cfg) if tokenizer is None else None
    found = _reuse(cfg, directory, signature, tokenizer, recipe)
    if isinstance(found, Corpus):
        return found
    docs = Documents(files, cfg)  # validates the input: raises before anything is written
    log.info("corpus %s: %s; validation split %s", cfg.dataset, docs.stats.summary(), docs.split)
    with cache.removed_on_failure(directory):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with cache.lock(directory):
                again = _reuse(cfg, directory, signature, tokenizer, recipe)  # built meanwhile by another process?
                if isinstance(again, Corpus):
                    return again
                if cache.read_meta(directory) is not None:
                    log.info("corpus: rebuilding cache %s: %s", directory, again)
                tokenizer, meta = cache.build(cfg, docs, signature, directory, tokenizer, recipe)
                return Corpus.open(directory, meta, tokenizer)
        except OSError as e:  # a full disk, a read-only or vanished folder
            why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise SabError(f"could not write the data cache {directory}: {why}") from None


def _reuse(cfg: DataConfig, directory: Path, signature: list, tokenizer: Tokenizer | None,
           recipe: dict[str, Any] | None) -> Corpus | str:
    """The cached corpus if it is valid for these files and this tokenizer, else why not. A cache
    built with another tokenizer than the given one is an error, stale or not (never rebuilt)."""
    meta = cache.read_meta(directory)
    if tokenizer is not None and meta is not None:
        want = tokenizer.to_spec()
        if meta.get("tokenizer_hash") != spec_hash(want):
            raise SabError(f"the data cache {directory} was built with tokenizer {meta.get('tokenizer_desc')}, "
                           f"but the checkpoint's is {describe_tokenizer(want)}: pass --cache-dir to a new folder")
    stale = cache.stale_reason(meta, directory, cfg, signature)
    if stale is not None:
        return stale
    assert meta is not None
    if tokenizer is None and meta.get("recipe") != recipe:
        was, now = _recipe_words(meta.get("recipe")), _recipe_words(recipe)
        return f"the tokenizer changed (the cache was built with {was}; this run asks for {now})"
    if tokenizer is None:
        tokenizer = cache.load_tokenizer(directory, meta)
    log.info("corpus: reusing cache %s (%s train + %s validation tokens, %s; validation split %s)", directory,
             f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}", meta["tokenizer_desc"], meta.get("split", "?"))
    return Corpus.open(directory, meta, tokenizer)


def _recipe_words(recipe: Any) -> str:
    """A tokenizer recipe (:func:`.cache.tokenizer_recipe`) in words: ``bpe trained to 512 ids``."""
    if not isinstance(recipe, dict) or not recipe.get("name"):
        return "a tokenizer given by a checkpoint"  # a cache built for a resumed or fine-tuned run records none
    words = str(recipe["name"])
    if "vocab_size" in recipe:
        words += f" trained to {recipe['vocab_size']:,} ids"
    if "path_sha" in recipe:
        words += f" from a tokenizer.json (sha256 {recipe['path_sha']})"
    return words


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """(tokenizer, training windows, validation windows) for ``data.dataset = PATH``, or for chat
    data (:mod:`.chat`) the conversations as samples with answer-only labels; a corpus too short for
    ``data.seq_len`` leaves no cache folder that this call created."""
    forms = chat_forms(find_files(cfg.dataset))
    if forms is not None:
        directory = cache_directory(cfg, tokenizer)
        with cache.removed_on_failure(directory):
            try:
                return load_chat_corpus(cfg, forms, directory, tokenizer)
            except OSError as e:
                raise SabError(f"could not write the data cache {directory}: {reason(e)}") from None
    with cache.removed_on_failure(cache_directory(cfg, tokenizer)):
        corpus = open_corpus(cfg, tokenizer)
        train, val = corpus.windows(cfg.seq_len)
    return corpus.tokenizer, train, val
