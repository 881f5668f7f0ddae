"""sab-omni train: train a model from a config file and command-line overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sab_byon_omni.commands.common import add_config_flags, check_paths_first, collect_overrides
from sab_byon_omni.config import load_config
from sab_byon_omni.errors import SabError

EXAMPLE = """examples:
  sab-omni train                                   # the guide's job: configs/default.yaml defaults
  sab-omni train --config lightweight              # a synthetic-data recipe that learns in one epoch
  sab-omni train --preset tiny --epochs 1 --num_samples 200 --checkpoint_dir /tmp/ckpt
  sab-omni train --data ~/notes --preset small     # your files, with the from-scratch recipe
  sab-omni train --data ~/notes --preset small --resume auto
  sab-omni train --init_from model.gguf --data ~/notes                 # fine-tune pretrained weights
  sab-omni train --init_from model.gguf --data ~/notes --lora_rank 8  # LoRA adapters, the rest frozen

--data without --config trains with the from-scratch recipe (peak rate by model width, warmup +
cosine, batches sized for the corpus; docs/RECIPES.md), or with --init_from the fine-tuning recipe
(AdamW at a swept low rate, short warmup, cosine; docs/FINETUNE.md); any flag you give wins. With
--config the file's settings apply as written.
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--config", metavar="FILE", help="YAML config (sectioned or flat guide keys); flags override it")
    p.add_argument("--data", dest="cfg:data.dataset", metavar="PATH", default=argparse.SUPPRESS,
                   help="train on your own files (a file, folder or glob) instead of the synthetic dataset")
    add_config_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    overrides = collect_overrides(args)
    cfg = load_config(args.config, overrides)  # no torch yet: a bad flag, file or path fails at once
    if args.config is None and "data.dataset" not in overrides:  # resuming: the run's own settings, flags win
        if folder_config := resumed_config(cfg.train.resume, cfg.train.checkpoint_dir):
            args.config = str(folder_config)
            cfg = load_config(args.config, overrides)
    if cfg.train.init_from:
        refuse_architecture_flags(overrides)
    check_paths_first(source=cfg.train.init_from, data=cfg.data.dataset)
    from sab_byon_omni.training import launch
    from sab_byon_omni.training.distributed import launch_info, shutdown
    from sab_byon_omni.training.signals import EXIT_STOPPED

    recipe, notes = None, []  # the from-scratch recipe: own data, no config file; the flags given win
    if "data.dataset" in overrides and args.config is None:
        recipe = {key.rsplit(".", 1)[-1] for key in overrides}
    else:
        source = f"{args.config}, as written" if args.config else "the guide's defaults (configs/default.yaml)"
        given = ", ".join(f"--{key.rsplit('.', 1)[-1]}" for key in overrides)
        notes = [("recipe", source + (f", with {given}" if given else ""))]
    try:
        sab, result = launch.run_training(cfg, notes=notes, resume_hint="continue with --resume auto", recipe=recipe)
    finally:
        shutdown()  # leave the torchrun process group, if the run joined one
    code = EXIT_STOPPED if result.stopped_early else 0
    if launch_info().is_main:  # under torchrun, rank 0 reports for all
        for line in report(result, cfg.train.checkpoint_dir):
            print(line)
    if launch_info().world > 1:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a torchrun worker now that its files are closed and its lines written: the interpreter's
    own teardown of torch's distributed threads aborted a finished worker (SIGABRT) in one CI run in
    three, which torchrun reports as a failed job."""
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resumed_config(resume: str, checkpoint_dir: str) -> Path | None:
    """The config.yaml of the run that ``--resume`` continues (``auto``: the checkpoint_dir's; a
    checkpoint path: its folder's), when there is one: what data, model and schedule the run had."""
    if resume == "none":
        return None
    found = Path(checkpoint_dir if resume == "auto" else Path(resume).parent).expanduser() / "config.yaml"
    return found if found.is_file() else None


def report(result: Any, checkpoint_dir: str) -> list[str]:
    """The result lines on stdout (a stop's reason is in the log on stderr, not repeated here). A run
    that ended inside an epoch (--max_steps, a signal) has no epoch mean yet: its last logged loss
    and best validation loss stand in."""
    from sab_byon_omni.estimate import perplexity, plural

    trained = result.global_step - result.start_step
    if not trained and not result.stopped_early:
        return [f"nothing trained: the run is already at step {result.global_step:,} (see above)"]
    means = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
    train = means(result.train_losses) or "- (no epoch finished" + (
        f"; last logged loss {result.last_loss:.4f} at step {result.global_step:,})" if result.last_loss else ")")
    if result.val_losses:
        val = f"{means(result.val_losses)} (perplexity {perplexity(result.val_losses[-1]):.3f})"
    else:
        val = "-" + (f" (best validation loss {result.best_val_loss:.4f})" if result.best_val_loss is not None else "")
    names = ", ".join(p.rsplit("/", 1)[-1] for p in result.checkpoints) or "none new"
    return [f"checkpoints: {checkpoint_dir} ({names})", f"train loss per epoch: {train}",
            f"validation loss per epoch: {val}",
            f"{plural(trained, 'optimizer step')} in this run, "
            + ("stopped" if result.stopped_early else "ended") + f" at step {result.global_step:,}"
            + (f" ({plural(result.skipped_steps, 'step')} skipped for non-finite gradients, weights unchanged)"
               if result.skipped_steps else "") + "; "
            f"{result.tokens:,} tokens in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)"]


KEPT_WITH_INIT_FROM = {"model.dropout", "model.activation_checkpointing", "model.max_seq_len"}


def refuse_architecture_flags(overrides: dict) -> None:
    """With ``--init_from`` the pretrained weights bring their architecture and tokenizer: a flag that
    would change either is refused, not silently dropped."""
    ignored = sorted(k for k in overrides if (k.startswith("model.") and k not in KEPT_WITH_INIT_FROM)
                     or k in ("data.tokenizer", "data.tokenizer_path", "data.bpe_vocab_size"))
    if ignored:
        flags = ", ".join(f"--{k.split('.', 1)[1]}" for k in ignored)
        raise SabError(f"{flags} cannot apply with --init_from: the pretrained model brings its own architecture "
                       "and tokenizer (drop the flag; --dropout and --activation_checkpointing do apply)")
