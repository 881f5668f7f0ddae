"""sab-omni consolidate: turn a sharded FSDP checkpoint (a *.dcp directory) into one checkpoint file.

The file has the guide's format (``model_state_dict`` with the plain model's keys,
``optimizer_state_dict`` as ``torch.optim.AdamW.state_dict()`` gives it, ``epoch``, ``global_step``,
``config``, ...), so ``torch.load`` loads it, ``sab-omni generate`` samples from it and a single
process resumes training from it with ``--resume FILE``. Run it in one process, without torchrun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sab_byon_omni.errors import SabError

EXAMPLE = """examples:
  sab-omni consolidate checkpoints/epoch_3.dcp                 # writes checkpoints/epoch_3.pt
  sab-omni consolidate run/best_model.dcp -o best_model.pt --weights-only
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("consolidate", help="merge a sharded FSDP checkpoint into one file",
                       description=__doc__, epilog=EXAMPLE)
    p.add_argument("checkpoint", metavar="DIR",
                   help="a sharded checkpoint directory (*.dcp) written by train --parallel fsdp")
    p.add_argument("-o", "--output", metavar="FILE", help="the file to write (default: DIR with the suffix .pt)")
    p.add_argument("--weights-only", action="store_true", help="leave out the optimizer state (a smaller file)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    src = Path(args.checkpoint)
    if not src.name or src.name in (".", ".."):
        raise SabError(f"checkpoint {args.checkpoint!r}: give the path of a sharded checkpoint directory")
    from sab_byon_omni.files.checkpoint import load_checkpoint
    from sab_byon_omni.training.consolidate import consolidate

    dst = Path(args.output) if args.output else src.with_suffix(".pt")
    out = consolidate(src, dst, weights_only=args.weights_only, overwrite=args.force)
    n = sum(t.numel() for t in load_checkpoint(out, mmap=True)["model_state_dict"].values())
    print(f"wrote {out} ({n:,} values in the model state dict)")
    return 0
