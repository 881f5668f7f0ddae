"""sab-omni export: a checkpoint's weights to safetensors, and a safetensors file back to a checkpoint.

A ``.safetensors`` file holds only tensors and a string header: loading it can never run code,
which makes it the format to share weights in. The export writes the model weights (not the
optimizer) plus the run's config and tokenizer as header metadata, so the file alone rebuilds the
model. A tied output head (``model.tie_embeddings``, the default) shares its tensor with the token
embedding; safetensors refuses shared tensors, so ``safetensors.torch.save_model`` stores it once
and ``load_model`` re-ties it.

Python: :func:`sab_byon_omni.core.export.export_safetensors` and :func:`~sab_byon_omni.core.export.import_safetensors`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sab_byon_omni.errors import SabError

DTYPES = ("keep", "fp32", "bf16", "fp16")

EXAMPLE = """examples:
  sab-omni export --checkpoint checkpoints/best_model.pt --out model.safetensors
  sab-omni export --checkpoint checkpoints/best_model.pt --out model-bf16.safetensors --dtype bf16
  sab-omni export --from-safetensors model.safetensors --out imported.pt   # back to a checkpoint
  sab-omni generate --checkpoint imported.pt --prompt "Consciousness is"
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export weights to safetensors, or import them back",
                       description=__doc__, epilog=EXAMPLE)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by train: write its weights to --out")
    src.add_argument("--from-safetensors", metavar="PATH",
                     help="a .safetensors file written by export: write a checkpoint (.pt) to --out")
    p.add_argument("--out", required=True, metavar="PATH", help="the file to write (never overwritten without --force)")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="store the weights in this dtype (export only; default: keep the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from sab_byon_omni.core.export import export_safetensors, import_safetensors

    if args.checkpoint:
        out = export_safetensors(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.force)
    else:
        if args.dtype != "keep":
            raise SabError("--dtype applies to export (--checkpoint), not to --from-safetensors")
        out = Path(args.out)
        import_safetensors(args.from_safetensors, out, overwrite=args.force)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB)")
    return 0
