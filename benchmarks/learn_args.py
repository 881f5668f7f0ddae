"""The learning benchmark's command line (``benchmarks/learn.py``): its options, and the parsing of
``--arch`` variants and ``--lr`` lists (each bad word one SabError line)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml
from learn_report import DEFAULT_SEED, GPT2_WARMUP, NANOGPT

from sab_byon_omni.cli import Parser
from sab_byon_omni.errors import SabError, bounded

ROOT = Path(__file__).resolve().parent.parent


def parse_arch(text: str) -> list[dict]:
    """``--arch``: model variants separated by ``;``, each ``base`` or ``field=value,field=value``
    (SabError for an empty, malformed or repeated variant; the fields themselves are checked by
    :func:`check`, through the package's own config validation)."""
    out: list[dict] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            raise SabError(f"--arch {bounded(text)}: an empty variant (variants are ';'-separated: base or field=value,...)")
        pairs = [kv.split("=", 1) for kv in part.split(",")] if part != "base" else []
        if any(len(kv) != 2 or not kv[0].strip() for kv in pairs):
            raise SabError(f"--arch: {bounded(part)} is not field=value[,field=value] or base")
        try:
            variant = {k.strip(): yaml.safe_load(v) for k, v in pairs}
        except yaml.YAMLError:
            raise SabError(f"--arch: {bounded(part)} has a value that is not a plain value") from None
        if len(variant) != len(pairs):
            raise SabError(f"--arch: {bounded(part)} names a field twice")
        if variant in out:
            raise SabError(f"--arch: the variant {bounded(part)} is given twice")
        out.append(variant)
    return out


def learning_rates(args: argparse.Namespace) -> list[float | None]:
    """--lr as a list of rates (None: the rule's); SabError for a word that is not a finite positive number."""
    if not args.lr:
        return [None]
    out = []
    for word in args.lr.split(","):
        try:
            lr = float(word)
        except ValueError:
            raise SabError(f"--lr: {bounded(word.strip())} is not a number") from None
        if not (math.isfinite(lr) and lr > 0):
            raise SabError(f"--lr: {bounded(word.strip())} must be a finite positive number")
        out.append(lr)
    return out


def add_time_options(p: argparse.ArgumentParser) -> None:
    """The time-to-quality options: validation cadence, clock, wall budget, model variants, precision."""
    p.add_argument("--eval-every", type=int, default=20,
                   help="score both models on the validation windows every N steps, clock stopped (default 20)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the timed seconds count: wall (default), or this process's CPU seconds (steadier on "
                        "a machine other processes share; with --threads 1 the same as wall time on an idle one)")
    p.add_argument("--wall-budget", action="store_true",
                   help="also train ours for GPT-2's training seconds (its schedule planned for them)")
    p.add_argument("--arch", default="base", help="our model variants, ';'-separated: base, or model fields as "
                   "field=value,... (e.g. \"base;qk_norm=true;mlp=relu2\"); a train field in a variant changes "
                   "ours' recipe (\"base;muon_ns_steps=4;muon_ns_coefficients=polar_express\")")
    p.add_argument("--precision", default="fp32", choices=("fp32", "auto", "bf16"),
                   help="our precision (default fp32, as GPT-2 trains; auto: bf16 where the CPU has it natively)")


def parse(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = Parser(prog="learn.py", description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", choices=("stdlib", "prose", "both"), default="both")
    p.add_argument("--preset", default="small", help="model preset (both models get its dimensions)")
    p.add_argument("--hidden", type=int, help="override the preset's width (both models)")
    p.add_argument("--heads", type=int, help="override the preset's attention heads (both models)")
    p.add_argument("--layers", type=int, help="override the preset's depth (both models)")
    p.add_argument("--ffn", type=int, help="override the preset's feed-forward width (both models)")
    p.add_argument("--models", default="ours,gpt2", help="ours, gpt2 or both (comma-separated)")
    p.add_argument("--lr", help="our peak learning rate(s), comma-separated (default: the recipe rule)")
    p.add_argument("--warmup", type=int, help="our warmup steps (default: the rule)")
    p.add_argument("--schedule", choices=("cosine", "constant"), help="our schedule (default: the rule)")
    p.add_argument("--min-lr-ratio", type=float, help="our cosine floor / peak (default: the rule)")
    p.add_argument("--beta1", type=float, help="our AdamW beta1 (default: the rule)")
    p.add_argument("--beta2", type=float, help="our AdamW beta2 (default: the rule)")
    p.add_argument("--weight-decay", type=float, help="our weight decay (default: the rule)")
    p.add_argument("--clip", type=float, help="our gradient clipping norm (default 1.0)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), help="our optimizer (default: the rule's, muon)")
    p.add_argument("--muon-lr", type=float, help="our Muon peak rate (default: the rule's)")
    p.add_argument("--muon-warmup", type=int, help="our Muon warmup steps (default: the rule's)")
    p.add_argument("--muon-ns-steps", type=int, help="our Muon's Newton-Schulz iterations (default: train's, 5)")
    p.add_argument("--muon-ns-coefficients", choices=("quintic", "polar_express"),
                   help="our Muon's Newton-Schulz coefficients (default: train's, quintic)")
    p.add_argument("--gpt2-warmup", type=int, default=GPT2_WARMUP,
                   help="GPT-2's warmup steps (default 4: nanoGPT's 100 of 5000 steps, scaled to 200)")
    p.add_argument("--gpt2-lr", type=float, default=NANOGPT["lr"],
                   help="GPT-2's peak rate (default 1e-3, nanoGPT's; min_lr stays peak / 10)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch", type=int, default=16, help="windows per optimizer step (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    add_time_options(p)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="initialisation seed (the windows stay the same)")
    p.add_argument("--val-windows", type=int, default=0,
                   help="score this many validation windows spread over the split (default 0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--tag", default="benchmark", help="label stored with the results (benchmark, sweep, ...)")
    p.add_argument("--results", help="append one JSON line per model run to this file")
    p.add_argument("--cache", default=str(ROOT / ".sab_cache" / "learn"), help="corpus cache folder")
    p.add_argument("--verbose", action="store_true", help="show the trainer's banner and step lines")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")
    p.add_argument("--report", metavar="FILE", help="print tables from a results file (or several, comma-separated) "
                   "instead of running")
    p.add_argument("--plot", metavar="PNG", help="with --report: draw the sweep plot here")
    return p.parse_args(argv)
