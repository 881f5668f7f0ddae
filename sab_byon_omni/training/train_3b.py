"""``train_3b_rapid``: the guide's one-call training entry point, a thin wrapper over
:mod:`sab_byon_omni.training.launch` and the Trainer. ``make_optimizer`` and ``TrainResult`` are
re-exported here, where the guide imports them from."""

from __future__ import annotations

import logging
from typing import Any

from sab_byon_omni.config import replace
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.factory import load_datasets
from sab_byon_omni.data.tokenizers import spec_equal
from sab_byon_omni.training.build import build_run
from sab_byon_omni.training.launch import apply_recipe
from sab_byon_omni.training.optim import make_optimizer
from sab_byon_omni.training.trainer import Trainer, TrainResult

__all__ = ["train_3b_rapid", "make_optimizer", "TrainResult"]

log = logging.getLogger(__name__)

GUIDE_GEOMETRY = dict(epochs=3, batch_size=4, gradient_accumulation_steps=16, seq_len=1024)  # the guide's call


def train_3b_rapid(sab: SABTranscendentV2, epochs: int | None = None, batch_size: int | None = None,
                   grad_accum: int | None = None, seq_len: int | None = None, data: str | None = None,
                   **overrides: Any) -> TrainResult:
    """Train ``sab.model`` in place.

    On the synthetic dataset (``data`` None or ``"synthetic"``) the guide's call: 3 epochs of
    4 x 16 samples of 1,024 tokens unless given. On your own files (``data``: a path or glob) a
    fresh model trains with the from-scratch recipe of :mod:`sab_byon_omni.training.recipe` (peak
    rate, warmup + cosine, batch geometry for the corpus; docs/RECIPES.md) in every setting you
    do not pass; a model that was loaded (``SABTranscendentV2.load``) keeps the config's settings.
    Any other config field may be given by name (``learning_rate=3e-4``, ``num_samples=500``,
    ``checkpoint_dir="ckpt"``, ``precision="bf16"``, ``resume="auto"``, ``lr_schedule="cosine"``...).
    Returns the per-epoch train/validation losses and the checkpoint paths.
    """
    given = dict(epochs=epochs, batch_size=batch_size, gradient_accumulation_steps=grad_accum, seq_len=seq_len)
    own_data = data is not None and str(data) != "synthetic"
    scratch = own_data and sab.origin == "new model"
    changes = {k: v if v is not None else GUIDE_GEOMETRY[k] for k, v in given.items()
               if v is not None or not scratch or k == "seq_len"}
    changes.update(overrides)
    if data is not None:
        changes["dataset"] = str(data)
    cfg = replace(sab.config, **changes)
    keep_tokenizer = cfg.data.tokenizer == sab.tokenizer.name and cfg.data.tokenizer_path == sab.config.data.tokenizer_path
    tokenizer, train, val = load_datasets(cfg.data, sab.tokenizer if keep_tokenizer else None)
    if scratch:
        explicit = {k for k, v in given.items() if v is not None} | {k.rsplit(".", 1)[-1] for k in overrides}
        cfg, notes = apply_recipe(cfg, len(train), explicit, "train_3b_rapid(data=...)",
                                  len(val) if val is not None else 0)
    else:
        notes = [("recipe", "the settings of this call and the model's config" + (
            " (a loaded model: no from-scratch recipe)" if own_data else ""))]
    same_tok = spec_equal(tokenizer.to_spec(), sab.tokenizer.to_spec())
    if not same_tok or cfg.to_dict()["model"] != sab.config.to_dict()["model"]:
        fresh = SABTranscendentV2(config=replace(cfg, vocab_size=None if not same_tok else cfg.model.vocab_size),
                                  tokenizer=tokenizer)
        if same_tok:  # e.g. only max_seq_len grew: keep what the model already learned
            try:
                fresh.model.load_state_dict(sab.model.state_dict())
            except RuntimeError:
                log.info("architecture changed: starting from fresh weights")
        sab.model, sab.tokenizer, cfg = fresh.model, tokenizer, fresh.config
    sab.config = cfg
    run = build_run(sab.model, tokenizer, train, val, cfg)
    sab.config = run.cfg  # the config the run uses (the memory plan may change its micro-batch)
    return Trainer(run, notes=notes, resume_hint='continue with train_3b_rapid(..., resume="auto")').fit()
