"""Weights as safetensors: a checkpoint's model to a ``.safetensors`` file, and back.

A ``.safetensors`` file holds only tensors and a string header: loading it can never run code,
which makes it the format to share weights in. The export writes the model weights (not the
optimizer) plus the run's config and tokenizer as header metadata, so the file alone rebuilds the
model. A tied output head (``model.tie_embeddings``, the default) shares its tensor with the token
embedding; safetensors refuses shared tensors, so ``safetensors.torch.save_model`` stores it once
and ``load_model`` re-ties it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.tokenizers import from_spec
from sab_byon_omni.errors import SabError
from sab_byon_omni.io.atomic import atomic_path
from sab_byon_omni.io.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

META_FORMAT = "sab-byon-omni/1"
DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve():
        raise SabError(f"--out {out} is the input file; choose another path")
    if out.exists() and not overwrite:
        raise SabError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_file():
        raise SabError(f"{out} is not a file")


def export_safetensors(checkpoint: str | Path, out: str | Path, dtype: str = "keep", overwrite: bool = False) -> Path:
    """Write the model weights of ``checkpoint`` to the safetensors file ``out``, with the config,
    tokenizer, epoch and global step as header metadata. Returns ``out``."""
    from safetensors.torch import save_model

    src, out = Path(checkpoint), Path(out)
    if dtype not in DTYPES:
        raise SabError(f"--dtype={dtype!r} is not one of: {', '.join(DTYPES)}")
    _check_out(out, src, overwrite)
    ck = load_checkpoint(src)
    sab = SABTranscendentV2.from_checkpoint_dict(ck, source=str(src))
    if DTYPES[dtype] is not None:
        sab.model.to(DTYPES[dtype])
    meta = {"format": META_FORMAT, "config": json.dumps(sab.config.to_dict()),
            "tokenizer": json.dumps(sab.tokenizer.to_spec()), "epoch": str(int(ck.get("epoch", 0))),
            "global_step": str(int(ck.get("global_step", 0))), "source": src.name}
    with atomic_path(out, what="safetensors file", kept="nothing was written") as tmp:
        save_model(sab.model, str(tmp), metadata=meta)
    log.debug("exported %s (%s parameters) to %s", src, f"{sab.model.num_parameters():,}", out)
    return out


def import_safetensors(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild a checkpoint dict (weights, config, tokenizer; no optimizer state) from a file
    written by :func:`export_safetensors`; also save it to ``out`` if given. The checkpoint works
    with ``generate``, ``eval`` and ``train --resume PATH`` (which then starts a fresh optimizer)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    src = Path(path)
    if not src.is_file():
        raise SabError(f"safetensors file not found: {src}")
    if out is not None:
        _check_out(Path(out), src, overwrite)
    try:
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        raise SabError(f"{src}: not a readable safetensors file: {str(e).splitlines()[0][:160]}") from None
    if meta.get("format") != META_FORMAT or "config" not in meta or "tokenizer" not in meta:
        raise SabError(f"{src}: has no sab-byon-omni metadata (config, tokenizer): was it written by "
                       "'sab-omni export'?")
    try:
        raw_cfg, spec = json.loads(meta["config"]), json.loads(meta["tokenizer"])
        epoch, step = int(meta.get("epoch", 0)), int(meta.get("global_step", 0))
    except ValueError as e:
        raise SabError(f"{src}: damaged metadata: {e}") from None
    try:
        cfg = build_config(raw_cfg, source=str(src))
    except SabError as e:
        raise SabError(f"{src}: bad config in the metadata: {e}") from None
    sab = SABTranscendentV2(config=cfg, tokenizer=from_spec(spec))
    try:
        load_model(sab.model, str(src), strict=True)
    except Exception as e:  # missing/unexpected/mis-shaped tensors, or a damaged body
        raise SabError(f"{src}: weights do not fit the model in its metadata: {str(e).splitlines()[0][:160]}") from None
    ck = {"epoch": epoch, "model_state_dict": sab.model.state_dict(), "loss": None,
          "global_step": step, "config": cfg.to_dict(), "tokenizer": sab.tokenizer.to_spec(),
          "torch_version": str(torch.__version__), "imported_from": src.name}
    if out is not None:
        save_checkpoint(ck, out)
    return ck
