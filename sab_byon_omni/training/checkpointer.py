"""The run folder and its checkpoints: names, the payload, the metadata record, validation, the
resume point, pruning, rewinding, and one run per folder.

Names: ``step_<N>`` (every ``train.save_every`` steps, and when a run stops early), ``epoch_<N>``
(each epoch's end) and ``best_model`` (the best validation loss so far); ``.pt`` files, or ``.dcp``
folders for FSDP. One rule orders them, for resuming and pruning alike: the *loadable* checkpoint
with the highest global step wins (an epoch file beats the step file of the same step, then the
newer file); resuming also checks its tensors against their checksum and falls back to the next
(:meth:`Checkpointer.resume_point`: the one rule for which file a run continues from). Damaged
files are skipped with a warning and never deleted, and pruning never looks past the step a run
has reached.

A checkpoint is the run's parts that have state, each saved with ``state_dict()`` and restored with
``load_state_dict()`` (model, optimizer, scaler, random generators, schedule, train state with its data
cursor), plus one metadata record (:class:`CheckpointMeta`: config, tokenizer, versions), in the guide's
flat format (docs/TRAINING.md): :data:`PART_KEYS` and :func:`train_state_to_file` map the parts to its
keys. A resume is validated here, once (:meth:`Checkpointer.restore`, after ``check_format``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sab_byon_omni.config import OPTIMIZERS, RunConfig
from sab_byon_omni.data.tokenizers import spec_equal
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.estimate import plural
from sab_byon_omni.files import dcp
from sab_byon_omni.files.atomic import atomic_write_text, check_own, missing_folders, remove_entry, remove_stale_temps
from sab_byon_omni.files.checkpoint import FORMAT, finite_float, load_checkpoint, save_checkpoint
from sab_byon_omni.files.lock import LOCK_FILE, FolderLock
from sab_byon_omni.files.untrusted import is_count
from sab_byon_omni.training import distributed as D
from sab_byon_omni.training.metrics import METRICS_FILE
from sab_byon_omni.training.optim import check_loaded_state

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the run's resolved config: `sab-omni train --config <folder>/config.yaml` continues it
FOLDER_START = frozenset({LOCK_FILE, CONFIG_FILE, METRICS_FILE})  # what every run writes before its first checkpoint
_NAME = re.compile(r"^(step|epoch)_(\d+)(\.pt|\.dcp)$")
_warned: set[tuple[str, int]] = set()  # (file, mtime): each damaged file is reported once per process

# The parts of a run with state, and the key of the file that holds each one's state_dict(). The
# train state fills the guide's ``epoch`` and ``global_step``, and ``data_state``, ``history`` and
# ``best_val_loss`` (train_state_to_file). Under FSDP the model and the optimizer are in the shards.
PART_KEYS = {"model": "model_state_dict", "optimizer": "optimizer_state_dict", "scaler": "scaler_state_dict",
             "rng": "rng_state", "schedule": "scheduler_state_dict"}
IN_SHARDS = ("model", "optimizer")
# Model settings a resume may change: the label, the context, regularisation, memory plan, an initialisation,
# and (only before the tokenizer sets it) the vocabulary. Any other difference runs the weights as another model.
RESUME_MAY_CHANGE = frozenset({"preset", "max_seq_len", "dropout", "activation_checkpointing", "zero_init_proj"})
_LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError)


@dataclass(frozen=True)
class Entry:
    """A loadable checkpoint and where it ranks."""

    path: Path
    global_step: int
    is_epoch: bool
    mtime: int

    @property
    def rank(self) -> tuple[int, bool, int]:
        return self.global_step, self.is_epoch, self.mtime


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself beside its parts' state: the run's config (a plain dict),
    its tokenizer's spec, and the versions: the file format (tagged by
    :func:`~sab_byon_omni.files.checkpoint.save_checkpoint`) and the PyTorch that wrote it."""

    config: dict[str, Any]
    tokenizer: dict[str, Any] | None = None
    torch_version: str = str(torch.__version__)
    format: str = FORMAT

    def to_file(self) -> dict[str, Any]:
        return {"config": self.config, "tokenizer": self.tokenizer, "torch_version": self.torch_version}

    @classmethod
    def of(cls, ck: dict[str, Any]) -> "CheckpointMeta":
        """The record of a checkpoint dict that passed ``check_format`` (what an older file lacks is None or "")."""
        spec, version = ck.get("tokenizer"), ck.get("torch_version")
        return cls(ck["config"], spec if isinstance(spec, dict) else None, version if isinstance(version, str) else "",
                   ck.get("format", FORMAT))


# ------------------------------------------------------------------------------- validation
def train_state_to_file(state: dict[str, Any], world: int) -> dict[str, Any]:
    """The file's keys for a train state (``TrainState.state_dict()``) of a run of ``world`` processes."""
    return {
        "epoch": state["epoch"], "global_step": state["global_step"], "best_val_loss": state["best_val_loss"],
        "data_state": {"epoch": state["epoch"], "cursor": state["cursor"], "world_size": world,
                       "epoch_loss_sum": float(state["epoch_loss_sum"]), "epoch_tokens": int(state["epoch_tokens"]),
                       **{k: state[k] for k in ("skipped_steps", "skipped_in_a_row", "log_tokens", "log_steps")},
                       "log_loss_sum": float(state["log_loss_sum"])},
        "history": {"train_loss": list(state["train_losses"]), "val_loss": list(state["val_losses"])},
    }


def read_train_state(ck: dict[str, Any], source: str, epoch_size: int) -> dict[str, Any]:
    """The train state a checkpoint dict holds (one that passed ``check_format``, which checked
    ``epoch`` and ``global_step``), validated: a field of the wrong type or out of range is a
    SabError, and so is a data cursor past the end of an epoch of this run's data (``epoch_size``
    samples). What an older file lacks reads as a fresh state's."""
    data = ck.get("data_state", {"epoch": ck["epoch"], "cursor": 0})
    hist = ck.get("history", {})
    if not isinstance(data, dict) or not isinstance(hist, dict):
        raise SabError(f"{source}: data_state/history must be mappings (damaged checkpoint?)")
    counts = {name: _count(data.get(name, default), f"data_state.{name}", source) for name, default in (
        ("epoch", ck["epoch"]), ("cursor", 0), ("epoch_tokens", 0), ("skipped_steps", 0), ("skipped_in_a_row", 0),
        ("log_tokens", 0), ("log_steps", 0))}
    if counts["cursor"] > epoch_size:
        raise SabError(f"{source}: its data cursor ({counts['cursor']:,}) is past the end of an epoch of this run's "
                       f"data ({epoch_size:,} samples): was it trained on other data or settings?")
    return {**counts, "global_step": ck["global_step"], "best_val_loss": finite_float(ck.get("best_val_loss")),
            **{k: finite_float(data.get(k, 0.0), 0.0) for k in ("epoch_loss_sum", "log_loss_sum")},
            "train_losses": _losses(hist.get("train_loss", []), source),
            "val_losses": _losses(hist.get("val_loss", []), source)}


def _count(value: Any, name: str, source: str) -> int:
    if not is_count(value):
        raise SabError(f"{source}: {name}={bounded(value)} is not a count (damaged checkpoint?)")
    return value


def _losses(values: Any, source: str) -> list[float]:
    if not isinstance(values, list) or len(values) > 100_000:
        raise SabError(f"{source}: history must be a list of losses (damaged checkpoint?)")
    return [finite_float(v, math.nan) for v in values]


def check_compatible(meta: CheckpointMeta, cfg: RunConfig, tokenizer: dict[str, Any], path: Path) -> None:
    """A checkpoint this run can continue: the same architecture, optimizer and tokenizer."""
    again = f"resume with the run's own settings: --config {path.parent / CONFIG_FILE}"
    if differ := cfg.model.differences(meta.config.get("model"), RESUME_MAY_CHANGE):
        said = ", ".join(f"{k}={bounded(theirs)} (this run: {bounded(ours)})" for k, theirs, ours in differ[:4])
        raise SabError(f"{path}: its model ({said}) differs from this run's; {again}")
    saved = meta.config.get("train", {})
    theirs_opt = saved.get("optimizer", "adamw") if isinstance(saved, dict) else "adamw"
    if theirs_opt != cfg.train.optimizer:
        other = f"resume with --optimizer {theirs_opt}, or " if theirs_opt in OPTIMIZERS else ""
        raise SabError(f"{path}: it was trained with optimizer {bounded(theirs_opt)}, this run asks for "
                       f"{bounded(cfg.train.optimizer)}; {other}start a new run from its weights with "
                       f"--init_from {path}")
    check_same_data(meta, cfg, path)
    if (was := _lora(saved)) != (now := _lora(cfg.to_dict()["train"])):
        raise SabError(f"{path}: it was trained with {was}, this run asks for {now}; {again}")
    if meta.tokenizer is not None and not spec_equal(meta.tokenizer, tokenizer):
        raise SabError(f"{path}: its tokenizer ({meta.tokenizer.get('name')}) differs from this run's "
                       f"({tokenizer.get('name')}); {again}")


def check_same_data(meta: CheckpointMeta, cfg: RunConfig, path: Path) -> None:
    """A run continues on the data it began with (its cursor counts that corpus); other data is a new run."""
    saved = meta.config.get("data")
    theirs = saved.get("dataset") if isinstance(saved, dict) else None
    mine = cfg.data.dataset
    if not isinstance(theirs, str) or theirs == mine or os.path.realpath(theirs) == os.path.realpath(mine):
        return
    theirs = theirs if len(theirs) <= 500 and theirs.isprintable() else bounded(theirs)  # from a file: bounded
    raise SabError(f"{path}: the run was trained on --data {theirs}, this command gives --data "
                   f"{mine}; resume it with --data {theirs}, or train on the new data from its "
                   f"weights as a new run: --init_from {path} --checkpoint_dir <another folder> (a fresh "
                   "optimizer and schedule)")
def _lora(train: Any) -> str:
    """A run's LoRA settings in words, from its config's train section (what a resume must match)."""
    rank = train.get("lora_rank", 0) if isinstance(train, dict) else 0
    return (f"LoRA rank {bounded(rank)}, alpha {bounded(train.get('lora_alpha'))}, on "
            f"{bounded(train.get('lora_targets'))}" if rank else "no LoRA")


class Checkpointer:
    """Checkpoints of one run folder. ``sharded``: FSDP ``.dcp`` folders instead of ``.pt`` files.
    Only the main process writes single files; every process takes part in a sharded save."""

    def __init__(self, directory: str | Path, *, info: D.DistInfo = D.DistInfo(), sharded: bool = False,
                 keep_last: int = 3) -> None:
        self.dir, self.info, self.is_main, self.sharded = Path(directory), info, info.is_main, sharded
        self.keep_last = keep_last
        self.suffix = dcp.SUFFIX if sharded else ".pt"
        self.created = not self.dir.exists()  # by this run: removed again if it fails before a save (release)
        self._made = missing_folders(self.dir)  # it and its missing parents, deepest first: what make_dir creates
        self._lock = FolderLock(self.dir)
        self._damaged: set[Path] = set()  # failed their checksum when read in full: never ranked, never pruned

    # ------------------------------------------------------------------------------- finding
    def path(self, name: str) -> Path:
        return self.dir / f"{name}{self.suffix}"

    def existing(self) -> list[Path]:
        """Every checkpoint-like entry of the folder (none while it is missing: rank 0 may be probing it)."""
        try:
            return sorted(p for p in self.dir.iterdir() if _NAME.match(p.name) or p.stem == "best_model")
        except (FileNotFoundError, NotADirectoryError):
            return []

    def refuse_existing(self) -> None:
        """A new run (``resume: none``) never writes into a folder that already holds a run."""
        existing = self.existing()
        if existing:
            raise SabError(f"{self.dir} already holds checkpoints ({existing[-1].name}); pass --resume auto "
                           "to continue that run, or choose another --checkpoint_dir")

    def entries(self) -> list[Entry]:
        """The loadable step/epoch checkpoints of this run's kind, best resume candidate last."""
        found = []
        for p in self.existing():
            m = _NAME.match(p.name)
            if not m or m.group(3) != self.suffix or p in self._damaged:
                continue
            try:
                meta = dcp.read_meta(p) if self.sharded else load_checkpoint(p, mmap=True)
                found.append(Entry(p, meta["global_step"], m.group(1) == "epoch", p.stat().st_mtime_ns))
            except (SabError, OSError) as e:
                _warn_once(p, f"skipping {first_line(e)}")
        return sorted(found, key=lambda e: e.rank)

    def latest(self) -> Path | None:
        """The loadable checkpoint with the highest global step (its tensors not checked)."""
        entries = self.entries()
        return entries[-1].path if entries else None

    def read_newest(self) -> tuple[Path, dict[str, Any]] | None:
        """What ``--resume auto`` resumes from: the newest loadable checkpoint whose tensors match
        their checksum, and its dict. One that does not is reported, skipped and remembered as
        damaged, so that pruning leaves it alone."""
        for entry in reversed(self.entries()):
            try:
                return entry.path, self.read(entry.path)
            except SabError as e:
                self._damaged.add(entry.path)
                _warn_once(entry.path, f"skipping {first_line(e)}")
        return None

    def newer_than(self, step: int) -> list[Entry]:
        return [e for e in self.entries() if e.global_step > step]

    def resume_point(self, resume: str, verify: bool = True) -> tuple[Path, dict[str, Any]] | None:
        """The one rule for the checkpoint a run continues from (``train.resume``), with its dict:
        ``none``, a new run (a folder that already holds checkpoints is refused); ``auto``, the
        loadable checkpoint of this run's kind with the highest global step, or a new run; a path,
        that checkpoint. ``verify``: check its tensors against their checksum, for ``auto`` falling
        back to the next newest (what resuming does); without, read its metadata only (cheap)."""
        if resume == "none":
            self.refuse_existing()
            return None
        if resume == "auto":
            if verify:
                found = self.read_newest()
            else:
                latest = self.latest()
                found = (latest, self.read_meta(latest)) if latest is not None else None
            if found is None:
                self._refuse_other_kind()
            return found
        path = Path(resume)
        if self.sharded and not dcp.is_sharded(path):
            raise SabError(f"train.resume={resume}: an FSDP run resumes from a sharded checkpoint directory "
                           "(*.dcp); resume this single-file checkpoint with --parallel ddp")
        return path, (self.read(path) if verify else self.read_meta(path))  # fails early, with the file named

    def _refuse_other_kind(self) -> None:
        """``auto`` found none of this run's kind: a folder of the other kind's is an error, not a new run."""
        other = [p for p in self.existing() if p.suffix in (".pt", dcp.SUFFIX) and p.suffix != self.suffix]
        if other:  # a best_model of the other kind is a run there too: a new run would drop its metrics
            kind = "sharded (FSDP)" if self.suffix == ".pt" else "single-file"
            how = "--parallel fsdp under torchrun, or sab-omni consolidate" if self.suffix == ".pt" else "--parallel ddp"
            raise SabError(f"{self.dir} holds only {kind} checkpoints ({other[-1].name}); resume them with {how}")

    # ------------------------------------------------------------------------------- the folder
    def lock(self) -> None:
        """One run per folder (the main process locks it for all): a lock that the OS drops when the
        process dies and that deleting ``.lock`` does not release (files/lock.py)."""
        if not self.is_main or self._lock.held:
            return
        self.make_dir()
        holder = self._lock.acquire()
        if holder is not None:
            raise SabError(f"{self.dir} is in use by another training run (pid {holder}); wait for it to finish, "
                           "stop it, or choose another --checkpoint_dir")

    def unlock(self) -> None:
        self._lock.release()

    def make_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SabError(f"cannot create train.checkpoint_dir {self.dir}: {e.strerror or e}") from None

    def clean(self) -> None:
        """Remove what an interrupted save left behind (temporary files and folders only)."""
        if self.is_main:
            remove_stale_temps(self.dir)

    def set_aside(self, entries: list[Entry], why: str, copies: tuple[Path, ...] = ()) -> Path | None:
        """Move checkpoints (never delete them) into a new folder ``rewound-<time>/`` so that
        ``--resume auto`` no longer prefers them; ``copies`` (the metrics of the abandoned branch)
        are copied there as they are now."""
        if not entries or not self.is_main:
            return None
        for p in copies:  # before anything moves: a link there is refused, never read through
            check_own(p, p.name)
        stamp, n = time.strftime("rewound-%Y%m%d-%H%M%S"), 1
        while True:  # a new folder, even for two rewinds in one second
            dest = self.dir / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                dest.mkdir()
                break
            except FileExistsError:
                n += 1
        for p in copies:
            if p.is_file():
                shutil.copy2(p, dest / p.name, follow_symlinks=False)
        for e in entries:
            os.replace(e.path, dest / e.path.name)
        log.warning("moved %s (%s) to %s: %s", plural(len(entries), "newer checkpoint"),
                    ", ".join(e.path.name for e in entries), dest, why)
        return dest

    def write_config(self, cfg: RunConfig) -> None:
        """``config.yaml``: the run's resolved config, with ``resume: auto`` (what continues it)."""
        if not self.is_main:
            return
        raw = cfg.to_dict()
        text = (f"# The resolved configuration of this run. `sab-omni train --config {self.dir / CONFIG_FILE}` "
                "continues it.\n" + yaml.safe_dump({**raw, "train": {**raw["train"], "resume": "auto"}}, sort_keys=False))
        atomic_write_text(self.dir / CONFIG_FILE, text, what="config")

    def release(self, failed: bool = False) -> None:
        """Release the folder lock; after a failure, first remove what this run created
        (:meth:`remove_if_unused`)."""
        if failed:
            self.remove_if_unused()
        self.unlock()

    def remove_if_unused(self) -> None:
        """Remove the folder if this run created it and wrote nothing in it but what every run writes
        at its start (:data:`FOLDER_START`: no checkpoint, no save in progress), and then each parent
        folder that this run created and that is empty. Nothing else: a folder that held anything
        before, or that another process wrote into, stays. Called after a failure, and by the
        watchdog before a second Ctrl-C ends the process (any thread)."""
        if not (self.created and self.is_main):
            return
        try:
            if {p.name for p in self.dir.iterdir()} <= FOLDER_START:
                shutil.rmtree(self.dir, ignore_errors=True)
        except OSError:
            pass
        for folder in self._made[1:]:  # parents, deepest first; rmdir removes only an empty one
            try:
                folder.rmdir()
            except OSError:
                break

    # ------------------------------------------------------------------------------- saving
    def save(self, name: str, parts: Mapping[str, Any], meta: CheckpointMeta, loss: float,
             val_loss: float | None = None) -> Path:
        """Write checkpoint ``name`` (``step_12``, ``epoch_1``, ``best_model``) of ``parts`` (see
        :meth:`payload`) with ``meta`` and this save's ``loss`` and ``val_loss``. Every process calls it."""
        path = self.path(name)
        payload = self.payload(parts, meta, loss, val_loss)
        if self.sharded:
            dcp.save(path, parts["model"], parts["optimizer"], payload, self.is_main, self._barrier)
        else:
            if self.is_main:
                save_checkpoint(payload, path)
            self._barrier()
        if name.startswith("step_"):
            self.prune(payload["global_step"])
        return path

    def payload(self, parts: Mapping[str, Any], meta: CheckpointMeta, loss: float,
                val_loss: float | None = None) -> dict[str, Any]:
        """The checkpoint dict: each part's ``state_dict()`` under its key (``parts`` by the names of
        :data:`PART_KEYS`, and ``train_state``, in the guide's keys), under torchrun every rank's
        random state as well (a collective), the metadata, ``loss`` and ``val_loss``. Under FSDP the
        model and the optimizer are left out: they go to the shards."""
        ck = {key: parts[name].state_dict() for name, key in PART_KEYS.items()
              if not (self.sharded and name in IN_SHARDS)}
        if self.info.enabled:
            ck["rng_state_by_rank"] = D.all_gather_object(ck["rng_state"], self.info)
        ck.update(train_state_to_file(parts["train_state"].state_dict(), self.info.world))
        return {**ck, **meta.to_file(), "loss": loss, "val_loss": val_loss}

    def _barrier(self) -> None:
        D.barrier(self.info)

    def prune(self, upto: int) -> list[Path]:
        """Keep the newest ``keep_last`` loadable step checkpoints up to step ``upto`` (the one just
        saved) and delete older ones; never the newest loadable checkpoint of any kind up to there
        (the resume point), never a file past ``upto`` (not this run's: damaged, or another branch),
        never a damaged file, never an epoch or best checkpoint."""
        if not self.is_main:
            return []
        entries = [e for e in self.entries() if e.global_step <= upto]
        keep = {e.path for e in entries[-1:]}
        steps = [e for e in entries if not e.is_epoch]
        keep |= {e.path for e in steps[max(len(steps) - self.keep_last, 0):]} if self.keep_last else set()
        removed = [e.path for e in steps if e.path not in keep]
        for p in removed:
            remove_entry(p)
        return removed

    # ------------------------------------------------------------------------------- loading
    def restore(self, path: Path, ck: dict[str, Any], parts: Mapping[str, Any], cfg: RunConfig,
                tokenizer: dict[str, Any], epoch_size: int) -> None:
        """Continue from checkpoint ``ck`` (read from ``path`` by :meth:`resume_point`, its format
        and tensors checked): validate it against this run, once (architecture, optimizer and
        tokenizer; the train state's values, ``epoch_size`` samples in an epoch of this run's data),
        then load every part of ``parts`` from it. Anything that does not fit is a SabError naming
        the file, before the run writes anything."""
        check_compatible(CheckpointMeta.of(ck), cfg, tokenizer, path)
        state = read_train_state(ck, str(path), epoch_size)
        if not self.is_main:  # the epoch's sums are global: the main process carries them
            state["epoch_loss_sum"], state["epoch_tokens"], state["log_loss_sum"], state["log_tokens"] = 0.0, 0, 0.0, 0
        optimizer = parts["optimizer"]
        built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            if self._load_weights(path, ck, parts["model"], optimizer):
                check_loaded_state(optimizer, built)
            if ck.get("scaler_state_dict"):
                parts["scaler"].load_state_dict(ck["scaler_state_dict"])
            if "rng_state" in ck:
                parts["rng"].load_state_dict(self._own_rng(ck))
        except _LOAD_ERRORS as e:
            raise SabError(f"{path}: cannot resume from it ({type(e).__name__}: {first_line(e)})") from None
        parts["train_state"].load_state_dict(state)
        self._note_schedule(ck.get("scheduler_state_dict"), parts["schedule"], cfg, path)

    def _load_weights(self, path: Path, ck: dict[str, Any], model: Any, optimizer: Any) -> bool:
        """The model's and the optimizer's state, from the shards or the file; False if the file holds
        no optimizer state (an export, a consolidated file: documented, the optimizer starts fresh)."""
        if dcp.is_sharded(path):  # DCP reshards: any number of processes, FSDP or not
            dcp.load(path, model, optimizer, no_dist=not self.info.enabled)
            return True
        model.load_state_dict(ck["model_state_dict"])
        if "optimizer_state_dict" not in ck:
            if self.is_main:
                log.warning("%s holds no optimizer state: the optimizer starts fresh from its weights", path)
            return False
        optimizer.load_state_dict(ck["optimizer_state_dict"])
        return True

    def _own_rng(self, ck: dict[str, Any]) -> Any:
        """The random state this rank saved, when the checkpoint holds one per rank of a run of the
        same size (``rng_state_by_rank``: each rank's generators move differently, e.g. dropout on
        batches of other lengths); else the main process's ``rng_state``."""
        per_rank = ck.get("rng_state_by_rank")
        if isinstance(per_rank, list) and len(per_rank) == self.info.world:
            return per_rank[self.info.rank]
        return ck["rng_state"]

    def _note_schedule(self, saved: Any, schedule: Any, cfg: RunConfig, path: Path) -> None:
        """Warn when the resumed run plans another length than the saved one (a cosine decay then
        follows the new plan from here on)."""
        schedule.load_state_dict(saved if isinstance(saved, dict) else {})
        planned = saved.get("total_steps") if isinstance(saved, dict) else None
        if planned not in (None, schedule.total_steps) and self.is_main and cfg.train.lr_schedule != "constant":
            log.warning("%s was planned for %s optimizer steps, this run for %s: the learning-rate schedule follows "
                        "the new plan from here on", path.name, planned, f"{schedule.total_steps:,}")

    def read(self, path: Path) -> dict[str, Any]:
        """The checkpoint dict at ``path``, its tensors checked against their checksum (for a sharded
        one, its meta: the shards load into a model). Mapped, not read into memory first."""
        return dcp.read_meta(path) if dcp.is_sharded(path) else load_checkpoint(path, mmap=True, verify_tensors=True)

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        """The checkpoint dict without reading or checking its tensors (cheap)."""
        return dcp.read_meta(path) if dcp.is_sharded(path) else load_checkpoint(path, mmap=True)


def _warn_once(path: Path, message: str) -> None:
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        key = (str(path), 0)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)
