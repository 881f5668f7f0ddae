"""The learning benchmark: how far a from-scratch recipe gets in a fixed budget, against Hugging Face
GPT-2 trained with nanoGPT's character-level recipe on the very same tokens.

    python benchmarks/learn.py                                  # both corpora, preset small, our rule
    python benchmarks/learn.py --corpus stdlib --preset tiny --lr 3e-3,1e-2 --models ours
    python benchmarks/learn.py --report benchmarks/learn_results.jsonl --plot docs/img/learn_sweep.png

Budget (default): 200 optimizer steps of 16 windows x 128 tokens (127 predictions each), byte
tokenizer. Both models see exactly the same windows in the same order: GPT-2 is fed the batches of
our Trainer's own ``epoch_batches(0)``. Validation bits per byte = summed loss in nats /
(ln 2 x bytes) over the same held-out windows for both, where the bytes are the byte-valued targets
(an ``<EOS>`` target costs loss but adds no byte, as in ``sab-omni eval``).

* Ours: ``SABTranscendentV2`` + ``Trainer`` with the rule (Muon + AdamW) of ``sab_byon_omni.training.recipe``
  for this geometry (``recipe_for_geometry``) unless ``--lr``/``--warmup``/... say otherwise.
* GPT-2: ``GPT2LMHeadModel`` from a local ``GPT2Config`` of the same width, heads, depth, FFN,
  vocabulary and context (learned positions, biases, dropout 0), trained like nanoGPT's
  ``config/train_shakespeare_char.py`` + ``train.py``: AdamW lr 1e-3, betas (0.9, 0.99), weight
  decay 0.1 on 2-D parameters only, ``lr * (it + 1) / (warmup + 1)`` warmup, cosine to
  min_lr = 1e-4 at the last step, gradient clipping 1.0, fp32.

Time to quality: both models are also scored on the validation windows every ``--eval-every`` steps
(with the clock stopped: the seconds reported are training seconds; evaluation time is reported
apart, ``eval_seconds``). ``--clock cpu`` counts this process's CPU seconds instead of wall seconds (on a shared machine).
Ours is credited with the training seconds at which it first reaches the
target, GPT-2's final validation loss at its step budget. ``--wall-budget`` adds a run of ours given
GPT-2's training seconds: trained until they are spent, its cosine planned to end at the budget (re-planned
after each step from its mean step time so far); its bits per byte there against GPT-2's. ``--arch``
trains ours once per model variant (e.g. ``--arch "base;qk_norm=true;mlp=relu2"``), each against the
one GPT-2 run of the corpus.

GPT-2 trains first, then each variant of ours; each run appends its JSON line to ``--results`` the
moment it finishes (a later crash loses none of them). Every option and variant is checked before
anything trains (bad input: one ``error:`` line, exit status 2). ``--report`` prints the tables and draws the plot
from such a file. Corpora: ``benchmarks/learn_corpora.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learn_corpora  # noqa: E402
from learn_args import learning_rates, parse, parse_arch  # noqa: E402
from learn_report import NANOGPT, arch_label, bench_table, load_rows, muon_fields, ns_fields, report, time_table  # noqa: E402

from sab_byon_omni.benchmark.peers import build_hf_gpt2  # noqa: E402
from sab_byon_omni.config import ModelConfig, RunConfig, TrainConfig, build_config  # noqa: E402
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2  # noqa: E402
from sab_byon_omni.data.batching import IGNORE_INDEX, Batch, collate  # noqa: E402
from sab_byon_omni.data.tokenizers import ByteTokenizer  # noqa: E402
from sab_byon_omni.errors import SabError, bounded  # noqa: E402
from sab_byon_omni.training.recipe import architecture, learns_slowly, recipe_for_geometry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}  # --arch names that are recipe settings
WALL_SPARE = 1.5  # a wall-budget run gets this many times its planned steps' batches, in case more fit


# ------------------------------------------------------------------------------------ our side
def our_config(args: argparse.Namespace, dataset: str, ckpt_dir: str) -> RunConfig:
    """The RunConfig for our model: the rule's recipe for this preset, with the benchmark's fixed
    budget (batch, steps, sequence) and any recipe flag given on the command line."""
    model = model_config(args)
    rule = recipe_for_geometry(model, args.seq_len, args.batch, 1, epochs=1, total_steps=args.steps)
    pick = lambda given, default: default if given is None else given  # noqa: E731
    train = dict(
        batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps, epochs=1,
        learning_rate=pick(args.lr_value, rule.learning_rate), warmup_steps=pick(args.warmup, rule.warmup_steps),
        lr_schedule=pick(args.schedule, rule.lr_schedule), min_lr_ratio=pick(args.min_lr_ratio, rule.min_lr_ratio),
        beta1=pick(args.beta1, rule.beta1), beta2=pick(args.beta2, rule.beta2), weight_decay=pick(args.weight_decay, rule.weight_decay),
        optimizer=pick(args.optimizer, rule.optimizer), muon_learning_rate=pick(args.muon_lr, rule.muon_learning_rate),
        muon_warmup_steps=pick(args.muon_warmup, rule.muon_warmup_steps),
        muon_ns_steps=pick(args.muon_ns_steps, TrainConfig.muon_ns_steps),
        muon_ns_coefficients=pick(args.muon_ns_coefficients, TrainConfig.muon_ns_coefficients),
        max_grad_norm=pick(args.clip, 1.0), precision=args.precision, device="cpu", seed=args.seed, progress=False,
        log_interval=20, checkpoint_dir=ckpt_dir, keep_last=1, check_memory=False)
    train.update(variant_fields(args)[1])  # a variant's recipe settings win
    data = dict(dataset=dataset, tokenizer="byte", seq_len=args.seq_len)
    model = {"preset": args.preset, "max_seq_len": args.seq_len, "vocab_size": ByteTokenizer.vocab_size,
             **shape_overrides(args), **our_arch(args)}  # the vocabulary known: token-id fields are checked here
    return build_config({"model": model, "data": data, "train": train})


def variant_fields(args: argparse.Namespace) -> tuple[dict, dict]:
    """The ``--arch`` variant's (model fields, train fields): a train setting (``muon_ns_steps=4``) in
    a variant changes ours' recipe, any other name is a model field."""
    train = {k: v for k, v in args.arch_value.items() if k in TRAIN_FIELDS}
    return {k: v for k, v in args.arch_value.items() if k not in train}, train


def our_arch(args: argparse.Namespace) -> dict:
    """Our model's fields beyond the preset: the recipe's architecture (``recipe.architecture``), then
    the ``--arch`` variant's fields, which win."""
    model, _ = variant_fields(args)
    return {**architecture(model_config(args), set(model))[0], **model}


def shape_overrides(args: argparse.Namespace) -> dict:
    """--hidden/--heads/--layers/--ffn given on the command line (both models get them)."""
    given = dict(hidden=args.hidden, n_heads=args.heads, n_layers=args.layers, ffn=args.ffn)
    return {k: v for k, v in given.items() if v is not None}


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_name(args.preset, vocab_size=ByteTokenizer.vocab_size, max_seq_len=args.seq_len,
                                 **shape_overrides(args))


def make_trainer(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus, ckpt_dir: str) -> tuple:
    """(model object, set-up Trainer, config) for our side. The one place that touches the Trainer:
    ``build_run(...)``, ``Trainer(run)``, ``epoch_batches(0)`` and ``fit()``."""
    from sab_byon_omni.training.build import build_run
    from sab_byon_omni.training.trainer import Trainer

    train, _ = corpus.corpus.windows(args.seq_len)
    cfg = our_config(args, corpus.corpus.meta["dataset"], ckpt_dir)
    sab = SABTranscendentV2(config=cfg, tokenizer=ByteTokenizer())
    trainer = Trainer(build_run(sab.model, sab.tokenizer, train, None, sab.config))
    return sab, trainer, trainer.run.cfg


def check(args: argparse.Namespace) -> None:
    """Every option and every ``--arch`` variant, before anything loads or trains: a SabError (one
    line) naming the first bad one. Our side's settings are checked by building each variant's
    config through the package's own validation (:func:`our_config`)."""
    for name in ("steps", "batch", "threads", "eval_every"):
        if getattr(args, name) < 1:
            raise SabError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    for name in ("val_windows", "gpt2_warmup"):
        if getattr(args, name) < 0:
            raise SabError(f"--{name.replace('_', '-')} {getattr(args, name)} must not be negative")
    if not (math.isfinite(args.gpt2_lr) and args.gpt2_lr > 0):
        raise SabError(f"--gpt2-lr {args.gpt2_lr} must be a finite positive number")
    models = [m.strip() for m in args.models.split(",")]
    if not set(models) <= {"ours", "gpt2"} or not all(models):
        raise SabError(f"--models {bounded(args.models)}: name ours, gpt2 or both (comma-separated)")
    if args.wall_budget and not {"ours", "gpt2"} <= set(models):
        raise SabError("--wall-budget gives ours GPT-2's training seconds: it needs --models ours,gpt2")
    preset = ModelConfig.from_name(args.preset)  # SabError for an unknown preset
    if not 2 <= args.seq_len <= preset.max_seq_len:
        raise SabError(f"--seq-len {args.seq_len} must be between 2 and the preset {args.preset}'s "
                       f"max_seq_len ({preset.max_seq_len})")
    model_config(args)  # GPT-2's shape (both models'): --hidden/--heads/--layers/--ffn
    lrs = learning_rates(args)
    for arch, lr in itertools.product(parse_arch(args.arch), lrs):
        our_config(argparse.Namespace(**{**vars(args), "arch_value": arch, "lr_value": lr}), "synthetic",
                   "learn-check")
    if args.results:  # where the rows go: writable before an hour of training, not after
        try:
            with open(args.results, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise SabError(f"--results {args.results}: cannot write there ({e.strerror or e})") from None


def timed_training(step: Any, batches: list[Batch], args: argparse.Namespace, model: torch.nn.Module,
                   windows: list[np.ndarray], budget: float | None = None,
                   replan: Any = None) -> dict:
    """``step(batch) -> loss`` over ``batches``, timed, with ``model`` scored on ``windows`` every
    ``--eval-every`` steps and after the last (the clock stopped meanwhile). With ``budget`` training
    seconds it stops before a step that would overrun them at the mean step time so far, and calls
    ``replan(steps done, steps that still fit)`` after each step. Returns the row's timing fields and
    its final ``val``."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    losses, curve, seconds, eval_seconds, wall = [], [], 0.0, 0.0, 0.0
    for it, batch in enumerate(batches, 1):
        t0, w0 = clock(), time.perf_counter()
        losses.append(step(batch))
        seconds += clock() - t0
        wall += time.perf_counter() - w0
        fit = 0 if budget is None else math.floor((budget - seconds) / (seconds / it))  # steps that still fit
        if replan is not None:
            replan(it, fit)
        last = it == len(batches) or (budget is not None and fit < 1)
        if last or it % args.eval_every == 0:
            t0 = time.perf_counter()
            val = score(model, windows)
            eval_seconds += time.perf_counter() - t0
            curve.append([it, round(seconds, 2), round(val["loss"], 5)])
        if last:
            break
    return dict(seconds=round(seconds, 2), wall_seconds=round(wall, 2), clock=args.clock,
                eval_seconds=round(eval_seconds, 3), steps=len(losses), val=val,
                val_curve=curve, train_loss=statistics.fmean(losses[-20:]),
                curve=[round(statistics.fmean(losses[i:i + 20]), 4) for i in range(0, len(losses), 20)])


def run_ours(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus,
             budget: float | None = None) -> tuple[dict, list[Batch]]:
    """Train our model with the Trainer's own step (``train_step``: the same math as ``fit``, without
    its logging and checkpoints); returns (result row, the micro-batches it trained on). With
    ``budget`` training seconds: until they are spent (:func:`timed_training`), the cosine's end
    re-planned after every step to the last step that fits in them at the mean step time so far."""
    with tempfile.TemporaryDirectory(prefix="learn-") as ckpt_dir:
        sab, trainer, cfg = make_trainer(args, corpus, ckpt_dir)
        accum = cfg.train.gradient_accumulation_steps
        spare = 1.0 if budget is None else WALL_SPARE  # the budget may fit more steps than planned
        batches = list(itertools.islice(trainer.epoch_batches(0), math.ceil(args.steps * spare) * accum))
        schedule = trainer.run.schedule

        def replan(done: int, fit: int) -> None:
            schedule.total_steps = done + max(fit, 0)  # where the cosine ends: the budget's last step
            schedule.set_step(trainer.state.global_step)  # the next step's rates, on the new plan

        def step(batch: Batch) -> float:
            out = trainer.train_step([batch])
            trainer.state.global_step += 1  # as fit() counts it: the schedule's next step follows
            return float(out.loss_sum) / max(out.local_tokens, 1)

        try:
            trainer.raw.train()
            timing = timed_training(step, batches, args, sab.model, validation_windows(corpus, args), budget,
                                    replan if budget is not None else None)
        finally:
            trainer.run.close()
    t = cfg.train
    row = dict(model="ours", lr=t.learning_rate, warmup=t.warmup_steps, schedule=t.lr_schedule,
               min_lr_ratio=t.min_lr_ratio, beta1=t.beta1, beta2=t.beta2, weight_decay=t.weight_decay, clip=t.max_grad_norm,
               **muon_fields(t.optimizer, t.muon_learning_rate, t.muon_warmup_steps),
               **ns_fields(t.optimizer, t.muon_ns_steps, t.muon_ns_coefficients),
               params=sab.model.num_parameters(), slow=learns_slowly(t.learning_rate, cfg.model),
               arch=our_arch(args), precision=t.precision, **timing)
    return row, batches


def batches_only(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus) -> list[Batch]:
    """The micro-batches our Trainer would train on, without training (for a GPT-2-only run)."""
    with tempfile.TemporaryDirectory(prefix="learn-") as ckpt_dir:
        _, trainer, _ = make_trainer(args, corpus, ckpt_dir)
        try:
            return list(itertools.islice(trainer.epoch_batches(0), args.steps))
        finally:
            trainer.run.close()


# ----------------------------------------------------------------------------------- GPT-2 side
def nanogpt_lr(it: int, warmup: int, decay_iters: int, lr: float = NANOGPT["lr"]) -> float:
    """nanoGPT's ``get_lr``: linear warmup, cosine from lr to min_lr = lr / 10 at ``decay_iters``."""
    min_lr = lr * NANOGPT["min_lr"] / NANOGPT["lr"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / max(decay_iters - warmup, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class _LogitsOnly(torch.nn.Module):
    """GPT-2 behind our model's call signature: ids -> logits."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits


def run_gpt2(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus, batches: list[Batch]) -> dict:
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    model = _LogitsOnly(build_hf_gpt2(cfg)).train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": NANOGPT["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=NANOGPT["lr"], betas=(NANOGPT["beta1"], NANOGPT["beta2"]), fused=True)
    it = 0

    def step(batch: Batch) -> float:
        nonlocal it
        for g in opt.param_groups:
            g["lr"] = nanogpt_lr(it, args.gpt2_warmup, len(batches), args.gpt2_lr)
        it += 1
        loss_sum, n = token_loss(model, batch)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, NANOGPT["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum.item() / n

    timing = timed_training(step, batches, args, model, validation_windows(corpus, args))
    return dict(model="gpt2", lr=args.gpt2_lr, warmup=args.gpt2_warmup, schedule="cosine",
                min_lr_ratio=NANOGPT["min_lr"] / NANOGPT["lr"], beta1=NANOGPT["beta1"], beta2=NANOGPT["beta2"],
                weight_decay=NANOGPT["weight_decay"], clip=NANOGPT["clip"], **muon_fields("adamw", None, None),
                params=sum(p.numel() for p in params), arch={}, precision="fp32", **timing)


# ---------------------------------------------------------------------------------- evaluation
def token_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed next-token loss in nats, predictions) of one batch: the same loss for both models."""
    logits = model(batch.input_ids)
    targets = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, batch.n_targets


def validation_windows(corpus: learn_corpora.BenchCorpus, args: argparse.Namespace) -> list[np.ndarray]:
    """The held-out windows both models are scored on: the validation split cut into windows of
    ``seq_len`` tokens with stride ``seq_len - 1`` (``sab-omni eval``'s default), all of them or
    ``--val-windows`` spread evenly over the split."""
    _, val = corpus.corpus.windows(args.seq_len)
    n = len(val)
    k = args.val_windows
    picks = range(n) if not k or k >= n else [n // 2] if k == 1 else \
        sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [val[i] for i in picks]


@torch.no_grad()
def score(model: torch.nn.Module, windows: list[np.ndarray], batch_size: int = 16) -> dict:
    """Loss, bits per byte and counts over ``windows`` (each scores its tokens 1..end)."""
    was = model.training
    model.eval()
    loss_sum, n_tokens, n_bytes = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        batch = collate(windows[i:i + batch_size], pad_id=0)
        loss, n = token_loss(model, batch)
        loss_sum += float(loss)
        n_tokens += n
        n_bytes += sum(int((w[1:] >= 2).sum()) for w in windows[i:i + batch_size])
    model.train(was)
    bpb = loss_sum / (math.log(2) * n_bytes) if math.isfinite(loss_sum) else math.nan
    return dict(loss=loss_sum / n_tokens, bits_per_byte=bpb, tokens=n_tokens, bytes=n_bytes)


# ------------------------------------------------------------------------------------- running
def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown"


def label(args: argparse.Namespace) -> str:
    """The preset's name, or e.g. ``tiny/hidden=128,n_layers=4`` when the shape was changed."""
    extra = ",".join(f"{k}={v}" for k, v in shape_overrides(args).items())
    return f"{args.preset}/{extra}" if extra else args.preset


def common_fields(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus) -> dict:
    """The fields every row of this invocation and corpus shares."""
    m = model_config(args)
    return dict(time=datetime.datetime.now().isoformat(timespec="seconds"), tag=args.tag, corpus=corpus.name,
                corpus_info={k: corpus.description.get(k) for k in ("sha256", "train_bytes", "val_bytes",
                                                                     "documents", "versions")},
                preset=label(args), shape={k: getattr(m, k) for k in ("hidden", "n_heads", "n_layers", "ffn")},
                batch=args.batch, seq_len=args.seq_len, seed=args.seed, mode="steps",
                val_windows=args.val_windows, threads=torch.get_num_threads(), cpu=cpu_name(),
                torch=torch.__version__)


def wall_budget_run(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus, ours: dict, budget: float) -> dict:
    """Ours again, given ``budget`` training seconds: planned (warmup, cosine) for the steps its
    measured step time (from its step-budget run ``ours``) fits in them, then trained until the
    budget is spent, the cosine's end moved after each step to the last step that fits at the mean
    step time so far (a time-based schedule: neither a step time lower than planned leaves seconds
    unused, nor a higher one cuts the cosine short)."""
    steps = max(1, math.floor(budget / (ours["seconds"] / ours["steps"])))
    planned = argparse.Namespace(**{**vars(args), "steps": steps})
    row, _ = run_ours(planned, corpus, budget)
    return {**ours, **row, "mode": "wall", "budget_seconds": budget, "planned_steps": steps,
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


def with_target(row: dict, gpt2: dict | None) -> dict:
    """An ours row with ``target_loss`` (GPT-2's final validation loss, the same windows) and
    ``time_to_target``: the training seconds of its first validation at or below it (None: never)."""
    if gpt2 is not None and row["model"] == "ours":
        row["target_loss"], row["gpt2_seconds"] = gpt2["val"]["loss"], gpt2["seconds"]
        row["time_to_target"] = next((sec for _, sec, loss in row["val_curve"] if loss <= row["target_loss"]), None)
    return row


def run_corpus(args: argparse.Namespace, corpus: learn_corpora.BenchCorpus, emit: Any = lambda row: None) -> list[dict]:
    """The one GPT-2 run (first: every ours row then carries its time to GPT-2's loss), every
    (model variant, rate) of ours, and the wall-budget runs, in that order; ``emit(row)`` is called
    with each row as soon as it is complete (so that a later crash loses none of the finished ones)."""
    variants = list(itertools.product(parse_arch(args.arch), learning_rates(args)))
    rows: list[dict] = []

    def done(row: dict) -> dict:
        rows.append(row)
        emit(row)
        return row

    gpt2 = None
    if "gpt2" in args.models:  # on the windows our Trainer visits (the first variant's: they are the same for all)
        args.arch_value, args.lr_value = variants[0]
        gpt2 = done({**common_fields(args, corpus), **run_gpt2(args, corpus, batches_only(args, corpus))})
    if "ours" in args.models:
        for arch, lr in variants:
            args.arch_value, args.lr_value = arch, lr
            row, _ = run_ours(args, corpus)
            done(with_target({**common_fields(args, corpus), **row, "variant": arch}, gpt2))
    if args.wall_budget and gpt2 is not None:
        for ours in [r for r in rows if r["model"] == "ours"]:
            args.arch_value, args.lr_value = ours["variant"], ours["lr"] if args.lr else None
            done(with_target(wall_budget_run(args, corpus, ours, gpt2["seconds"]), gpt2))
    return rows


def print_row(row: dict) -> None:
    muon = f" muon {row['muon_lr']:.3g}" if row["optimizer"] == "muon" else ""
    reach = row.get("time_to_target")
    target = "" if row["model"] == "gpt2" else \
        f"  reaches GPT-2's loss at {'never' if reach is None else f'{reach:.1f} s'}"
    print(f"{row['corpus']:7s} {row['preset']:11s} {row['model']:5s} {row['mode']:5s} {arch_label(row)} lr "
          f"{row['lr']:.2e}{muon} warmup {row['warmup']:3d}  val bpb {row['val']['bits_per_byte']:.4f}  "
          f"train loss {row['train_loss']:.4f}  {row['steps']} steps {row['seconds']:.0f} s "
          f"(+{row['eval_seconds']:.0f} s eval){target}", flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    names = ("stdlib", "prose") if args.corpus == "both" else (args.corpus,)

    def emit(row: dict) -> None:  # printed, and appended to --results, the moment it is complete
        print_row(row)
        if args.results:
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()

    out = []
    for name in names:
        out += run_corpus(args, learn_corpora.load(name, Path(args.cache), args.seq_len), emit)
    return out


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """The benchmark; bad input (an option, an --arch variant, a results file) is one ``error:`` line
    and exit status 2, as ``sab-omni`` answers it."""
    try:
        return _main(argv)
    except SabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = parse(argv, __doc__.split("\n\n")[0])
    if args.report:
        print(report(load_rows(args.report), args.plot))
        return 0
    check(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    rows = run(args)
    print()
    print("\n".join(bench_table(rows) + time_table(rows)) if "gpt2" in args.models else "")
    print(f"wall time {time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} thread(s), CPU {cpu_name()}")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
