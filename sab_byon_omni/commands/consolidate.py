"""sab-omni consolidate: turn a sharded FSDP checkpoint (a *.dcp directory) into one checkpoint file.

The file has the guide's format (``model_state_dict`` with the plain model's keys,
``optimizer_state_dict`` as ``torch.optim.AdamW.state_dict()`` gives it, ``epoch``, ``global_step``,
``config``, ...), so ``torch.load`` loads it, ``sab-omni generate`` samples from it and a single
process resumes training from it with ``--resume FILE``. Run it in one process, without torchrun.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.errors import SabError
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training import checkpoint as ckpt_io
from sab_byon_omni.training import distributed as D

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  sab-omni consolidate checkpoints/epoch_3.dcp                 # writes checkpoints/epoch_3.pt
  sab-omni consolidate run/best_model.dcp -o best_model.pt --weights-only
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("consolidate", help="merge a sharded FSDP checkpoint into one file",
                       description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="DIR",
                   help="a sharded checkpoint directory (*.dcp) written by train --parallel fsdp")
    p.add_argument("-o", "--output", metavar="FILE", help="the file to write (default: DIR with the suffix .pt)")
    p.add_argument("--weights-only", action="store_true", help="leave out the optimizer state (a smaller file)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    return p


def consolidate(src: str | Path, dst: str | Path, weights_only: bool = False) -> Path:
    """Read every shard of ``src`` into a plain model (and AdamW) in this process and write ``dst``."""
    from sab_byon_omni.training.trainer import make_optimizer

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise SabError(f"{src}: not a directory (a sharded checkpoint is a *.dcp directory)")
    meta = D.read_sharded_meta(src)
    try:
        cfg = build_config(meta["config"], source=str(src))
    except (KeyError, SabError) as e:
        raise SabError(f"{src}: bad config in {D.META}: {e}") from None
    model = CausalTransformer(cfg.model)
    optimizer = None if weights_only else make_optimizer(model, cfg, torch.device("cpu"))
    try:
        D.load_sharded(src, model, optimizer, no_dist=True)
    except SabError:
        raise
    except Exception as e:  # missing or damaged shard files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SabError(f"{src}: cannot read the shards: {first}") from None
    ck = {k: v for k, v in meta.items() if k != "sharded"}
    ck["model_state_dict"] = model.state_dict()
    if optimizer is not None:
        ck["optimizer_state_dict"] = optimizer.state_dict()
    ck["config"] = cfg.to_dict()
    return ckpt_io.atomic_save(ck, dst)


def run(args: argparse.Namespace) -> int:
    src = Path(args.checkpoint)
    if not src.name or src.name in (".", ".."):
        raise SabError(f"checkpoint {args.checkpoint!r}: give the path of a sharded checkpoint directory")
    dst = Path(args.output) if args.output else src.with_suffix(".pt")
    if dst.exists() and not args.force:
        raise SabError(f"{dst} exists; pass --force to overwrite it or -o to choose another file")
    out = consolidate(src, dst, weights_only=args.weights_only)
    n = sum(t.numel() for t in torch.load(out, weights_only=True)["model_state_dict"].values())
    print(f"wrote {out} ({n:,} values in the model state dict)")
    return 0
