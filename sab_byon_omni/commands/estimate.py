"""sab-omni estimate: parameters, memory per device, FLOPs per token and time per epoch, before you train.

Memory is the peak per device of this project's training step (AdamW, fp32 master weights,
autocast in bf16/fp16): weights, gradients, optimizer state, activations, logits and framework
buffers (autocast weight copies, DDP buckets, FSDP all-gathered blocks). Time per epoch assumes a
sustained fraction (MFU) of the device's peak; measure your own MFU with a short run. The device is
this machine's unless --device says otherwise (h100 plans for one), and the first line names it.
--init_from describes a model you start from (a GGUF, a transformers folder, a checkpoint).
"""

from __future__ import annotations

import argparse
import json

from sab_byon_omni.config import PRESETS, ModelConfig
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import (
    PARALLEL,
    PRECISION_BYTES,
    epoch_tokens,
    estimate,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    gpu_table,
    largest_micro_batch,
    lora_parameters,
    plural,
    single_gpu_table,
)

EXAMPLE = """examples:
  sab-omni estimate --preset lightweight --seq-len 1024 --batch-size 4
  sab-omni estimate --init_from SmolLM2-135M-Instruct.Q4_1.gguf --lora-rank 8 --seq-len 256 --batch-size 4
  sab-omni estimate --preset 1b --device h100                 # planning for a GPU you do not have here
  sab-omni estimate --preset 3b --vocab-size 50000 --seq-len 2048 --batch-size 1 --gpus 8 \\
      --parallel fsdp --activation-checkpointing
  sab-omni estimate --preset tiny --precision fp32 --memory-gb 16
  sab-omni estimate --table                          # the GPU-requirements tables of docs/DISTRIBUTED.md
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("estimate", help="parameters, memory per device, FLOPs and time per epoch",
                       description=__doc__, epilog=EXAMPLE)
    p.add_argument("--preset", default="lightweight",
                   help=f"model preset: {', '.join(PRESETS)} (default: lightweight; --init_from describes a model)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch per device (default: 4)")
    p.add_argument("--precision", default="bf16", choices=tuple(PRECISION_BYTES),
                   help="compute precision; weights, gradients and AdamW state stay fp32 (default: bf16)")
    p.add_argument("--gpus", type=int, default=1, help="devices (processes) in total (default: 1)")
    p.add_argument("--parallel", default="ddp", choices=PARALLEL,
                   help="ddp: every device holds the whole model; fsdp: weights, grads and optimizer sharded "
                        "(default: ddp)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--vocab-size", type=int, default=96, help="vocabulary size (default: 96, the char96 tokenizer)")
    p.add_argument("--foreach-optimizer", action="store_true",
                   help="count foreach AdamW's step temporary (the trainer uses fused AdamW on CUDA and CPU)")
    p.add_argument("--init_from", metavar="SOURCE", default=None,
                   help="describe this model instead of a preset: a GGUF file, a transformers folder, a checkpoint "
                        "or a .safetensors export (its architecture and vocabulary, read without the weights "
                        "where the format allows)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="the device the verdict and the time are for: auto (this machine's: cuda if present, else "
                        "cpu), cpu (available RAM, the matmul rate measured here), cuda (this GPU's memory and "
                        "data-sheet peak), or h100 (an H100 SXM: 80 GB, 989 bf16 TFLOP/s, for planning) "
                        "(default: auto)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory per device, for the fits/does-not-fit verdict (default: the device's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device at this precision (default: the device's)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation you expect, in (0, 1] (default: 0.4)")
    p.add_argument("--num-samples", type=int, default=5000,
                   help="samples per epoch, 90%% of them trained on (default: 5000)")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens per epoch (default: 90%% of --num-samples x --seq-len, as if every sample "
                        "filled --seq-len: an upper bound)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="LoRA adapters of this rank (0: off): only they train; the frozen projections are held in "
                        "--precision when it is bf16 or fp16 (default: 0)")
    p.add_argument("--lora-targets", default="qkv,proj,up,down", help="LoRA: which projections (default: all four)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--table", action="store_true", help="print the markdown GPU-requirements tables and exit")
    return p


DEVICES = ("auto", "cpu", "cuda", "h100")
H100 = (80.0, 989.0)  # an H100 SXM: memory (GB) and dense bf16 TFLOP/s (the tables of docs/DISTRIBUTED.md)


def device_figures(args: argparse.Namespace) -> tuple[str, float, float, str]:
    """(device kind for the memory model, memory GB, peak TFLOP/s, the words saying which device
    and where each figure comes from); ``--memory-gb`` and ``--peak-tflops`` override."""
    import torch

    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "h100":
        memory, peak, words = *H100, "an H100 SXM (assumed: 80 GB, 989 TFLOP/s bf16; not this machine)"
        kind = "cuda"
    elif kind == "cuda":
        from sab_byon_omni.machine import gpu_peak_tflops

        if not torch.cuda.is_available():
            raise SabError("--device cuda but CUDA is not available here; --device h100 plans for an H100")
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
        table, why = gpu_peak_tflops(name, args.precision)
        peak = table if table is not None else 0.0
        peak_words = f"{table:g} TFLOP/s {args.precision}" if table else why
        words = f"{name} (this machine's: {memory:,.1f} GB, {peak_words})"
    else:
        from sab_byon_omni.machine import cpu_name, measure_matmul_peak, memory_budget

        budget, where = memory_budget(torch.device("cpu"))
        memory = budget / 1e9
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
        peak = measure_matmul_peak(dtype, torch.device("cpu"), budget_s=0.4) / 1e12
        words = f"cpu, this machine's ({cpu_name()}: {where}, {peak:.2g} TFLOP/s {args.precision} matmul measured now)"
    if args.memory_gb is not None:
        memory, words = args.memory_gb, words + f"; --memory-gb {args.memory_gb:g}"
    if args.peak_tflops is not None:
        peak, words = args.peak_tflops, words + f"; --peak-tflops {args.peak_tflops:g}"
    if not peak > 0:
        raise SabError(f"{words}: no peak TFLOP/s known for it; pass --peak-tflops")
    return kind, memory, peak, words


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.mfu <= 1:
        raise SabError(f"--mfu={args.mfu} must be in (0, 1]")
    for name in ("peak_tflops", "memory_gb"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise SabError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    if args.vocab_size < 1 or args.num_samples < 1:
        raise SabError("--vocab-size and --num-samples must be positive")
    if args.lora_rank < 0:
        raise SabError(f"--lora-rank={args.lora_rank} must not be negative (0: off)")
    if args.tokens is not None and not 0 < args.tokens < float("inf"):
        raise SabError(f"--tokens={args.tokens} must be a positive number")


def _tables(args: argparse.Namespace) -> int:
    args.memory_gb = args.memory_gb if args.memory_gb is not None else H100[0]  # the tables are an H100's
    args.peak_tflops = args.peak_tflops if args.peak_tflops is not None else H100[1]
    print(f"Per-GPU peak memory, {args.precision}, AdamW; time at {args.mfu:.0%} MFU of "
          f"{args.peak_tflops:g} TFLOP/s per GPU\n")
    print(gpu_table(args.memory_gb, args.peak_tflops, args.mfu, precision=args.precision))
    print(f"\nLargest micro-batch of {args.seq_len} tokens on one GPU (DDP-style, {args.precision}); "
          "no = does not fit\n")
    print(single_gpu_table(seq_len=args.seq_len, precision=args.precision))
    return 0


def _model(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """The model config to estimate (``--init_from``'s, else the preset's) and its name."""
    if args.init_from:
        import dataclasses

        from sab_byon_omni.interop.sources import model_config_of

        cfg, what = model_config_of(args.init_from)
        return dataclasses.replace(cfg, max_seq_len=max(args.seq_len, 2)), what
    if args.preset not in PRESETS:
        raise SabError(f"--preset={args.preset!r} is not one of: {', '.join(PRESETS)}")
    return (ModelConfig.from_name(args.preset, vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, 2)),
            f"preset {args.preset}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.table:
        return _tables(args)
    cfg, name = _model(args)
    kind, args.memory_gb, args.peak_tflops, device_words = device_figures(args)
    lora = dict(lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                lora_base_bytes=PRECISION_BYTES[args.precision])
    e = estimate(cfg, args.seq_len, args.batch_size, args.precision, args.gpus, args.parallel,
                 args.activation_checkpointing, device=kind, fused_optimizer=not args.foreach_optimizer, **lora)
    tokens = args.tokens if args.tokens is not None else epoch_tokens(args.num_samples, args.seq_len)
    seconds = e.seconds_per_tokens(tokens, args.peak_tflops, args.mfu) * e.hardware_flops_per_token / e.flops_per_token
    budget = args.memory_gb * 1e9
    if args.json:
        print(json.dumps({**e.as_dict(), "epoch_tokens": tokens, "epoch_seconds": seconds,
                          "fits": e.peak <= budget, "memory_bytes": budget, "device": device_words,
                          "peak_tflops": args.peak_tflops}, indent=2))
        return 0
    print(f"device: {device_words}")
    if args.gpus > 1 and args.device == "auto" and kind == "cpu":
        print(f"note: no GPU here, so --gpus {args.gpus} sizes {args.gpus} copies of this CPU; --device h100 "
              "plans for H100s, --memory-gb and --peak-tflops for another GPU")
    print(f"{name}: {e.parameters:,} parameters ({fmt_count(e.parameters)}), vocab {cfg.vocab_size:,}"
          + (f", family {cfg.family}" if args.init_from else ""))
    if args.lora_rank:
        print(f"LoRA rank {args.lora_rank} on {args.lora_targets}: "
              f"{lora_parameters(cfg, args.lora_rank, args.lora_targets):,} trainable parameters, the rest frozen")
    print(f"micro-batch {args.batch_size} x {args.seq_len} tokens per device, {args.precision}, "
          f"{plural(args.gpus, 'device')}, {args.parallel}, activation checkpointing {'on' if e.activation_checkpointing else 'off'}")
    print("memory per device:")
    for name in ("weights", "gradients", "optimizer", "activations", "logits", "workspace", "buffers"):
        print(f"  {name:<12} {fmt_bytes(getattr(e, name)):>12}")
    print("  (peak = weights + gradients + optimizer + activations + the larger of logits and workspace + buffers)")
    verdict = "fits" if e.peak <= budget else "does NOT fit"
    print(f"  {'peak':<12} {fmt_bytes(e.peak):>12}   ({verdict} in {fmt_bytes(budget)} = {args.memory_gb:.4g} GB)")
    if e.peak > budget:
        mb = largest_micro_batch(cfg, args.seq_len, budget, args.batch_size, precision=args.precision, gpus=args.gpus,
                                 parallel=args.parallel, activation_checkpointing=args.activation_checkpointing,
                                 fused_optimizer=not args.foreach_optimizer, **lora)
        hint = (f"micro-batch {mb} fits" if mb else
                "even micro-batch 1 does not fit: try --parallel fsdp, more --gpus or --activation-checkpointing")
        print(f"  hint: {hint}")
    print(f"compute: {e.flops_per_token / 1e9:,.3f} GFLOP per token (6N + attention)"
          + (f", {e.hardware_flops_per_token / 1e9:,.3f} with recomputation" if e.activation_checkpointing else ""))
    assumed = "" if args.tokens is not None else (
        f" ({int(round(args.num_samples * 0.9)):,} training samples x {args.seq_len:,}, as if each filled "
        "--seq-len: an upper bound; the synthetic set's samples are ~65 characters, so give --tokens for your corpus)")
    print(f"epoch of {fmt_count(tokens)} tokens{assumed}: {fmt_duration(seconds)} on {plural(args.gpus, 'device')} at "
          f"{args.mfu:.0%} of {args.peak_tflops:.4g} TFLOP/s")
    return 0
