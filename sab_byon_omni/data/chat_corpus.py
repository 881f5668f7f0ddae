"""A corpus of chat data (:mod:`.chat`) -> samples of ids and answer-only labels, cached on disk.

Each conversation is one sample (or, when longer than ``data.seq_len``, several, cut at the ends
of its exchanges): samples are never windows across conversations, and padding is per batch as
for any sample dataset. The validation split is ``round(n * val_fraction)`` conversations (at least
one) chosen by a permutation seeded with ``data.data_seed``, as for documents.

The cache folder (the same place a text corpus's would be) holds, per split, ``<split>.bin`` (the
ids), ``<split>.mask`` (one byte per token: 1 where the loss counts it) and ``<split>.offsets``
(where each sample starts, int64), then ``meta.json`` written last. A changed file, option,
``seq_len`` or tokenizer (its chat template included) rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import cache
from sab_byon_omni.data.batching import IGNORE_INDEX
from sab_byon_omni.data.chat import (
    CHAT_EXTENSIONS, CHAT_KEYS, Encoded, cut_to_fit, did_you_mean, encode_conversation, file_format, first_record,
    key_list, read_conversations,
)
from sab_byon_omni.data.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from sab_byon_omni.data.readers import file_signature
from sab_byon_omni.data.tokenizers import Tokenizer, build_tokenizer, describe_tokenizer, spec_hash
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import plural
from sab_byon_omni.files.atomic import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

KIND = "chat"
PARTS = {"bin": None, "mask": np.uint8, "offsets": np.int64}  # None: the ids' dtype


class ChatSamples:
    """Samples of ids and labels (``IGNORE_INDEX`` where the mask is 0): ``ds[i]`` is a (2, L) array."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.lengths = np.diff(offsets)
        counted = np.asarray(mask, dtype=np.int64).cumsum()
        counted = np.concatenate([[0], counted])
        firsts = np.asarray(mask[offsets[:-1]], dtype=np.int64) if len(mask) else np.zeros(0, dtype=np.int64)
        self.targets = counted[offsets[1:]] - counted[offsets[:-1]] - firsts  # a sample's first token is no target
        self.num_targets = int(self.targets.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def answer_bytes(self, tokenizer: Tokenizer) -> int:
        """UTF-8 bytes of the text the samples' targets decode to (the answers, for bits per byte)."""
        return sum(len(tokenizer.decode(row[0][1:][row[1][1:] != IGNORE_INDEX]).encode("utf-8"))
                   for row in (self[i] for i in range(len(self))))

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.ids[a:b], dtype=np.int64)
        return np.stack([ids, np.where(self.mask[a:b] != 0, ids, IGNORE_INDEX)])


def chat_forms(files: list[Path]) -> dict[Path, str] | None:
    """The chat form of every file, or None when no file is chat data; a mix is refused."""
    forms = {f: file_format(f) for f in files}
    chat = [f for f, form in forms.items() if form is not None]
    if not chat:
        return None
    other = [f for f, form in forms.items() if form is None]
    for f in other:  # a typo in a chat key (mesages) is named, not taken for text
        record = first_record(f) if f.suffix.lower() in CHAT_EXTENSIONS else None
        if isinstance(record, dict) and (hint := did_you_mean(record, CHAT_KEYS)):
            raise SabError(f"{f}: its first record is not a chat record (keys: {key_list(record)}{hint})")
    if other:
        raise SabError(f"{chat[0]} is chat data ({forms[chat[0]]}) but {other[0]} is not: a corpus is all chat "
                       "data or all text (give them as two runs, or convert one)")
    return forms  # type: ignore[return-value]


def load_chat_corpus(cfg: DataConfig, forms: dict[Path, str], directory: Path,
                     tokenizer: Tokenizer | None) -> tuple[Tokenizer, ChatSamples, ChatSamples]:
    """(tokenizer, training samples, validation samples) of a chat corpus, from the cache when valid."""
    files = sorted(forms)
    signature = file_signature(files)
    recipe = cache.tokenizer_recipe(cfg) if tokenizer is None else None
    why = _stale(cfg, directory, signature, tokenizer, recipe)
    if why is not None:
        n = sum(1 for path in sorted(forms) for _ in read_conversations(path, forms[path]))  # checks every line
        if n < 2:
            raise SabError(f"data.dataset={cfg.dataset!r} holds {plural(n, 'conversation')}: at least 2 are needed "
                           "(one for validation)")
        directory.mkdir(parents=True, exist_ok=True)
        with cache.lock(directory):
            why = _stale(cfg, directory, signature, tokenizer, recipe)  # built meanwhile by another process?
            if why is not None:
                log.info("chat corpus: building %s (%s)", directory, why)
                _build(cfg, forms, n, signature, directory, tokenizer, recipe)
    meta = cache.read_meta(directory)
    assert meta is not None
    tokenizer = tokenizer if tokenizer is not None else cache.load_tokenizer(directory, meta)
    if tokenizer.name != "hf" and getattr(tokenizer, "chat_template", None) is None:
        # recorded in the tokenizer's spec, so the checkpoints and exports carry the template the
        # conversations were rendered with, whatever the default becomes later
        tokenizer.chat_template = DEFAULT_TEMPLATE  # type: ignore[attr-defined]
    train, val = (_open(directory, meta, s) for s in cache.SPLITS)
    log.info("chat corpus %s: %s train + %s validation samples (%s + %s answer tokens), template: %s", cfg.dataset,
             f"{len(train):,}", f"{len(val):,}", f"{train.num_targets:,}", f"{val.num_targets:,}", meta["template"])
    return tokenizer, train, val


def _stale(cfg: DataConfig, directory: Path, signature: list, tokenizer: Tokenizer | None,
           recipe: dict[str, Any] | None) -> str | None:
    meta = cache.read_meta(directory)
    if tokenizer is not None and meta is not None and meta.get("tokenizer_hash") != spec_hash(tokenizer.to_spec()):
        raise SabError(f"the data cache {directory} was built with tokenizer {meta.get('tokenizer_desc')}, "
                       f"but the model's is {describe_tokenizer(tokenizer.to_spec())}: pass --cache-dir to a new folder")
    why = cache.stale_reason(meta, directory, cfg, signature, KIND)
    if why is not None:
        return why
    assert meta is not None
    if meta.get("seq_len") != cfg.seq_len:
        return "data.seq_len changed (conversations are cut to it)"
    if tokenizer is None and meta.get("recipe") != recipe:
        return "the tokenizer changed"
    for split in cache.SPLITS:
        for suffix, dtype in PARTS.items():
            n = meta[f"{split}_tokens"] if suffix != "offsets" else meta[f"{split}_samples"] + 1
            p = directory / f"{split}.{suffix}"
            if not p.is_file() or p.stat().st_size != n * np.dtype(dtype or meta["dtype"]).itemsize:
                return f"{p.name} is missing or truncated"
    return None


def _open(directory: Path, meta: dict[str, Any], split: str) -> ChatSamples:
    n = meta[f"{split}_tokens"]

    def mm(suffix: str, dtype: Any, count: int) -> np.ndarray:
        return np.memmap(directory / f"{split}.{suffix}", dtype=dtype, mode="r", shape=(count,)) if count \
            else np.zeros(0, dtype=dtype)

    return ChatSamples(mm("bin", meta["dtype"], n), mm("mask", np.uint8, n),
                       np.fromfile(directory / f"{split}.offsets", dtype=np.int64))


def _conversations(forms: dict[Path, str], seq_len: int, tokenizer: Tokenizer,
                   template: ChatTemplate, keep: Any) -> tuple[list[list[Encoded]], int]:
    """Every conversation encoded and cut to ``seq_len`` (those ``keep(index)`` accepts); and how many were cut."""
    out, cut, i = [], 0, 0
    for path in sorted(forms):
        for where, messages in read_conversations(path, forms[path]):
            if keep(i):
                pieces = cut_to_fit(encode_conversation(tokenizer, template, messages), seq_len, where)
                cut += len(pieces) > 1
                out.append(pieces)
            i += 1
    return out, cut


def _build(cfg: DataConfig, forms: dict[Path, str], n: int, signature: list, directory: Path,
           tokenizer: Tokenizer | None, recipe: dict[str, Any] | None) -> None:
    """Encode the ``n`` conversations of ``forms`` into ``directory`` and write ``meta.json`` last."""
    n_val = min(max(1, round(n * cfg.val_fraction)), n - 1)
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(cfg.data_seed).permutation(n)[:n_val]] = True
    if tokenizer is None:  # a tokenizer that learns is trained on the training conversations as rendered
        default = ChatTemplate()
        texts = (default.render(m) for i, (_, m) in enumerate(
            (w, m) for p in sorted(forms) for w, m in read_conversations(p, forms[p])) if not is_val[i])
        tokenizer = build_tokenizer(cfg, ([t] for t in texts))
    template = ChatTemplate.of(tokenizer)
    (directory / cache.META_FILE).unlink(missing_ok=True)  # an interrupted build leaves no valid cache
    if tokenizer.needs_file:
        tokenizer.save(directory / cache.TOKENIZER_FILE)  # type: ignore[attr-defined]
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    spec = tokenizer.to_spec()
    meta: dict[str, Any] = {
        "version": cache.CACHE_VERSION, "kind": KIND, "dataset": cfg.dataset, "files": signature,
        "text_field": cfg.text_field, "csv_column": cfg.csv_column, "val_fraction": cfg.val_fraction,
        "data_seed": cfg.data_seed, "seq_len": cfg.seq_len, "recipe": recipe, "tokenizer_spec": {"name": spec["name"]},
        "tokenizer_hash": spec_hash(spec), "tokenizer_desc": describe_tokenizer(spec), "dtype": dtype.name,
        "template": "default" if template.is_default else "the tokenizer's "
                    + hashlib.sha256(template.source.encode()).hexdigest()[:12],
        "conversations": n, "val_conversations": n_val,
    }
    cut = 0
    for split in cache.SPLITS:
        want = split == "val"
        convs, c = _conversations(forms, cfg.seq_len, tokenizer, template, lambda i: bool(is_val[i]) == want)
        cut += c
        samples = [s for pieces in convs for s in pieces if (s.labels[1:] != IGNORE_INDEX).any()]
        ids = np.concatenate([np.zeros(0, dtype=np.int64)] + [s.ids for s in samples]).astype(dtype)
        mask = np.concatenate([np.zeros(0, dtype=bool)] + [s.labels != IGNORE_INDEX for s in samples]).astype(np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(s.ids) for s in samples])]).astype(np.int64)
        for suffix, array in (("bin", ids), ("mask", mask), ("offsets", offsets)):
            atomic_write(directory / f"{split}.{suffix}", lambda f, a=array: f.write(a.tobytes()), what="data cache")
        meta.update({f"{split}_tokens": len(ids), f"{split}_samples": len(samples), f"{split}_bytes": 0})
    meta["cut_conversations"] = cut
    if cut:
        log.info("chat corpus: %d conversation(s) longer than data.seq_len=%d cut at the ends of exchanges",
                 cut, cfg.seq_len)
    atomic_write_text(directory / cache.META_FILE, json.dumps(meta, indent=1), what="data cache")  # written last
