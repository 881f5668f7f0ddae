"""Sharded checkpoints (FSDP2): ``torch.distributed.checkpoint`` folders, read without running code.

A sharded checkpoint is a folder ``<name>.dcp`` holding DCP's ``.metadata`` and one shard file per
rank, plus ``meta.pt``: the rest of the guide's checkpoint dict (epoch, config, tokenizer, ...),
an ordinary weights-only file.

DCP's own reader is not safe for files from elsewhere: it reads ``.metadata`` with plain
``pickle.load`` and the non-tensor entries of a state dict (the optimizer's hyper-parameters)
with ``torch.load(weights_only=False)``, so a crafted folder runs code. Here ``.metadata`` is
scanned first (bounded, and ``BUILD`` only on new instances of DCP's metadata dataclasses: an
allow-list alone would let a pickle set attributes on the classes it may import, such as
``PosixPath``), then unpickled through an allow-list of DCP's metadata classes; its shards must be
regular files of the folder, stored in the dtypes of the model they load into, and the byte entries
are loaded with ``weights_only=True``; anything else is refused with a :class:`SabError`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.checkpoint import RESUME_ADVICE, check_format, read_file, save_checkpoint, verify
from sab_byon_omni.files.untrusted import check_pickle, check_torch_file

SUFFIX = ".dcp"
META = "meta.pt"
MAX_METADATA_BYTES = 1 << 30  # DCP metadata grows with the number of tensors and shards, not their size
_SHARD_NAME = re.compile(r"^[\w.-]{1,200}\.distcp$")
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
              "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
}
# the dataclasses whose new instances the pickle fills in (BUILD); nothing else may be given attributes
_BUILDABLE = frozenset({f"torch.distributed.checkpoint.metadata.{n}" for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta")} | {"torch.distributed.checkpoint.filesystem._StorageInfo"})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def read_metadata(path: str | Path) -> Any:
    """DCP's ``.metadata`` of the folder ``path``, scanned, unpickled through the allow-list and
    checked (its shard files are regular files inside the folder); anything else is a SabError."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    folder = Path(path)
    f = folder / ".metadata"
    try:
        st = f.stat()
        if not stat.S_ISREG(st.st_mode):  # a device or a pipe would never end (or never start)
            raise SabError(f"{f}: refused to load: not a regular file")
        if st.st_size > MAX_METADATA_BYTES:
            raise SabError(f"{f}: {st.st_size:,} bytes is too large for DCP metadata (hostile file?)")
        with open(f, "rb") as stream:
            check_pickle(stream, str(f), buildable=_BUILDABLE)
            stream.seek(0)
            metadata = _MetadataUnpickler(stream).load()
    except SabError:
        raise
    except pickle.UnpicklingError as e:
        raise SabError(f"{f}: refused to load: {first_line(e)}") from None
    except OSError as e:
        raise SabError(f"{f}: cannot read it: {e.strerror or e}") from None
    except Exception as e:  # truncated or garbled pickles raise many types (EOFError, ValueError, MemoryError...)
        raise SabError(f"{f}: not readable DCP metadata (truncated or corrupt?): {type(e).__name__}") from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(metadata, "storage_data", None), dict) \
            or not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise SabError(f"{f}: refused to load: it holds a {type(metadata).__name__}, not DCP Metadata")
    seen: set[str] = set()
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not _SHARD_NAME.match(name):
            raise SabError(f"{f}: refused to load: a shard file name {bounded(name)} that is not a plain "
                           "file of the folder")
        if name in seen:
            continue
        seen.add(name)
        try:
            mode = os.lstat(folder / name).st_mode
        except OSError as e:
            raise SabError(f"{folder}: cannot read its shard {name}: {e.strerror or e} (an incomplete copy?)") from None
        if not stat.S_ISREG(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "a device, pipe or folder"
            raise SabError(f"{folder}: refused to load: its shard {name} is {kind}, not a regular file of the folder")
    return metadata


def _check_dtypes(metadata: Any, model: dict[str, Any], path: Path) -> None:
    """Every tensor in the shards has the dtype of what it loads into (DCP would cast it silently):
    the model's weights, and each optimizer moment that of its weight."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    for key, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        dtype = getattr(entry.properties, "dtype", None)
        if key.startswith("model."):
            mine = model.get(key[len("model."):])
            want = getattr(mine, "dtype", None)
        elif key.startswith("optimizer.state.") and not key.endswith(".step"):
            weight = entries.get("model." + key[len("optimizer.state."):].rpartition(".")[0])
            want = getattr(getattr(weight, "properties", None), "dtype", None)
        else:
            continue
        if want is not None and dtype != want:
            raise SabError(f"{path}: refused to load: its shards store {bounded(key)} as {bounded(dtype)}, where "
                           f"{str(want).removeprefix('torch.')} is expected (a damaged or hostile checkpoint?)")


def _safe_reader(path: Path, metadata: Any) -> Any:
    """DCP's file reader, handed the ``.metadata`` already read safely (its own would unpickle it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # DCP's own planner reads these entries with weights_only=False. Read them safely here,
            # and hand DCP a copy written by us from the plain object that came out.
            check_torch_file(value, f"a pickled entry {read_item.dest_index.fqn}")
            obj = torch.load(value, weights_only=True)
            clean = io.BytesIO()
            torch.save(obj, clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafePlanner()


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir()


def read_meta(path: str | Path, advice: str = RESUME_ADVICE) -> dict[str, Any]:
    """The checkpoint dict of a sharded checkpoint, without the two state dicts (``advice``: what a
    damaged file's message suggests, see :func:`~sab_byon_omni.files.checkpoint.verify`)."""
    p = Path(path)
    if not (p / META).is_file():
        raise SabError(f"{p}: not a sharded checkpoint (no {META})")
    if not (p / ".metadata").is_file():
        raise SabError(f"{p}: not a sharded checkpoint (no .metadata; an interrupted save?)")
    ck = read_file(p / META)  # weights-only
    if isinstance(ck, dict):
        ck.setdefault("model_state_dict", {})  # the weights are in the shards
    check_format(ck, str(p / META))
    verify(ck, str(p / META), advice)
    return ck


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
         is_main: bool, barrier: Any) -> Path:
    """All ranks write their shards into ``path`` via a temporary sibling that rank 0 renames once
    every rank is done; ``meta`` goes to ``path/meta.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if is_main:
        save_checkpoint({**meta, "model_state_dict": {}, "sharded": True}, tmp / META)
        old = path.with_name(f".{path.name}.old.tmp")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    barrier()
    return path


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         no_dist: bool = False, advice: str = RESUME_ADVICE) -> dict[str, Any]:
    """Load a sharded checkpoint into ``model`` (FSDP2-wrapped, or a plain module when ``no_dist``)
    and ``optimizer``; DCP reshards, so the number of ranks may differ from the saving run's.
    Returns the meta dict. A hostile or damaged folder is a SabError; no pickled code runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = read_meta(path, advice)
    path = Path(path)
    metadata = read_metadata(path)
    if optimizer is None:
        state = {"model": model.state_dict()}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    _check_dtypes(metadata, state["model"], path)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, storage_reader=_safe_reader(path, metadata), planner=_safe_planner(), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error in a CheckpointException
        raise SabError(f"{path}: cannot read the shards: {_dcp_reason(e)}") from None
    try:
        if optimizer is None:
            model.load_state_dict(state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise SabError(f"{path}: its shards do not fit this model and optimizer: {type(e).__name__}: "
                       f"{first_line(e)}") from None
    return meta


def _dcp_reason(e: BaseException) -> str:
    """DCP reports a rank's failure as a CheckpointException holding (exception, traceback) pairs."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException) else e
    if isinstance(e, pickle.UnpicklingError):
        return f"refused to load a pickled entry: {first_line(e)}"
    if isinstance(e, SabError):
        return first_line(e)
    return f"{type(e).__name__}: {first_line(e)}"
