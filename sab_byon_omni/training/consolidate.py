"""Sharded FSDP checkpoint (a ``*.dcp`` folder) -> one ordinary checkpoint file.

The file has the guide's format (``model_state_dict`` with the plain model's keys,
``optimizer_state_dict`` as ``torch.optim.AdamW.state_dict()`` gives it, ``epoch``,
``global_step``, ``config``, ...), so ``torch.load`` reads it, ``sab-omni generate`` samples
from it and a single process resumes training from it with ``--resume FILE``. Run it in one
process, without torchrun. No pickled code in the folder is ever run (see :mod:`sab_byon_omni.files.dcp`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.errors import SabError
from sab_byon_omni.files import dcp
from sab_byon_omni.files.checkpoint import save_checkpoint
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.distributed import materialize
from sab_byon_omni.training.optim import make_optimizer


def consolidate(src: str | Path, dst: str | Path, weights_only: bool = False, overwrite: bool = False) -> Path:
    """Read every shard of ``src`` into a plain model (and AdamW) in this process and write ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise SabError(f"{src}: not a directory (a sharded checkpoint is a *.dcp directory)")
    if dst.exists() and not overwrite:
        raise SabError(f"{dst} exists; pass --force to overwrite it or -o to choose another file")
    meta = dcp.read_meta(src)
    try:
        cfg = build_config(meta["config"], source=f"{src}/{dcp.META}")
    except SabError as e:
        raise SabError(f"{src}: bad config in {dcp.META}: {e}") from None
    with torch.device("meta"):  # every value comes from the shards: no initialisation to pay for
        model = CausalTransformer(cfg.model)
    materialize(model, torch.device("cpu"), init_weights=False)
    optimizer = None if weights_only else make_optimizer(model, cfg.train, torch.device("cpu"))
    dcp.load(src, model, optimizer, no_dist=True)
    ck = {k: v for k, v in meta.items() if k not in ("sharded", "checksum", "format")}
    ck["model_state_dict"] = model.state_dict()
    if optimizer is not None:
        ck["optimizer_state_dict"] = optimizer.state_dict()
    ck["config"] = cfg.to_dict()
    return save_checkpoint(ck, dst, kept="the output was not written; the sharded checkpoint is unchanged")
