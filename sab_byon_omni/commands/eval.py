"""sab-omni eval: validation loss, perplexity and bits per byte of a model, on the data it was
trained on or on any --data.

A corpus of files is read, split and tokenised exactly as in training (the checkpoint's data
options and tokenizer) and scored with a sliding window, so `--data` pointing at the training
folder evaluates the held-out validation documents. A model trained on the synthetic dataset is
scored on the same held-out samples as in training (and the report gives their entropy floor,
the lowest loss any model can reach on them).

By default the model is scored as the training loop validated it: in the precision it was trained
in (its train.precision, auto resolved on this device) and with its batch size, so on the machine
it trained on (one process) the loss equals the validation loss training reported, bit for bit.
Another precision differs by rounding, about 1e-4 relative at most between fp32 and bf16 in our
measurements (docs/DATA.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from sab_byon_omni.commands.common import check_paths_first
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import plural

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  sab-omni eval --checkpoint checkpoints/tiny/best_model.pt          # the data it was trained on
  sab-omni eval --checkpoint run/best_model.pt --data ~/notes
  sab-omni eval --checkpoint run/best_model.pt --data "src/**/*.py" --stride 256 --batch-size 16
  sab-omni eval --checkpoint run/best_model.pt --data other_corpus/ --split all --json
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a corpus",
                       description=__doc__, epilog=EXAMPLE)
    p.add_argument("--checkpoint", required=True, metavar="SOURCE",
                   help="the model: a checkpoint, a .safetensors file from export, a save_pretrained or transformers "
                        "folder, a .gguf file, or a Hub id in the local cache (as for generate)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="file, folder or glob, or 'synthetic' (default: the data the model was trained on)")
    p.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="which documents to score (default: val, the held-out ones)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the checkpoint's data.seq_len)")
    p.add_argument("--stride", type=int, default=None,
                   help="window step, 1 .. seq_len-1; smaller gives each token more context "
                        "(default: seq_len-1, no overlap, the same as training's validation)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (or samples) per forward pass (default: the checkpoint's train.batch_size, as "
                        "training's validation)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="tokenised-corpus cache (default: as in training)")
    p.add_argument("--device", default="auto", help="torch device (default: auto)")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (default: the one the model was trained in, its train.precision with "
                        "auto resolved on this device, or auto where this device has no native support for it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    check_paths_first(source=args.checkpoint, data=args.data)
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.device import make_precision, resolve_device, trained_precision

    if args.batch_size is not None and args.batch_size < 1:
        raise SabError(f"--batch-size={args.batch_size} must be at least 1")
    device = resolve_device(args.device)
    sab = SABTranscendentV2.load(args.checkpoint, device=device)
    cfg = sab.config
    dataset = args.data if args.data is not None else cfg.data.dataset
    name, why = (args.precision, "--precision") if args.precision else trained_precision(cfg.train.precision, device)
    precision = make_precision(name, device)
    batch_size = args.batch_size or cfg.train.batch_size
    how = f"{precision.name} ({why}), batch {batch_size}"
    if dataset == "synthetic":
        result, where, extra = _synthetic(sab, args, batch_size, device, precision, how)
    else:
        result, where, extra = _corpus(sab, args, dataset, batch_size, device, precision, how)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": dataset, "split": args.split, **extra,
                          "precision": precision.name, "batch_size": batch_size, **result.as_dict()}))
    else:
        print(f"{args.split} split of {dataset}: {result.n_tokens:,} tokens, {result.n_bytes:,} bytes "
              f"({where}, {precision.name}, {result.seconds:.1f} s)")
        print(f"loss {result.loss:.4f} nats/token   perplexity {result.perplexity:.3f}   "
              f"bits/byte {result.bits_per_byte:.4f}"
              + (f"   (entropy floor {extra['entropy_floor']:.4f} nats/token)" if "entropy_floor" in extra else ""))
    return 0


def _splits(args: argparse.Namespace) -> tuple[str, ...]:
    return ("train", "val") if args.split == "all" else (args.split,)


def _synthetic(sab, args, batch_size, device, precision, how):  # type: ignore[no-untyped-def]
    """The held-out samples of the synthetic dataset the model was trained on (same seed, size, split)."""
    from sab_byon_omni.data.synthetic import MultimodalConsciousnessDataset
    from sab_byon_omni.evaluation import EvalResult, evaluate_samples

    if args.seq_len or args.stride:
        raise SabError("--seq-len and --stride apply to corpora of files; synthetic samples are scored whole")
    d = sab.config.data
    seq_len = min(d.seq_len, sab.config.model.max_seq_len)
    ds = MultimodalConsciousnessDataset(sab.tokenizer, d.num_samples, seq_len, d.data_seed)
    train, val = ds.split(d.val_fraction)
    result, floor, samples = EvalResult(0.0, 0, 0), [], 0
    log.info("scoring synthetic samples (%s)", how)
    for name in _splits(args):
        part = val if name == "val" else train
        n_bytes = sum(len(ds.texts[int(i)].encode("utf-8")) for i in part.indices)
        result = result + evaluate_samples(sab.model, part, n_bytes, batch_size, sab.tokenizer.pad_id, device,
                                           precision.autocast())
        floor += list(part.indices)
        samples += len(part)
    # the floor counts characters: only for the character- and byte-level tokenizers
    extra = {"samples": samples, "entropy_floor": ds.entropy_floor(floor)} if sab.tokenizer.name in (
        "char96", "byte") else {"samples": samples}
    return result, f"{samples:,} samples of {d.num_samples:,}, seed {d.data_seed}", extra


def _corpus(sab, args, dataset, batch_size, device, precision, how):  # type: ignore[no-untyped-def]
    from sab_byon_omni.data.chat_corpus import chat_forms
    from sab_byon_omni.data.corpus import open_corpus
    from sab_byon_omni.data.readers import find_files
    from sab_byon_omni.evaluation import EvalResult, evaluate_stream

    cfg = sab.config
    seq_len = args.seq_len or min(cfg.data.seq_len, cfg.model.max_seq_len)
    if not 2 <= seq_len <= cfg.model.max_seq_len:
        raise SabError(f"--seq-len={seq_len} must be in [2, model.max_seq_len={cfg.model.max_seq_len}]")
    stride = args.stride or seq_len - 1
    if not 1 <= stride <= seq_len - 1:
        raise SabError(f"--stride={stride} must be in [1, seq_len-1={seq_len - 1}]")
    data_cfg = dataclasses.replace(cfg.data, dataset=dataset, cache_dir=args.cache_dir or cfg.data.cache_dir)
    if chat_forms(find_files(dataset)) is not None:
        return _chat(sab, args, dataclasses.replace(data_cfg, seq_len=seq_len), batch_size, device, precision, how)
    corpus = open_corpus(data_cfg, sab.tokenizer)
    result = EvalResult(0.0, 0, 0)
    for split in _splits(args):
        tokens = corpus.val_tokens if split == "val" else corpus.train_tokens
        if len(tokens) < 2:
            raise SabError(f"the {split} split of {dataset!r} has {plural(len(tokens), 'token')}: nothing to score")
        log.info("scoring %s %s tokens (window %d, stride %d, %s)", f"{len(tokens):,}", split, seq_len, stride, how)
        result = result + evaluate_stream(sab.model, tokens, corpus.meta[f"{split}_bytes"], seq_len, stride,
                                          batch_size, device, precision.autocast())
    return result, f"window {seq_len}, stride {stride}", {"seq_len": seq_len, "stride": stride}


def _chat(sab, args, data_cfg, batch_size, device, precision, how):  # type: ignore[no-untyped-def]
    """Chat data (docs/CHAT.md): the conversations as samples, scored on the answers' tokens only."""
    from sab_byon_omni.data.corpus import load_corpus
    from sab_byon_omni.evaluation import EvalResult, evaluate_samples

    if args.stride:
        raise SabError("--stride applies to text corpora; conversations are scored whole")
    _, train, val = load_corpus(data_cfg, sab.tokenizer)
    result, samples = EvalResult(0.0, 0, 0), 0
    for split in _splits(args):
        part = val if split == "val" else train
        log.info("scoring the answers of %s (%s split; %s)", plural(len(part), "conversation"), split, how)
        result = result + evaluate_samples(sab.model, part, part.answer_bytes(sab.tokenizer), batch_size,
                                           sab.tokenizer.pad_id, device, precision.autocast())
        samples += len(part)
    return result, f"{plural(samples, 'conversation')}, answers only", {"samples": samples,
                                                                         "seq_len": data_cfg.seq_len}
