"""The general training entry: from a config to a trained model (what ``sab-omni train`` runs), with
what it decides before the run is built: the from-scratch recipe for a fresh model on a corpus,
the tokenizer of the checkpoint a run resumes from, and the architecture of ``init_from`` weights."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sab_byon_omni.config import DataConfig, RunConfig, build_config, replace
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.batching import micro_steps_per_epoch
from sab_byon_omni.data.factory import load_datasets
from sab_byon_omni.data.tokenizers import BPETokenizer, Tokenizer, describe_tokenizer, from_spec, spec_equal
from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.atomic import check_can_create
from sab_byon_omni.model.lora import merge_lora
from sab_byon_omni.training import distributed as D
from sab_byon_omni.training.build import build_run, steps_per_epoch
from sab_byon_omni.training.checkpointer import (
    CONFIG_FILE,
    RESUME_MAY_CHANGE,
    Checkpointer,
    CheckpointMeta,
    check_same_data,
)
from sab_byon_omni.training.recipe import (
    FT_MAX_EPOCHS,
    RECIPE_FIELDS,
    architecture,
    batch_geometry,
    describe,
    evaluation_cadence,
    fine_tuning_recipe,
    optimizer_for,
    recipe_for_geometry,
)
from sab_byon_omni.training.trainer import Trainer, TrainResult

__all__ = ["run_training", "apply_recipe", "resume_tokenizer", "adopt_architecture", "new_model", "RECIPE_FIELDS"]

log = logging.getLogger(__name__)

def _validation_cost(t: Any, explicit: set[str], val_windows: int | None, batch: int, world: int) -> int | None:
    """The batches one validation takes in each process (which validates its own share): the whole
    validation set, or your ``eval_batches`` when smaller; None when neither is known."""
    whole = micro_steps_per_epoch(val_windows, batch, world) if val_windows else None
    return min((n for n in (whole, t.eval_batches if "eval_batches" in explicit else 0) if n), default=None)


def apply_recipe(cfg: RunConfig, windows: int, explicit: set[str], why: str,
                 val_windows: int = 0) -> tuple[RunConfig, list[tuple[str, str]]]:
    """``cfg`` with the recipe for a training set of ``windows`` samples (and a validation set of
    ``val_windows``) in every train setting not in ``explicit`` (field names), and the banner lines
    that say so: the fine-tuning recipe when ``train.init_from`` names weights to start from (its
    LoRA rate with ``train.lora_rank``), else the from-scratch one. The from-scratch peak rate follows
    the final batch geometry, so a batch size you give moves the rule's rate with it."""
    tuning = bool(cfg.train.init_from)
    t, seq = cfg.train, cfg.data.seq_len
    batch, accum, epochs, _, reasons = batch_geometry(windows * (seq - 1) + 1, seq)
    world = D.launch_info().world
    if world > 1:  # the recipe counts samples per optimizer step over all processes
        batch, accum = (batch, -(-accum // world)) if accum >= world else (max(1, -(-batch * accum // world)), 1)
    pick = lambda name, ours: getattr(t, name) if name in explicit else ours  # noqa: E731
    if tuning and epochs > FT_MAX_EPOCHS:  # (a pretrained model memorises a small corpus in a few passes)
        reasons = [r for r in reasons if "epochs, so the run takes" not in r]
        reasons, epochs = reasons + [f"{FT_MAX_EPOCHS} epochs at most: a pretrained model memorises a small corpus "
                                     "in a few passes"], FT_MAX_EPOCHS
    batch, accum, epochs = pick("batch_size", batch), pick("gradient_accumulation_steps", accum), pick("epochs", epochs)
    per_epoch = steps_per_epoch(windows, batch, accum, world)  # as the run counts them
    epochs, more = _epochs_for_max_steps(t, explicit, per_epoch, epochs, tuning)
    total = min(t.max_steps, per_epoch * epochs) if t.max_steps else per_epoch * epochs
    geometry_given = {"batch_size", "gradient_accumulation_steps", "epochs"} & explicit
    reasons = ([] if geometry_given or more else reasons) + more
    if total < per_epoch * epochs:  # the schedule and the validations follow the steps the run will take
        reasons.append(f"train.max_steps={t.max_steps:,} stops the run after {total:,} of {per_epoch * epochs:,} "
                       f"steps ({per_epoch:,} per epoch x {epochs}): the schedule and validations are planned "
                       f"for {total:,}")
    final = (fine_tuning_recipe(cfg.model, seq, batch, accum * world, epochs, total, bool(cfg.train.lora_rank))
             if tuning else recipe_for_geometry(cfg.model, seq, batch, accum * world, epochs, total))  # all processes
    interval, batches = evaluation_cadence(total, accum, epochs, _validation_cost(t, explicit, val_windows, batch, world))
    final = dataclasses.replace(final, gradient_accumulation_steps=accum, eval_interval=interval, eval_batches=batches)
    changes = {k: v for k, v in final.train_overrides().items() if k.split(".", 1)[1] not in explicit}
    if "learning_rate" in explicit and "optimizer" not in explicit:  # your rate means what it always meant
        changes["train.optimizer"] = "adamw"
    if "optimizer" not in explicit and changes.get("train.optimizer") == "muon":
        changes["train.optimizer"], why_not = _instead_of_muon(t)
        reasons += [why_not] if why_not else []
    reasons += _unused_muon_flags(explicit, changes.get("train.optimizer", t.optimizer))
    model, model_lines = ({}, []) if tuning else architecture(cfg.model, explicit)  # a fresh model's levers
    out = replace(cfg, **changes, **{f"model.{k}": v for k, v in model.items()})
    yours = sorted({k for k in explicit if k in RECIPE_FIELDS})
    what = (f"fine-tuning{' with LoRA' if cfg.train.lora_rank else ''}, for pretrained weights (--init_from "
            f"and {why}" if tuning else f"from scratch, for this corpus ({why}")
    lines = [("recipe", f"{what} without a config file" + (f"; yours: {', '.join(yours)}" if yours else "")
              + f"; {'docs/FINETUNE.md' if tuning else 'docs/RECIPES.md'})")]
    described = describe(out.train, cfg.model, batch * accum * world * seq, frozenset(explicit), total, tuning)
    lines += [("", reason) for reason in reasons + described + model_lines]
    return out, lines


def check_document_mask(mask_id: int | None, tokenizer: Tokenizer) -> None:
    """``model.document_mask_id`` must be the id that ends each document of the packed data: the
    tokenizer's ``<EOS>`` (any other id would cut attention at an ordinary token: a space, a letter)."""
    eos = getattr(tokenizer, "eos_id", None)
    if mask_id is not None and mask_id != eos:
        raise SabError(f"model.document_mask_id={mask_id} is not the id that ends the documents: the {tokenizer.name} "
                       + (f"tokenizer's <EOS> is {eos}; use --document_mask_id {eos}" if eos is not None else
                          "tokenizer has no <EOS> (use --tokenizer byte or bpe, whose documents end with one)"))


def _unused_muon_flags(explicit: set[str], optimizer: str) -> list[str]:
    """A banner line for Muon settings you gave to a run without Muon (they would do nothing, silently)."""
    unused = sorted(k for k in explicit if k.startswith("muon_")) if optimizer != "muon" else []
    return [f"{', '.join('--' + k for k in unused)}: no effect, this run has no Muon (AdamW for every parameter)"
            ] if unused else []


def _instead_of_muon(t: Any) -> tuple[str, str | None]:
    """The optimizer the recipe's Muon becomes for this run, and why (None: it stays Muon)."""
    # --parallel fsdp asked for counts even in one process (where FSDP is not used), as the build refuses Muon there
    optimizer, why_not_muon = optimizer_for(t.parallel == "fsdp" or D.uses_fsdp(t.parallel, D.launch_info()))
    if why_not_muon:
        return optimizer, why_not_muon
    if t.lora_rank:  # Muon orthogonalises whole matrices; LoRA trains low-rank factors
        return "adamw", "AdamW for everything: --lora_rank trains low-rank adapters, which Muon does not update"
    return "muon", None


def _epochs_for_max_steps(t: Any, explicit: set[str], per_epoch: int, epochs: int,
                          tuning: bool) -> tuple[int, list[str]]:
    """(epochs, banner lines): a ``--max_steps`` you gave beyond the recipe's epochs wins over them (a
    400-step LoRA run otherwise stopped at the end of the recipe's 3 epochs, its schedule undone)."""
    if "max_steps" not in explicit or "epochs" in explicit or t.max_steps <= per_epoch * epochs:
        return epochs, []
    epochs = -(-t.max_steps // per_epoch)
    return epochs, [f"{epochs} epochs, for the train.max_steps={t.max_steps:,} you gave ({per_epoch:,} steps per epoch)"
                    + ("; a pretrained model may memorise a small corpus over many passes: watch the validation "
                       "loss" if tuning else "")]


def run_training(cfg: RunConfig, notes: list[tuple[str, str]] | None = None,
                 resume_hint: str = "continue with --resume auto",
                 recipe: set[str] | None = None) -> tuple[SABTranscendentV2, TrainResult]:
    """Build tokenizer, data and model from ``cfg`` and train (what ``sab-omni train`` runs).

    ``recipe``: apply the from-scratch recipe to a fresh model, except to the train settings named
    in it (the ones the user gave); ignored for a run that starts from ``init_from`` weights."""
    notes = list(notes or [])
    if D.launch_info().is_main:  # before the corpus is read and its cache written: the only line is the error
        check_can_create(cfg.train.checkpoint_dir, "train.checkpoint_dir")
    if cfg.train.resume == "none":
        Checkpointer(cfg.train.checkpoint_dir).refuse_existing()
    cfg, resume_tok = resume_tokenizer(cfg)
    init = None
    if cfg.train.init_from and resume_tok is None:  # a checkpoint to resume from takes precedence
        init = SABTranscendentV2.load(cfg.train.init_from)
        cfg = adopt_architecture(cfg, init)
        notes.append(("weights", f"from {init.origin}: its model and tokenizer; a fresh optimizer and schedule"))
    tokenizer, train, val = load_datasets(cfg.data, init.tokenizer if init else resume_tok)
    check_document_mask(cfg.model.document_mask_id, tokenizer)
    if recipe is not None:  # from scratch, or fine-tuning init_from's weights (on resume too: the same plan)
        cfg, lines = apply_recipe(cfg, len(train), recipe, "--data", len(val) if val is not None else 0)
        notes = lines + notes
    if cfg.train.lora_rank and not cfg.train.init_from:
        log.warning("train.lora_rank=%d without --init_from: the frozen weights are a fresh model's, random; "
                    "LoRA adapts pretrained weights (docs/FINETUNE.md)", cfg.train.lora_rank)
    # weights to start from need a whole model; else, under FSDP, one built on the meta device
    sab = SABTranscendentV2(config=cfg, tokenizer=tokenizer) if init is not None else new_model(cfg, tokenizer)
    if init is not None:
        sab.model.load_state_dict(init.model.state_dict())
    run = build_run(sab.model, tokenizer, train, val, sab.config)
    result = Trainer(run, notes=notes, resume_hint=resume_hint).fit()
    merge_lora(sab.model)  # the model handed back is the base architecture (its checkpoints keep the adapters)
    return sab, result


def new_model(cfg: RunConfig, tokenizer: Tokenizer) -> SABTranscendentV2:
    """A fresh model for ``cfg``. Under torchrun with ``parallel: fsdp`` it is built on the meta
    device (shapes only): the trainer shards it, then each rank allocates and initialises only its
    own shards, to the values of a normal build with the same seed."""
    fsdp = D.uses_fsdp(cfg.train.parallel, D.launch_info())
    return SABTranscendentV2(config=cfg, tokenizer=tokenizer, device="meta" if fsdp else None)


def adopt_architecture(cfg: RunConfig, init: SABTranscendentV2) -> RunConfig:
    """``cfg`` with the model section and tokenizer of ``init`` (what its weights need); the run
    keeps its own dropout and activation checkpointing, and its sequence length (rotary positions
    extend to a longer one)."""
    model = {**init.config.to_dict()["model"], "dropout": cfg.model.dropout,
             "activation_checkpointing": cfg.model.activation_checkpointing}
    model["max_seq_len"] = max(model["max_seq_len"], cfg.data.seq_len)
    raw = cfg.to_dict()
    raw["model"] = model
    raw["data"] = {**raw["data"], "tokenizer": init.tokenizer.name, "tokenizer_path": None}
    return build_config(raw, source="init_from")


def _checkpoint_architecture(cfg: RunConfig, saved: dict) -> RunConfig:
    """``cfg`` with the model section of the checkpoint's config ``saved`` (a run that began from
    ``init_from`` weights took its architecture from them; resumed, it reads it from its checkpoint),
    keeping this run's dropout and activation checkpointing, as :func:`adopt_architecture` does."""
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict):
        return cfg
    raw = cfg.to_dict()
    raw["model"] = {**model, "dropout": cfg.model.dropout, "activation_checkpointing": cfg.model.activation_checkpointing}
    return build_config(raw, source="the checkpoint's config")


def check_same_architecture(saved: Any, cfg: RunConfig, path: Any) -> None:
    """Refuse, before the corpus is read, a resume whose model settings differ from the checkpoint's
    in anything but :data:`RESUME_MAY_CHANGE`: with equal weight shapes (``--mlp relu2`` for a GELU run,
    ``--logit_softcap``, ``--norm``) the weights would load and silently train as another model
    (:func:`~sab_byon_omni.training.checkpointer.check_compatible` checks the same when it loads them)."""
    differ = cfg.model.differences(saved.get("model") if isinstance(saved, dict) else None,
                                   RESUME_MAY_CHANGE | {"vocab_size"})  # (set from the tokenizer later)
    if differ:
        said = ", ".join(f"{k}={bounded(theirs)} (this command: {bounded(ours)})" for k, theirs, ours in differ[:4])
        raise SabError(f"{path}: the run was trained with {said}; a resume keeps the model it trained: give its "
                       "settings or none (train --resume auto --checkpoint_dir with no --data continues with the run's "
                       "config.yaml), or start a new run in another --checkpoint_dir")


def resume_tokenizer(cfg: RunConfig) -> tuple[RunConfig, Tokenizer | None]:
    """The tokenizer of the checkpoint this run resumes from (and ``cfg`` naming it), so that the
    data is tokenised the way the run began: no BPE retrained, no cache rebuilt with other settings.

    The rule: the checkpoint's tokenizer is adopted when the run asks for the same kind, or for
    nothing beyond the default (char96, no file); a different one is adopted with a logged notice.
    A run that names another tokenizer (``--tokenizer byte`` for a char96 run, a ``--tokenizer_path``
    holding another vocabulary) is refused: its own config.yaml continues it."""
    info = D.launch_info()
    ck = Checkpointer(cfg.train.checkpoint_dir, info=info, sharded=D.uses_fsdp(cfg.train.parallel, info))
    try:
        point = ck.resume_point(cfg.train.resume, verify=False)  # the rule the run will follow, read cheaply
        spec = CheckpointMeta.of(point[1]).tokenizer if point is not None else None
        theirs = from_spec(spec) if spec is not None else None
        if theirs is not None and cfg.train.init_from:  # init_from's architecture, as the run began with it
            cfg = _checkpoint_architecture(cfg, CheckpointMeta.of(point[1]).config)
    except SabError:
        if cfg.train.resume not in ("auto", "none"):  # a file named: refused now, before anything is written
            raise
        return cfg, None  # the run reads it again, under the folder's lock, and says what is wrong
    if theirs is None:
        if point is not None and not cfg.train.init_from:
            check_same_architecture(CheckpointMeta.of(point[1]).config, cfg, point[0])
        return cfg, None
    path = point[0]
    check_same_data(CheckpointMeta.of(point[1]), cfg, path)  # before the corpus is read
    if not cfg.train.init_from:
        check_same_architecture(CheckpointMeta.of(point[1]).config, cfg, path)
    d = cfg.data
    if d.tokenizer_path:
        mine = BPETokenizer.load(d.tokenizer_path) if d.tokenizer == BPETokenizer.name else None
        differs = mine is None or not spec_equal(mine.to_spec(), theirs.to_spec())
    else:
        differs = d.tokenizer not in (theirs.name, DataConfig().tokenizer)
    if differs:
        asked = f"{d.tokenizer} from {d.tokenizer_path}" if d.tokenizer_path else d.tokenizer
        raise SabError(f"{path}: the run resumes with its own tokenizer ({describe_tokenizer(spec)}), but this "
                       f"command asks for {asked}; continue it with --config {path.parent / CONFIG_FILE}, or start "
                       "a new run in another --checkpoint_dir")
    if theirs.name != d.tokenizer:
        log.warning("resuming %s with its tokenizer (%s); this command's default was %s", path, theirs.name,
                    d.tokenizer)
    return replace(cfg, tokenizer=theirs.name), theirs


