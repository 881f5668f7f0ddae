"""sab-omni eval: validation loss, perplexity and bits per byte of a checkpoint on a corpus.

The whole split is scored with a sliding window (see sab_byon_omni.evaluation). The corpus is
read, split and tokenised exactly as in training (the checkpoint's data options and tokenizer),
so `--data` pointing at the training folder evaluates the held-out validation documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.corpus import open_corpus
from sab_byon_omni.errors import SabError
from sab_byon_omni.evaluation import EvalResult, evaluate_stream
from sab_byon_omni.device import make_precision, resolve_device

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  sab-omni eval --checkpoint run/best_model.pt --data ~/notes
  sab-omni eval --checkpoint run/best_model.pt --data "src/**/*.py" --stride 256 --batch-size 16
  sab-omni eval --checkpoint run/best_model.pt --data other_corpus/ --split all --json
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a corpus",
                       description=__doc__, epilog=EXAMPLE)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint written by train")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="file, folder or glob (default: the dataset the checkpoint was trained on)")
    p.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="which documents to score (default: val, the held-out ones)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the checkpoint's data.seq_len)")
    p.add_argument("--stride", type=int, default=None,
                   help="window step, 1 .. seq_len-1; smaller gives each token more context "
                        "(default: seq_len-1, no overlap, the same as training's validation)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="tokenised-corpus cache (default: as in training)")
    p.add_argument("--device", default="auto", help="torch device (default: auto)")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (default: fp32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SabError(f"--batch-size={args.batch_size} must be at least 1")
    device = resolve_device(args.device)
    sab = SABTranscendentV2.from_checkpoint(args.checkpoint, device=device)
    cfg = sab.config
    dataset = args.data if args.data is not None else cfg.data.dataset
    if dataset == "synthetic":
        raise SabError("eval scores a corpus of your files: pass --data PATH (the checkpoint was trained on the "
                       "synthetic dataset)")
    seq_len = args.seq_len or min(cfg.data.seq_len, cfg.model.max_seq_len)
    if not 2 <= seq_len <= cfg.model.max_seq_len:
        raise SabError(f"--seq-len={seq_len} must be in [2, model.max_seq_len={cfg.model.max_seq_len}]")
    stride = args.stride or seq_len - 1
    if not 1 <= stride <= seq_len - 1:
        raise SabError(f"--stride={stride} must be in [1, seq_len-1={seq_len - 1}]")
    data_cfg = dataclasses.replace(cfg.data, dataset=dataset, cache_dir=args.cache_dir or cfg.data.cache_dir)
    corpus = open_corpus(data_cfg, sab.tokenizer)
    precision = make_precision(args.precision, device)
    splits = ("train", "val") if args.split == "all" else (args.split,)
    result = EvalResult(0.0, 0, 0)
    for split in splits:
        tokens = corpus.val_tokens if split == "val" else corpus.train_tokens
        if len(tokens) < 2:
            raise SabError(f"the {split} split of {dataset!r} has {len(tokens)} token(s): nothing to score")
        log.info("scoring %s %s tokens (window %d, stride %d)", f"{len(tokens):,}", split, seq_len, stride)
        result = result + evaluate_stream(sab.model, tokens, corpus.meta[f"{split}_bytes"], seq_len, stride,
                                          args.batch_size, device, precision.autocast())
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": dataset, "split": args.split, "seq_len": seq_len,
                          "stride": stride, **result.as_dict()}))
    else:
        print(f"{args.split} split of {dataset}: {result.n_tokens:,} tokens, {result.n_bytes:,} bytes "
              f"(window {seq_len}, stride {stride}, {result.seconds:.1f} s)")
        print(f"loss {result.loss:.4f} nats/token   perplexity {result.perplexity:.3f}   "
              f"bits/byte {result.bits_per_byte:.4f}")
    return 0
