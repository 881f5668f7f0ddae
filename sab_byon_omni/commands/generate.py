"""sab-omni generate: sample text from a checkpoint, streamed to the terminal.

On a CPU, sampling runs on one thread unless --threads says otherwise: each new token multiplies
one row by every weight, too little work to share, and while other processes keep the cores busy
every op on two threads waits for the one that is not running. Measured on a 2-vCPU Xeon (Sapphire
Rapids), greedy, fp32, 64 new tokens, with other jobs on the machine (python benchmarks/levers.py
decode_threads --preset P): Lightweight 55.3 tokens/s on 1 thread vs 8.0 on 2, small 387.9 vs 9.5,
tiny 755.3 vs 44.0. On a quiet machine a second thread gains at most about 1.6x (Lightweight: 128.5
vs 80.8 tokens/s on a quiet 2-vCPU EPYC, docs/BENCHMARKS.md): pass --threads 2 there.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLE = """examples:
  sab-omni generate --checkpoint checkpoints/best_model.pt --prompt "Consciousness is"
  sab-omni generate --checkpoint run/best_model.pt --prompt "def " --temperature 0.7 --top-p 0.9 --seed 1
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="sample text from a checkpoint", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--checkpoint", required=True, metavar="SOURCE",
                   help="the model: a checkpoint (.pt or .dcp), a .safetensors file from export, a save_pretrained "
                        "folder, a transformers folder from export, or a Hub id user/name in the local cache")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 disables (default: 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (slow; for checks)")
    p.add_argument("--device", default="auto", help="torch device; auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision, as train.precision (default: auto: bf16/fp16 on GPUs, bf16 on CPUs "
                        "with AVX-512 BF16 or AMX, fp32 on other CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while sampling (default: 1 on a CPU, at most ~1.6x slower than 2 on a "
                        "quiet machine and 7-40x faster on a busy one, see above; torch's setting on GPUs and "
                        "with --no-cache)")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2, check_sampling
    from sab_byon_omni.device import resolve_device
    from sab_byon_omni.model.generate import decoding_threads

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, cli=True, threads=args.threads)
    device = resolve_device(args.device)
    sab = SABTranscendentV2.load(args.checkpoint, device=device)
    sys.stdout.write(args.prompt)
    sab.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, stream=True,
                 use_cache=not args.no_cache, precision=args.precision, threads=args.threads)
    sys.stdout.write("\n")
    n = decoding_threads(device, args.threads, not args.no_cache) or torch.get_num_threads()
    print(f"[{sab.last_tokens_per_second:,.1f} tokens/s, {n} thread{'' if n == 1 else 's'}]", file=sys.stderr)
    return 0
