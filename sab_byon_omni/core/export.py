"""A trained model, written in the format another tool wants.

* ``safetensors``: the weights (not the optimizer), with the run's config and tokenizer in the
  header, so the file alone rebuilds the model. Loading it can never run code. A tied head
  shares its tensor with the embedding; safetensors refuses shared tensors, so it is stored once
  and re-tied on load.
* ``hf``: a transformers folder in the model's own architecture (Llama, Mistral, Qwen2, GPT-2,
  GPT-NeoX; the SAB model as GPT-NeoX) that ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` read without this package (see docs/HF_EXPORT.md).
* ``pt``: a training checkpoint (weights, config, tokenizer; no optimizer state), which
  ``generate``, ``eval`` and ``train --resume``/``--init_from`` take.
* ``gguf``: llama.cpp's format, matrices in F16, Q8_0 or F32 (``--gguf-type``), for a model of
  Llama shape (see ``interop.gguf``); a GGUF source is re-written without building a model.

The source is anything :meth:`SABTranscendentV2.load` reads, including the outputs above.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni import device
from sab_byon_omni.config import EXPORT_FORMATS
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.atomic import atomic_path
from sab_byon_omni.files.checkpoint import save_checkpoint
from sab_byon_omni.interop.sources import EXPORT_FORMAT, locate, read_exported_safetensors

log = logging.getLogger(__name__)

NOT_WRITTEN = "the output was not written"  # a failed export: no earlier checkpoint of a run is involved
DTYPES: dict[str, torch.dtype | None] = {"keep": None, **device.DTYPES}


def format_for(out: str | Path) -> str:
    """The format an output path asks for: ``*.safetensors``, ``*.pt``, ``*.gguf``, else a transformers folder."""
    suffix = Path(out).suffix
    return {".safetensors": "safetensors", ".pt": "pt", ".gguf": "gguf"}.get(suffix, "hf")


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve():
        raise SabError(f"-o {out} is the input; choose another path")
    if not os.path.lexists(out):
        return
    from sab_byon_omni.interop.hf_export import check_replaceable

    check_replaceable(out, source)  # what --force would refuse is refused now, without suggesting it
    if not overwrite:
        raise SabError(f"{out} already exists; pass --force to replace it")


def _model(source: str | Path, dtype: str) -> SABTranscendentV2:
    if dtype not in DTYPES:
        raise SabError(f"--dtype={bounded(dtype)} is not one of: {', '.join(DTYPES)}")
    sab = SABTranscendentV2.load(source)
    if DTYPES[dtype] is not None:
        sab.model.to(DTYPES[dtype])
    return sab


def export_model(source: str | Path, out: str | Path, fmt: str | None = None, dtype: str = "keep",
                 overwrite: bool = False, gguf_type: str | None = None) -> Path:
    """Write the model at ``source`` to ``out`` in ``fmt`` (default: from ``out``'s name);
    ``gguf_type``: the GGUF's matrix type (default f16)."""
    fmt = fmt or format_for(out)
    if fmt not in EXPORT_FORMATS:
        raise SabError(f"--format={bounded(fmt)} is not one of: {', '.join(EXPORT_FORMATS)}")
    if gguf_type is not None and fmt != "gguf":
        raise SabError(f"--gguf-type applies to a GGUF export (--format gguf or a .gguf output), not {fmt}")
    out = Path(out)
    _check_out(out, locate(source), overwrite)
    if fmt == "gguf":
        return export_gguf(source, out, gguf_type or "f16", dtype, overwrite)
    if fmt == "hf":
        from sab_byon_omni.interop.hf_export import save_hf

        sab = _model(source, dtype)
        return save_hf(sab.model, sab.tokenizer, out, overwrite=overwrite)
    if out.exists() and not out.is_file():
        raise SabError(f"{out} is not a file")
    if fmt == "safetensors":
        return export_safetensors(source, out, dtype, overwrite)
    if dtype != "keep":
        raise SabError("--dtype applies to safetensors and hf exports; a checkpoint keeps fp32 weights")
    sab = SABTranscendentV2.load(source)
    return save_checkpoint(checkpoint_dict(sab), out, kept=NOT_WRITTEN)


def checkpoint_dict(sab: SABTranscendentV2) -> dict[str, Any]:
    """A training checkpoint of the model alone (no optimizer state: a resume starts a fresh one)."""
    return {"epoch": 0, "model_state_dict": sab.model.state_dict(), "loss": None,
            "global_step": getattr(sab, "global_step", 0), "config": sab.config.to_dict(),
            "tokenizer": sab.tokenizer.to_spec(), "torch_version": str(torch.__version__),
            "imported_from": str(getattr(sab, "origin", ""))[:300]}


def export_safetensors(source: str | Path, out: str | Path, dtype: str = "keep", overwrite: bool = False) -> Path:
    """Write the model weights at ``source`` to the safetensors file ``out``, with the config,
    tokenizer and global step as header metadata. Returns ``out``."""
    from safetensors.torch import save_model

    out = Path(out)
    _check_out(out, locate(source), overwrite)
    sab = _model(source, dtype)
    meta = {"format": EXPORT_FORMAT, "config": json.dumps(sab.config.to_dict()),
            "tokenizer": json.dumps(sab.tokenizer.to_spec()), "epoch": "0",
            "global_step": str(int(getattr(sab, "global_step", 0))), "source": Path(str(source)).name[:200]}
    with atomic_path(out, what="safetensors file", kept=NOT_WRITTEN) as tmp:
        save_model(sab.model, str(tmp), metadata=meta)
    log.debug("exported %s (%s parameters) to %s", source, f"{sab.model.num_parameters():,}", out)
    return out


def import_safetensors(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """A checkpoint dict (weights, config, tokenizer; no optimizer state) from a file written by
    :func:`export_safetensors`, checked by loading it into its model; also saved to ``out`` if given."""
    src = Path(path)
    if not src.is_file():
        raise SabError(f"safetensors file not found: {src}")
    if out is not None:
        _check_out(Path(out), src, overwrite)
    sab = SABTranscendentV2.from_weights(read_exported_safetensors(src))
    ck = checkpoint_dict(sab)
    ck["imported_from"] = src.name
    if out is not None:
        save_checkpoint(ck, out, kept=NOT_WRITTEN)
    return ck


def export_gguf(source: str | Path, out: str | Path, gguf_type: str = "f16", dtype: str = "keep",
                overwrite: bool = False) -> Path:
    """Write the model at ``source`` as a GGUF file with matrices in ``gguf_type``. A GGUF source
    goes straight through the transformers-shaped form (no model is built); any other source is
    loaded and must be of Llama shape."""
    from sab_byon_omni.interop.gguf import read_gguf, write_gguf
    from sab_byon_omni.interop.sources import gguf_file

    if dtype != "keep":
        raise SabError("--dtype applies to safetensors and hf exports; a GGUF's types are chosen by --gguf-type")
    out, p = Path(out), locate(source)
    if out.exists() and not out.is_file():
        raise SabError(f"{out} is not a file")
    gguf = gguf_file(p)
    parts = read_gguf(gguf) if gguf is not None else _hf_parts(SABTranscendentV2.load(source))
    return write_gguf(out, *parts, dtype=gguf_type, overwrite=overwrite)


def _hf_refuses(sab: SABTranscendentV2) -> bool:
    """Whether ``--format hf`` would refuse this model too (a lever no transformers class computes)."""
    from sab_byon_omni.interop.hf_families import check_representable

    try:
        check_representable(sab.model.cfg, "gpt_neox" if sab.model.cfg.family == "sab" else sab.model.cfg.family)
    except SabError:
        return True
    return False


def _hf_parts(sab: SABTranscendentV2) -> Any:
    """The transformers-shaped form of a loaded model: only a Llama-shaped one has a GGUF form."""
    from sab_byon_omni.interop.hf import to_hf_parts

    family = sab.model.cfg.family
    if family in ("sab", "gpt2", "gpt_neox"):
        what = ("a SAB-family model (LayerNorm, tanh-GELU MLP, fragmergent embedding)" if family == "sab"
                else f"a {family} model")
        raise SabError(f"{sab.origin}: {what} has no GGUF form here: GGUF export writes Llama-shaped models "
                       "(llama, mistral, qwen2). " + ("--format safetensors or pt keeps it" if _hf_refuses(sab)
                                                      else "Use --format hf for a transformers folder"))
    return to_hf_parts(sab.model, sab.tokenizer)
