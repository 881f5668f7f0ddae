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
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.io.atomic import atomic_write
from sab_byon_omni.io.untrusted import check_torch_file

log = logging.getLogger(__name__)

FORMAT_NAME = "sab-byon-omni"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
REQUIRED = ("epoch", "model_state_dict", "global_step", "config")
CHECKSUM_ALGO = "crc32"
MAX_STEP = 10**12  # no run takes more optimizer steps; a larger number is a damaged or hostile file


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


# ------------------------------------------------------------------------------------ format
def check_format(ck: Any, source: str) -> dict[str, Any]:
    """The checkpoint dict if it is ours and of a version this code reads; else a SabError."""
    if not isinstance(ck, dict) or any(k not in ck for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ck, dict) or k not in ck]
        raise SabError(f"{source}: not a sab-byon-omni checkpoint (missing {', '.join(missing)})")
    fmt = ck.get("format", FORMAT)  # checkpoints from before the tag was checked are version 1
    name, _, version = fmt.partition("/") if isinstance(fmt, str) else ("", "", "")
    if name != FORMAT_NAME or not version.isdigit():
        raise SabError(f"{source}: unknown checkpoint format {bounded(fmt)} (this version reads {FORMAT})")
    if int(version) > FORMAT_VERSION:
        raise SabError(f"{source}: written by a newer sab-byon-omni (format {fmt}; this version reads up to "
                       f"{FORMAT}): upgrade the package")
    step = ck["global_step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise SabError(f"{source}: global_step={bounded(step)} is not a step count (damaged checkpoint?)")
    epoch = ck["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= MAX_STEP:
        raise SabError(f"{source}: epoch={bounded(epoch)} is not an epoch count (damaged checkpoint?)")
    if not isinstance(ck["config"], dict) or not isinstance(ck["model_state_dict"], dict):
        raise SabError(f"{source}: config and model_state_dict must be mappings (damaged checkpoint?)")
    return ck


def verify(ck: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose tensors do not match the checksum it carries (none: nothing to check)."""
    stored = ck.get("checksum")
    if stored is None:
        return
    if not isinstance(stored, dict) or stored.get("algo") != CHECKSUM_ALGO or not isinstance(stored.get("value"), str):
        raise SabError(f"{source}: unreadable checksum entry {bounded(stored)} (damaged checkpoint?)")
    if checksum(ck) != stored["value"]:
        raise SabError(f"{source}: its tensors do not match their checksum: the file is damaged (a flipped bit or "
                       "a bad block); resume from another checkpoint")


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


def save_checkpoint(ck: dict[str, Any], path: str | Path) -> Path:
    """Tag, checksum and write ``ck`` atomically: the previous file at ``path`` survives any failure.
    Tensors are written as CPU tensors (saved from a GPU too), so a plain ``torch.load`` works on
    any machine, one without CUDA included."""
    ck = {**to_cpu(ck), "format": FORMAT}
    ck["checksum"] = {"algo": CHECKSUM_ALGO, "value": checksum(ck)}
    return atomic_write(path, lambda f: torch.save(ck, f), what="checkpoint", kept="earlier checkpoints are intact")


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
                    verify_tensors: bool | None = None) -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing, truncated, corrupt, unsafe, foreign, newer or
    damaged file is a :class:`SabError` naming it. ``mmap=True`` maps the tensors instead of
    reading them (cheap when only the metadata is needed) and then skips the checksum unless
    ``verify_tensors`` asks for it."""
    ck = check_format(read_file(path, map_location, mmap), str(path))
    if verify_tensors if verify_tensors is not None else not mmap:
        verify(ck, str(path))
    return ck


def finite_float(value: Any, default: float = math.inf) -> float:
    """A loss-like number from a checkpoint, or ``default`` when it is missing or not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default
