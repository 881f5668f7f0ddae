"""Config -> (tokenizer, train set, validation set), for the synthetic dataset or local files."""

from __future__ import annotations

import logging
from pathlib import Path

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.batching import TokenDataset
from sab_byon_omni.data.synthetic import MultimodalConsciousnessDataset
from sab_byon_omni.data.tokenizers import Tokenizer, build_tokenizer
from sab_byon_omni.errors import SabError

log = logging.getLogger(__name__)

CODE_SUFFIXES = frozenset(
    ".py .pyi .js .mjs .jsx .ts .tsx .c .h .cc .cpp .hpp .cxx .cs .java .kt .scala .go .rs .rb .php .swift "
    ".m .mm .lua .pl .r .jl .sh .bash .zsh .ps1 .sql .css .scss .vue .hs .ml .ex .exs "
    ".erl .clj .dart .f90 .asm .s .cmake .mk".split())


def load_datasets(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """Build (or reuse) the tokenizer and the train/validation splits that ``cfg`` describes."""
    if cfg.dataset == "synthetic":
        if tokenizer is None:
            tokenizer = build_tokenizer(cfg)
        ds = MultimodalConsciousnessDataset(tokenizer, cfg.num_samples, cfg.seq_len, cfg.data_seed)
        if len(ds) < 2:
            raise SabError(f"data.num_samples={cfg.num_samples} leaves no validation sample; use at least 2")
        train, val = ds.split(cfg.val_fraction)
        return tokenizer, train, val
    from sab_byon_omni.data.corpus import load_corpus

    found = load_corpus(cfg, tokenizer)
    if found[0].name == "char96" and (why := looks_like_code(cfg.dataset)):
        log.warning("data.dataset looks like code (%s), and the char96 tokenizer turns every newline and tab into "
                    "a space: the model never sees the lines or the indentation; --tokenizer byte or bpe keeps them",
                    why)
    return found


def looks_like_code(dataset: str, sample_files: int = 8, sample_bytes: int = 8192) -> str:
    """Why the corpus at ``dataset`` looks like source code ("12 of 12 files are .py/.js/..." or
    "41% of the lines begin indented"), or "" when it does not: half its files have a source-code
    suffix, or over a quarter of the non-empty lines in the first bytes of a few files begin with
    a space or a tab (the shape that a tokenizer without newlines flattens)."""
    from sab_byon_omni.data.readers import find_files

    try:
        files = find_files(dataset)
    except SabError:
        return ""
    code = sum(f.suffix.lower() in CODE_SUFFIXES for f in files)
    if code * 2 >= len(files) > 0:
        return f"{code} of {len(files)} file{'' if len(files) == 1 else 's'} have a source-code suffix"
    lines = []
    for f in files[:sample_files]:
        try:
            with Path(f).open("rb") as fh:
                lines += [x for x in fh.read(sample_bytes).decode("utf-8", "replace").splitlines() if x.strip()]
        except OSError:
            continue
    indented = sum(x[:1] in (" ", "\t") for x in lines)
    return f"{100 * indented // len(lines)}% of the lines begin indented" if lines and indented * 4 > len(lines) else ""
