"""sab-omni bench: time the real training step (or KV-cache generation), optionally against
Hugging Face GPT-2 of the same dimensions, interleaved in the same process.

Reports tokens/s, achieved TFLOP/s (FLOPs per token = 6 x matmul weights + 12 x layers x seq_len x
hidden), MFU against a matmul peak of the same dtype (measured in this run on CPUs, a per-GPU table
or --peak-tflops on CUDA, and on CUDA also against a matmul measured in this run) and peak memory (RSS on CPU, max_memory_allocated on CUDA). Absolute
numbers move with machine load; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json

from sab_byon_omni.commands.common import add_config_flags, collect_overrides
from sab_byon_omni.config import OPTIMIZERS, PRECISIONS, PRESETS
from sab_byon_omni.errors import SabError

EXAMPLE = """examples:
  sab-omni bench --preset lightweight --seq-len 1024 --batch-size 4 --precision fp32 --compare hf
  sab-omni bench --preset tiny --seq-len 128 --steps 5 --json
  sab-omni bench --preset small --seq-len 128 --batch-size 16 --optimizer muon
  sab-omni bench --mode generate --preset lightweight --compare hf --new-tokens 128
  sab-omni bench --preset 1b --vocab-size 50000 --seq-len 2048 --batch-size 4 --precision bf16 --device cuda --compare hf
  sab-omni bench --mode epoch --config configs/default.yaml --steps 10 --set data.length_bucket_size=64
  # SmolLM2-135M's architecture against transformers' LlamaForCausalLM holding the same weights (the
  # table of docs/BENCHMARKS.md; add --precision fp32 or --compile for its other rows):
  sab-omni bench --preset small --vocab-size 49152 --seq-len 256 --batch-size 4 --compare hf \\
      --model.family llama --model.hidden 576 --model.n_layers 30 --model.n_heads 9 --model.n_kv_heads 3 \\
      --model.ffn 1536 --model.norm rmsnorm --model.mlp swiglu --model.rope_base 100000 --model.max_seq_len 2048 \\
      --model.fragmergent_mode off --steps 5 --threads 1 --clock cpu --breakdown
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure training (or generation) throughput and MFU", description=__doc__,
                       epilog=EXAMPLE)
    p.add_argument("--mode", choices=("train", "generate", "epoch"), default="train",
                   help="train: one training step of a preset on random full-length rows; generate: greedy "
                   "generation with the KV cache; epoch: optimizer steps of a real job (--config), projected to an "
                   "epoch against its matmul bound (default: train)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="epoch mode: the job's YAML config (default: the built-in defaults = configs/default.yaml)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="epoch mode: override a config field, e.g. --set data.length_bucket_size=64 (repeatable; "
                        "the same as train's --data.length_bucket_size 64, also accepted here)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="lightweight",
                   help="architecture (default: lightweight)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: 1024, or the model's max_seq_len when that is shorter)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (default: 4)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="as train.precision; auto = bf16 where the hardware has it, else fp32 (default: auto)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (or generations) per model (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, per model (default: 1)")
    p.add_argument("--vocab-size", type=int, default=96, help="vocabulary (default: 96, the char96 tokenizer)")
    p.add_argument("--device", default="auto", help="torch device; auto picks cuda, then mps, then cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (as train.compile: each block) "
                   "and each peer's layers the same way; our compile time is reported separately")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="as train.optimizer: adamw, or muon (Muon for the blocks' matrices, AdamW for the rest), whose "
                        "Newton-Schulz iterations are then part of the timed step (default: adamw)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    _add_comparison_flags(p)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: measured on CPU, looked up by GPU name on CUDA)")
    p.add_argument("--prompt-len", type=int, default=64, help="generate mode: prompt tokens (default: 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="generate mode: tokens to generate (default: 128)")
    p.add_argument("--seed", type=int, default=1234, help="seed for weights and data (default: 1234)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    add_config_flags(p, dotted_only=True)
    return p


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """The flags of --mode train's comparison: the clock, the peers, their memory, the breakdown."""
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what a step's time counts: wall seconds (default), or this process's CPU seconds, for a CPU "
                        "shared with other jobs (with --threads 1 it is the step's own work)")
    p.add_argument("--compare", metavar="PEER[,PEER]", default="",
                   help="also time peers of the same dimensions, interleaved with ours: hf (Hugging Face GPT-2, or "
                        "with --model.family llama/qwen2/... that family's transformers class with our weights; needs "
                        "transformers), minimal (a plain textbook GPT); e.g. --compare hf,minimal")
    p.add_argument("--isolated-memory", action="store_true",
                   help="also measure each model's peak RSS in a fresh process of its own (CPU; one more run of "
                        "the warm-up per model), so ours and the peers compare on memory")
    p.add_argument("--breakdown", action="store_true",
                   help="train mode: also profile up to 3 steps of each model and print their time by kind of kernel "
                        "(matmul, attention, optimizer, other) and the ceiling against each peer: the speed-up a step "
                        "running only ours' matmul, attention and optimizer kernels would reach")


PRESET_FLAGS = {"preset": ("model.preset", "lightweight"), "seq_len": ("data.seq_len", None),
                "batch_size": ("train.batch_size", 4), "precision": ("train.precision", "auto"),
                "device": ("train.device", "auto"), "vocab_size": ("model.vocab_size", 96),
                "compile": ("train.compile", False),
                "activation_checkpointing": ("model.activation_checkpointing", False),
                "optimizer": ("train.optimizer", "adamw")}


def run(args: argparse.Namespace) -> int:
    from sab_byon_omni.benchmark.common import BenchOptions
    from sab_byon_omni.benchmark.report import format_report
    from sab_byon_omni.benchmark.results import to_json

    compare = tuple(c.strip() for c in args.compare.split(",") if c.strip())
    bench = dict(steps=args.steps, warmup=args.warmup, compare=compare, peak_tflops=args.peak_tflops,
                 threads=args.threads, isolated_memory=args.isolated_memory, clock=args.clock,
                 breakdown=args.breakdown)
    if args.clock != "wall" and args.mode != "train":
        raise SabError(f"--clock {args.clock} applies to --mode train, not {args.mode}")
    for flag in ("isolated_memory", "breakdown"):
        if getattr(args, flag) and args.mode != "train":
            raise SabError(f"--{flag.replace('_', '-')} applies to --mode train, not {args.mode}")
    if args.compile and args.mode == "generate":
        raise SabError("--compile applies to --mode train (generation runs eager: docs/BENCHMARKS.md)")
    if args.set and args.mode != "epoch":
        raise SabError(f"--set applies to --mode epoch; --mode {args.mode} takes the bench flags and --model.*")
    if args.mode == "epoch":
        result = _epoch(args, compare)
    else:
        flags = {k: getattr(args, k) for k in PRESET_FLAGS}
        bench["model"], bench["train"] = _model_fields(args)
        if flags["seq_len"] is None:
            flags["seq_len"] = min(1024, int(bench["model"].get("max_seq_len", PRESETS[args.preset]["max_seq_len"])))
        if args.mode == "generate":  # the sequence is the prompt and the new tokens
            flags["seq_len"] = min(max(args.prompt_len + args.new_tokens, 2), PRESETS[args.preset]["max_seq_len"])
        opts = BenchOptions.for_preset(**flags, seed=args.seed, **bench)
        if args.mode == "generate":
            from sab_byon_omni.benchmark.generate import run_generate_bench

            result = run_generate_bench(opts, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
        else:
            from sab_byon_omni.benchmark.train import run_train_bench

            result = run_train_bench(opts)
    print(json.dumps(to_json(result)) if args.json else format_report(result))
    return 0


TRAIN_FIELDS = ("train.muon_ns_steps", "train.muon_ns_coefficients")  # the step's own optimizer settings


def _model_fields(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The ``--model.*`` fields given (any architecture over the preset's) and the Muon schedule's
    ``--train.muon_ns_*`` (they change the timed step, as ``--optimizer`` does); other sections'
    flags belong to --mode epoch, whose config they change."""
    given = collect_overrides(args)
    for key in ("preset", "vocab_size", "activation_checkpointing"):
        if f"model.{key}" in given:
            raise SabError(f"--model.{key} repeats --{key.replace('_', '-')}: give it once, as "
                           f"--{key.replace('_', '-')}")
    other = sorted(k for k in given if not k.startswith("model.") and k not in TRAIN_FIELDS)
    if other:
        raise SabError(f"--{other[0]} applies to --mode epoch; --mode {args.mode} takes the bench flags, --model.* "
                       f"and {', '.join('--' + k for k in TRAIN_FIELDS)}")
    return ({k.removeprefix("model."): v for k, v in given.items() if k.startswith("model.")},
            {k.removeprefix("train."): v for k, v in given.items() if k in TRAIN_FIELDS})


def _epoch(args: argparse.Namespace, compare: tuple[str, ...]) -> object:
    from sab_byon_omni.benchmark.epoch import run_epoch_bench

    for flag, (key, default) in PRESET_FLAGS.items():
        if getattr(args, flag) != default:
            raise SabError(f"--{flag.replace('_', '-')} does not apply to --mode epoch, whose config decides it: "
                           f"use --set {key}=... (or --{key} ...)")
    if compare:
        raise SabError("--compare does not apply to --mode epoch (the peer has no equivalent of a whole job)")
    overrides = collect_overrides(args)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SabError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.length_bucket_size=64")
        overrides[key] = value
    return run_epoch_bench(args.config, overrides, args.steps, args.warmup, args.threads, args.peak_tflops)
