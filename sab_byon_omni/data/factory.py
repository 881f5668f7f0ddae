"""Config -> (tokenizer, train set, validation set), for the synthetic dataset or local files."""

from __future__ import annotations

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.batching import TokenDataset
from sab_byon_omni.data.synthetic import MultimodalConsciousnessDataset
from sab_byon_omni.data.tokenizers import Tokenizer, build_tokenizer
from sab_byon_omni.errors import SabError


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

    return load_corpus(cfg, tokenizer)
