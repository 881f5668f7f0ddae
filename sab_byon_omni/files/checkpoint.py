"""Checkpoint files: one plain dict of tensors and primitives, written atomically, loaded safely,
checked for format and integrity.

The dict has the guide's keys (``epoch``, ``model_state_dict``, ``optimizer_state_dict``, ``loss``,
``global_step``, ``config``) plus what an exact resume needs (``scaler_state_dict``, ``rng_state``,
``data_state``, ``tokenizer``, ``history``, ``best_val_loss``), a ``format`` tag and a ``checksum``
of every tensor. Everything loads with ``torch.load(path)`` under PyTorch's default
``weights_only=True``: no pickled code is ever run.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.atomic import atomic_write
from sab_byon_omni.files.untrusted import check_torch_file, is_count

log = logging.getLogger(__name__)

FORMAT_NAME = "sab-byon-omni"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
REQUIRED = ("epoch", "model_state_dict", "global_step", "config")
CHECKSUM_ALGO = "crc32"
_VERSION = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
RESUME_ADVICE = "resume from another checkpoint"
COPY_ADVICE = "use another copy of it"


# ------------------------------------------------------------------------------------ integrity
def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists, with a stable path, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k != "checksum":
                yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def checksum(ck: dict[str, Any]) -> str:
    """CRC-32 over the bytes of every tensor of ``ck`` and their paths: detects a flipped bit or a
    damaged block (it is not a signature: anyone who can edit the file can recompute it)."""
    crc = 0
    for path, t in _tensors(ck):
        crc = zlib.crc32(path.encode(), crc)
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            crc = zlib.crc32(memoryview(data.numpy()), crc)
    return f"{crc:08x}"


def _kind_problem(t: torch.Tensor) -> str | None:
    """Why a tensor from a file is not a plain dense one we can checksum and load, or None."""
    if t.layout != torch.strided:
        return f"a sparse ({str(t.layout).removeprefix('torch.')}) tensor"
    if t.is_quantized:
        return "a quantized tensor"
    if t.is_nested:
        return "a nested tensor"
    if t.device.type == "meta":
        return "a meta tensor (no values)"
    if t.is_complex():
        return f"a complex tensor ({str(t.dtype).removeprefix('torch.')}: the weights are real)"
    return None


def check_tensors(obj: Any, source: str) -> None:
    """Refuse (SabError, naming it) a tensor inside ``obj`` that a checkpoint or a model file never
    holds: sparse, quantized, nested, meta or complex (a checksum or a model load would crash on
    it, or silently drop its imaginary part)."""
    for path, t in _tensors(obj):
        why = _kind_problem(t)
        if why is not None:
            raise SabError(f"{source}: refused to load: {bounded(path.lstrip('/'))} is {why}; a model file holds "
                           "dense real tensors only (a damaged or hostile file?)")


# ------------------------------------------------------------------------------------ format
def check_format(ck: Any, source: str) -> dict[str, Any]:
    """The checkpoint dict if it is ours and of a version this code reads; else a SabError."""
    if not isinstance(ck, dict) or any(k not in ck for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ck, dict) or k not in ck]
        raise SabError(f"{source}: not a sab-byon-omni checkpoint (missing {', '.join(missing)})")
    fmt = ck.get("format", FORMAT)  # checkpoints from before the tag was checked are version 1
    name, _, version = fmt.partition("/") if isinstance(fmt, str) else ("", "", "")
    if name != FORMAT_NAME or not _VERSION.fullmatch(version):
        raise SabError(f"{source}: unknown checkpoint format {bounded(fmt)} (this version reads {FORMAT})")
    if int(version) > FORMAT_VERSION:
        raise SabError(f"{source}: written by a newer sab-byon-omni (format {fmt}; this version reads up to "
                       f"{FORMAT}): upgrade the package")
    if not is_count(ck["global_step"]):
        raise SabError(f"{source}: global_step={bounded(ck['global_step'])} is not a step count (damaged checkpoint?)")
    if not is_count(ck["epoch"]):
        raise SabError(f"{source}: epoch={bounded(ck['epoch'])} is not an epoch count (damaged checkpoint?)")
    if not isinstance(ck["config"], dict) or not isinstance(ck["model_state_dict"], dict):
        raise SabError(f"{source}: config and model_state_dict must be mappings (damaged checkpoint?)")
    check_tensors(ck, source)
    if "optimizer_state_dict" in ck:
        _check_optimizer_state(ck["optimizer_state_dict"], ck["model_state_dict"], source)
    return ck


def _check_optimizer_state(osd: Any, weights: dict[str, Any], source: str) -> None:
    """An optimizer state dict whose state belongs to the parameters its groups list, and whose
    moments have the weights' dtype: ``load_state_dict`` silently drops state under an index no
    group lists (the moments are lost, the step restarts at 1) and casts moments of another dtype."""
    groups = osd.get("param_groups") if isinstance(osd, dict) else None
    state = osd.get("state") if isinstance(osd, dict) else None
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise SabError(f"{source}: optimizer_state_dict is not an optimizer's state dict (state, param_groups with "
                       "params; damaged checkpoint?)")
    listed = {i for g in groups for i in g["params"] if isinstance(i, int) and not isinstance(i, bool)}
    dtypes = {t.dtype for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    for index, entry in state.items():
        if index not in listed or isinstance(index, bool):
            raise SabError(f"{source}: optimizer state for parameter {bounded(index)}, which no parameter group "
                           "lists (its moments would be dropped silently; damaged or hostile checkpoint?)")
        if not isinstance(entry, dict):
            raise SabError(f"{source}: optimizer state of parameter {index} is a {type(entry).__name__}, not a "
                           "mapping (damaged checkpoint?)")
        for key, value in entry.items():
            if key == "step" or not isinstance(value, torch.Tensor) or len(dtypes) != 1:
                continue  # the step and non-tensors: checked when the optimizer loads them
            if value.dtype not in dtypes:
                want = str(next(iter(dtypes))).removeprefix("torch.")
                raise SabError(f"{source}: optimizer state {bounded(key)} of parameter {index} is "
                               f"{str(value.dtype).removeprefix('torch.')}, the weights are {want} (it must match "
                               "them; damaged or hostile checkpoint?)")


def verify(ck: dict[str, Any], source: str, advice: str = RESUME_ADVICE) -> None:
    """Refuse a checkpoint whose tensors do not match the checksum it carries (none: nothing to
    check); ``advice`` ends the message (what to do instead: :data:`RESUME_ADVICE` when resuming,
    :data:`COPY_ADVICE` when the file is a model to sample, score or export)."""
    stored = ck.get("checksum")
    if stored is None:
        return
    if not isinstance(stored, dict) or stored.get("algo") != CHECKSUM_ALGO or not isinstance(stored.get("value"), str):
        raise SabError(f"{source}: unreadable checksum entry {bounded(stored)} (damaged checkpoint?)")
    try:
        actual = checksum(ck)
    except (RuntimeError, TypeError, ValueError) as e:  # a tensor no checkpoint holds (check_tensors names most)
        raise SabError(f"{source}: its tensors cannot be checked against their checksum ({first_line(e)}); "
                       f"the file is damaged or hostile: {advice}") from None
    if actual != stored["value"]:
        raise SabError(f"{source}: its tensors do not match their checksum: the file is damaged (a flipped bit or "
                       f"a bad block); {advice}")


# ------------------------------------------------------------------------------------ files
def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside nested dicts, lists and tuples copied to the CPU (CPU
    tensors and other values as they are; a state dict keeps its ``_metadata``)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items()) if type(obj) in (dict, OrderedDict) else \
            {k: to_cpu(v) for k, v in obj.items()}
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(ck: dict[str, Any], path: str | Path, kept: str = "earlier checkpoints are intact") -> Path:
    """Tag, checksum and write ``ck`` atomically: the previous file at ``path`` survives any failure.
    Tensors are written as CPU tensors (saved from a GPU too), so a plain ``torch.load`` works on
    any machine, one without CUDA included. ``kept`` ends the message of a failed write (what is
    safe: a run's earlier checkpoints; for an export or a consolidation, say the output was not written)."""
    ck = {**to_cpu(ck), "format": FORMAT}
    ck["checksum"] = {"algo": CHECKSUM_ALGO, "value": checksum(ck)}
    return atomic_write(path, lambda f: torch.save(ck, f), what="checkpoint", kept=kept)


def read_file(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file whose pickle passed :func:`check_torch_file`
    (no cycles, no shared-reference bombs, no raw or legacy pickles), with every failure turned
    into one SabError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SabError(f"checkpoint not found: {p}")
    try:
        check_torch_file(p, str(p))
    except OSError as e:
        raise SabError(f"cannot read {p}: {e.strerror or e}") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise SabError(f"{p}: refused to load: it is not a plain checkpoint (weights_only): {first_line(e)}") from None
        except (MemoryError, RecursionError) as e:
            raise SabError(f"{p}: refused to load: {type(e).__name__} while reading it (hostile file?)") from None
        except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOFError, IndexError, ...)
            raise SabError(f"{p}: not a readable checkpoint (truncated or corrupt?): {first_line(e)}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    verify_tensors: bool | None = None, advice: str = RESUME_ADVICE) -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing, truncated, corrupt, unsafe, foreign, newer or
    damaged file is a :class:`SabError` naming it. ``mmap=True`` maps the tensors instead of
    reading them (cheap when only the metadata is needed) and then skips the checksum unless
    ``verify_tensors`` asks for it. ``advice``: what a damaged file's message suggests (see :func:`verify`)."""
    ck = check_format(read_file(path, map_location, mmap), str(path))
    if verify_tensors if verify_tensors is not None else not mmap:
        verify(ck, str(path), advice)
    return ck


def finite_float(value: Any, default: float = math.inf) -> float:
    """A loss-like number from a checkpoint, or ``default`` when it is missing or not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default
