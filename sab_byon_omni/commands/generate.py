"""sab-omni generate: sample text from a checkpoint, streamed to the terminal.

On a CPU, sampling takes as many threads as there are cores no other process is using when it
starts (at most torch's setting), or --threads. Each new token multiplies one row by every weight:
on free cores a second thread helps a large model, but while another process keeps a core busy,
every op on two threads waits for the one that is not running. Tokens/s on a 2-vCPU Xeon (Sapphire
Rapids), greedy, fp32, 64 new tokens, 1 vs 2 threads (python benchmarks/levers.py decode_threads
--preset P [--busy]): quiet: tiny 3,273 vs 3,210, small 869 vs 1,027, Lightweight 73 vs 129; one
core kept busy: tiny 3,293 vs 1,447, small 838 vs 452, Lightweight 75 vs 17.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sab_byon_omni.commands.common import check_paths_first

EXAMPLE = """examples:
  sab-omni generate --checkpoint checkpoints/best_model.pt --prompt "Consciousness is"
  sab-omni generate --checkpoint run/best_model.pt --prompt "def " --temperature 0.7 --top-p 0.9 --seed 1
  sab-omni generate --checkpoint model.gguf --chat --prompt "What is the capital of France?" --temperature 0
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="sample text from a checkpoint", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="answer --prompt as one user turn rendered with the model's chat template (or the "
                        "default one, docs/CHAT.md), stopping at its end of turn; only the answer is printed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (slow; for checks)")
    add_sampling_flags(p)
    return p


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The model and sampling flags that ``generate`` and ``chat`` share."""
    p.add_argument("--checkpoint", required=True, metavar="SOURCE",
                   help="the model: a checkpoint (.pt or .dcp), a .safetensors file from export, a save_pretrained "
                        "folder, a transformers folder from export, a .gguf file (llama.cpp), or a Hub id user/name in "
                        "the local cache")
    p.add_argument("--system", default=None, help="a system prompt opening the conversation (with chat)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 disables (default: 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="auto", help="torch device; auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision, as train.precision (default: auto: bf16/fp16 on GPUs, bf16 on CPUs "
                        "with AVX-512 BF16 or AMX, fp32 on other CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while sampling (default on a CPU: the cores no other process is using "
                        "as it starts, see above; torch's setting on GPUs and with --no-cache; more than the cores this "
                        "process may use: lowered to them, with a warning)")
    return p


def load_for_sampling(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(the model of --checkpoint on --device, the sampling flags), checked before the model loads."""
    from sab_byon_omni.core.chat import Sampling
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2, check_sampling
    from sab_byon_omni.device import resolve_device

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, cli=True, threads=args.threads)
    sab = SABTranscendentV2.load(args.checkpoint, device=resolve_device(args.device))
    return sab, Sampling(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed,
                         args.precision, args.threads)


def run(args: argparse.Namespace) -> int:
    check_paths_first(source=args.checkpoint)
    from sab_byon_omni.errors import SabError

    if args.system is not None and not args.chat:
        raise SabError("--system is a chat turn: use it with --chat")
    if args.chat and args.no_cache:
        raise SabError("--no-cache is for plain continuations: --chat samples with the cache")
    sab, sampling = load_for_sampling(args)
    try:  # the text streamed so far ends its line, also when sampling fails (an error on a line of its own)
        rate, n = _sample(sab, sampling, args)
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    threads = f", {n} thread{'' if n == 1 else 's'}" if n else ""
    print(f"[{rate:,.1f} tokens/s{threads}]", file=sys.stderr)
    return 0


def _sample(sab: Any, sampling: Any, args: argparse.Namespace) -> tuple[float, int | None]:
    """Stream the continuation (or the chat answer) to stdout; (tokens/s, threads used)."""
    if args.chat:
        from sab_byon_omni.core.chat import ChatSession

        session = ChatSession(sab, args.system, sampling)
        for piece in session.answer(args.prompt):
            sys.stdout.write(piece)
            sys.stdout.flush()
        tokens, seconds = session.last.tokens, session.last.seconds
        return tokens / seconds if seconds > 0 else 0.0, None
    sys.stdout.write(args.prompt)
    sab.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, stream=True,
                 use_cache=not args.no_cache, precision=args.precision, threads=args.threads)
    return sab.last_tokens_per_second, sab.last_threads
