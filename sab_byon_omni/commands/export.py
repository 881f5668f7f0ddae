"""sab-omni export: a checkpoint's weights to safetensors, and a safetensors file back to a checkpoint.

A ``.safetensors`` file holds only tensors and a string header: loading it can never run code,
which makes it the format to share weights in. The export writes the model weights (not the
optimizer) plus the run's config and tokenizer as header metadata, so the file alone rebuilds the
model. A tied output head (``model.tie_embeddings``, the default) shares its tensor with the token
embedding; safetensors refuses shared tensors, so ``safetensors.torch.save_model`` stores it once
and ``load_model`` re-ties it.

Python: :func:`export_safetensors` and :func:`import_safetensors`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.errors import SabError

log = logging.getLogger(__name__)

META_FORMAT = "sab-byon-omni/1"
DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

EXAMPLE = """examples:
  sab-omni export --checkpoint checkpoints/best_model.pt --out model.safetensors
  sab-omni export --checkpoint checkpoints/best_model.pt --out model-bf16.safetensors --dtype bf16
  sab-omni export --from-safetensors model.safetensors --out imported.pt   # back to a checkpoint
  sab-omni generate --checkpoint imported.pt --prompt "Consciousness is"
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export weights to safetensors, or import them back",
                       description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by train: write its weights to --out")
    src.add_argument("--from-safetensors", metavar="PATH",
                     help="a .safetensors file written by export: write a checkpoint (.pt) to --out")
    p.add_argument("--out", required=True, metavar="PATH", help="the file to write (never overwritten without --force)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="keep",
                   help="store the weights in this dtype (export only; default: keep the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        out = export_safetensors(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.force)
    else:
        if args.dtype != "keep":
            raise SabError("--dtype applies to export (--checkpoint), not to --from-safetensors")
        out = Path(args.out)
        import_safetensors(args.from_safetensors, out, overwrite=args.force)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB)")
    return 0


# ------------------------------------------------------------------------------------ library
def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve():
        raise SabError(f"--out {out} is the input file; choose another path")
    if out.exists() and not overwrite:
        raise SabError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_file():
        raise SabError(f"{out} is not a file")


def _write_atomically(out: Path, write: Any) -> None:
    """``write(tmp_path)`` then ``os.replace``; on failure nothing is left behind."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise SabError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise SabError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def export_safetensors(checkpoint: str | Path, out: str | Path, dtype: str = "keep", overwrite: bool = False) -> Path:
    """Write the model weights of ``checkpoint`` to the safetensors file ``out``, with the config,
    tokenizer, epoch and global step as header metadata. Returns ``out``."""
    from safetensors.torch import save_model

    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.training.checkpoint import load_checkpoint

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
    _write_atomically(out, lambda tmp: save_model(sab.model, tmp, metadata=meta))
    log.info("exported %s (%s parameters) to %s", src, f"{sab.model.num_parameters():,}", out)
    return out


def import_safetensors(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild a checkpoint dict (weights, config, tokenizer; no optimizer state) from a file
    written by :func:`export_safetensors`; also save it to ``out`` if given. The checkpoint works
    with ``generate``, ``eval`` and ``train --resume PATH`` (which then starts a fresh optimizer)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from sab_byon_omni.config import build_config
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.data.tokenizers import from_spec
    from sab_byon_omni.training.checkpoint import FORMAT, atomic_save

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
    ck = {"format": FORMAT, "epoch": epoch, "model_state_dict": sab.model.state_dict(), "loss": None,
          "global_step": step, "config": cfg.to_dict(), "tokenizer": sab.tokenizer.to_spec(),
          "torch_version": str(torch.__version__), "imported_from": src.name}
    if out is not None:
        atomic_save(ck, out)
    return ck
