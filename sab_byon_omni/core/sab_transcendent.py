"""``SABTranscendentV2``: the guide's entry object, a model + tokenizer + config.

It holds things together and samples; training lives in :mod:`sab_byon_omni.training`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.config import RunConfig, build_config, load_config, replace
from sab_byon_omni.data.tokenizers import Tokenizer, build_tokenizer, from_spec
from sab_byon_omni.errors import SabError
from sab_byon_omni.model.generate import generate_tokens
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


class SABTranscendentV2:
    """A causal language model with its tokenizer and configuration.

    ``SABTranscendentV2()`` builds the Lightweight preset with the char96 tokenizer;
    ``SABTranscendentV2(preset="3b")`` the (really ~7.5B-parameter) "3b" preset;
    ``SABTranscendentV2(config=...)`` takes a :class:`RunConfig`, a mapping or a YAML path.
    """

    def __init__(self, preset: str | None = None, config: RunConfig | dict | str | Path | None = None,
                 tokenizer: Tokenizer | None = None, device: str | torch.device | None = None,
                 seed: int | None = None) -> None:
        if isinstance(config, (str, Path)):
            cfg = load_config(config)
        elif isinstance(config, dict):
            cfg = build_config(config)
        elif isinstance(config, RunConfig):
            cfg = config
        elif config is None:
            cfg = RunConfig()
        else:
            raise SabError(f"config must be a RunConfig, a mapping or a YAML path, not {type(config).__name__}")
        if preset is not None:
            cfg = replace(cfg, **{"model.preset": preset})
        if tokenizer is None:
            if cfg.data.tokenizer == "bpe" and not cfg.data.tokenizer_path:
                raise SabError("a BPE model needs a trained tokenizer: pass tokenizer=..., set data.tokenizer_path, "
                               "or let train_3b_rapid(data=...) train one")
            tokenizer = build_tokenizer(cfg.data.tokenizer, path=cfg.data.tokenizer_path)
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, **{"model.vocab_size": tokenizer.vocab_size})
        elif cfg.model.vocab_size < tokenizer.vocab_size:
            raise SabError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size} ids")
        if cfg.data.seq_len > cfg.model.max_seq_len:
            cfg = replace(cfg, **{"model.max_seq_len": cfg.data.seq_len})
        torch.manual_seed(cfg.train.seed if seed is None else seed)
        self.config, self.tokenizer = cfg, tokenizer
        self.model = CausalTransformer(cfg.model)
        if device is not None:
            self.model.to(device)

    # --------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> "SABTranscendentV2":
        """Rebuild model, tokenizer and config from one checkpoint file."""
        ck = load_checkpoint(path)
        try:
            cfg = build_config(ck["config"], source=str(path))
        except SabError as e:
            raise SabError(f"{path}: bad config inside the checkpoint: {e}") from None
        tok = from_spec(ck["tokenizer"]) if "tokenizer" in ck else build_tokenizer(cfg.data.tokenizer)
        self = cls(config=cfg, tokenizer=tok)
        try:
            self.model.load_state_dict(ck["model_state_dict"])
        except RuntimeError as e:
            raise SabError(f"{path}: weights do not fit the model in its config: {str(e).splitlines()[0]}") from None
        if device is not None:
            self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    # ------------------------------------------------------------------------------ sampling
    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = None, seed: int | None = None, stream: bool | Callable[[str], Any] = False,
                 use_cache: bool = True, stop_at_eos: bool = True) -> str:
        """Sample a continuation of ``prompt`` from the model (the prompt is not repeated).

        ``stream=True`` writes text to stdout as it is produced; a callable receives each piece.
        The throughput of the last call is in ``self.last_tokens_per_second``.
        """
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise SabError("the prompt is empty after tokenisation")
        sink = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream is True else (stream or None)
        out: list[int] = []
        printed = ""
        t0 = time.perf_counter()
        eos = self.tokenizer.eos_id if stop_at_eos else None
        for tok in generate_tokens(self.model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache):
            if tok == eos:
                break
            out.append(tok)
            if sink:
                text = self.tokenizer.decode(out)
                if len(text) > len(printed) and not text.endswith("\ufffd"):
                    sink(text[len(printed):])
                    printed = text
        elapsed = time.perf_counter() - t0
        self.last_tokens_per_second = len(out) / elapsed if elapsed > 0 else 0.0
        text = self.tokenizer.decode(out)
        if sink and len(text) > len(printed):
            sink(text[len(printed):])
        return text

    def __repr__(self) -> str:
        m = self.config.model
        return (f"SABTranscendentV2(preset={m.preset!r}, hidden={m.hidden}, layers={m.n_layers}, heads={m.n_heads}, "
                f"ffn={m.ffn}, vocab={m.vocab_size}, params={self.num_parameters():,})")
