"""Throughput of the real training step, against the hardware and against a peer.

* The step timed is :meth:`Trainer.train_step`, the very code ``sab-omni train`` runs: forward,
  ``causal_lm_loss``, backward, gradient clipping and the optimizer from ``make_optimizer``, under
  the precision policy of ``training/precision.py``.
* FLOPs per token follow one formula (:func:`train_flops_per_token`), used for every model in a run.
* MFU is measured against a matmul peak of the same dtype: on CPUs measured in the same run
  (:func:`measure_matmul_peak`); on GPUs looked up by device name (:data:`GPU_PEAK_TFLOPS`) unless
  the user gives one. There is no default figure for an unknown GPU.
* The peer is Hugging Face ``transformers`` GPT-2 built locally from a ``GPT2Config`` with the same
  width, depth, heads, FFN, vocabulary, sequence, batch and precision, trained the way the HF
  ``Trainer`` does by default (mean loss, ``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)``).
  Its steps are interleaved with ours in the same process, so the ratio is fair on a busy machine
  even when the absolute numbers are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sab_byon_omni.config import PRESETS, ModelConfig, RunConfig, build_config
from sab_byon_omni.data.batching import IGNORE_INDEX, Batch, collate
from sab_byon_omni.data.tokenizers import Char96Tokenizer
from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import matmul_params, train_flops_per_token
from sab_byon_omni.model.generate import generate_tokens
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.precision import DTYPES, Precision, cpu_has_native_bf16, make_precision, resolve_device
from sab_byon_omni.training.trainer import Trainer, peak_memory_mb

log = logging.getLogger(__name__)

# Dense (no sparsity) matmul peaks in TFLOP/s from the vendors' data sheets, keyed by a substring of
# ``torch.cuda.get_device_name()``; the first match wins, so more specific names come first.
# "fp32" is the plain FP32 rate, "tf32" the tensor-core rate used when TF32 matmuls are allowed.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM ("H100 80GB HBM3")
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


# ------------------------------------------------------------------------------------ FLOP model
# ------------------------------------------------------------------------------------ the machine
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, budget_s: float = 1.5,
                        sizes: tuple[int, ...] = (256, 512, 1024, 2048)) -> float:
    """Best square-matmul rate (FLOP/s) of ``dtype`` on ``device``, within about ``budget_s``.

    Sizes grow while one multiply stays cheap, so a dtype that runs emulated (bf16 on a CPU
    without AVX-512-BF16/AMX) is measured on small matrices instead of stalling the run.
    """
    best = 0.0
    per_size = budget_s / len(sizes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up (and a first estimate of the cost)
        _sync(device)
        spent, single = 0.0, float("inf")
        while spent < per_size or single == float("inf"):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(device)
            dt = time.perf_counter() - t0
            spent += dt
            single = min(single, dt)
        best = max(best, 2 * n**3 / single)
        if single > per_size / 4:
            break  # the next size would take too long
    return best


def measure_read_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Best rate (bytes/s) of reading a buffer far larger than the caches (``sum`` over it), the
    ceiling for generation, where every new token reads all the weights once."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_bytes_per_token(model: nn.Module, context: float) -> float:
    """Bytes one decoding step reads: every parameter once, plus keys and values of ``context``
    cached positions in every layer (in the parameters' dtype)."""
    cfg = model.cfg
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    return weights + 2 * cfg.n_layers * context * cfg.hidden * size


def gpu_peak_tflops(name: str, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, the table row used) for a CUDA device name, or (None, why not)."""
    key = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for row, peaks in GPU_PEAK_TFLOPS.items():
        if row.lower() in name.lower():
            if key in peaks:
                return peaks[key], f"table: {row} {key}"
            return None, f"table: {row} has no {key} figure"
    return None, f"{name!r} is not in the peak table"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags_summary() -> str:
    """The SIMD/matrix extensions that decide CPU matmul speed, as listed in /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() if device.type == "cpu" else device.type


# ------------------------------------------------------------------------------------ steps
@dataclass
class BenchOptions:
    """What to benchmark; mirrors ``sab-omni bench``'s flags."""

    preset: str = "lightweight"
    seq_len: int = 1024
    batch_size: int = 4
    precision: str = "auto"
    steps: int = 3
    warmup: int = 1
    vocab_size: int = 96
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    compare: str | None = None
    peak_tflops: float | None = None
    threads: int | None = None
    seed: int = 1234


def run_config(opts: BenchOptions, checkpoint_dir: str) -> RunConfig:
    """The RunConfig ``sab-omni train`` would use for these options (one micro-batch per step)."""
    if opts.preset not in PRESETS:
        raise SabError(f"--preset={opts.preset!r} is not one of: {', '.join(PRESETS)}")
    for name in ("seq_len", "batch_size", "steps", "vocab_size"):
        if getattr(opts, name) < 1:
            raise SabError(f"--{name.replace('_', '-')}={getattr(opts, name)} must be at least 1")
    if opts.seq_len < 2:
        raise SabError(f"--seq-len={opts.seq_len} must be at least 2 (one input and one target)")
    if opts.warmup < 0:
        raise SabError(f"--warmup={opts.warmup} must not be negative")
    if opts.threads is not None and opts.threads < 1:
        raise SabError(f"--threads={opts.threads} must be at least 1")
    if opts.peak_tflops is not None and not opts.peak_tflops > 0:
        raise SabError(f"--peak-tflops={opts.peak_tflops} must be positive")
    max_len = PRESETS[opts.preset]["max_seq_len"]
    if opts.seq_len > max_len:
        raise SabError(f"--seq-len={opts.seq_len} exceeds the {opts.preset} preset's max_seq_len={max_len}")
    return build_config({
        "model": {"preset": opts.preset, "vocab_size": opts.vocab_size,
                  "activation_checkpointing": opts.activation_checkpointing},
        "data": {"seq_len": opts.seq_len},
        "train": {"batch_size": opts.batch_size, "gradient_accumulation_steps": 1, "precision": opts.precision,
                  "device": opts.device, "compile": opts.compile, "checkpoint_dir": checkpoint_dir,
                  "progress": False, "seed": opts.seed},
    }, source="bench")


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> Batch:
    """Full-length rows of random non-padding ids (every position is a real token)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, vocab_size, seq_len, dtype=np.int64) for _ in range(batch_size)]
    return collate(rows, pad_id=0)


class OursStep:
    """One optimizer step of this package's Trainer on a fixed batch."""

    def __init__(self, cfg: RunConfig, batch: Batch) -> None:
        torch.manual_seed(cfg.train.seed)
        model = CausalTransformer(cfg.model)
        rows = [r.numpy() for r in batch.input_ids]
        self.trainer = Trainer(model, Char96Tokenizer(), rows, None, cfg)
        self.trainer._setup()
        self.model = model
        self.window = [batch]

    def __call__(self) -> None:
        self.trainer.train_step(self.window)


def hf_gpt2_config(cfg: ModelConfig) -> Any:
    """A GPT-2 config with this model's dimensions (built locally; nothing is downloaded)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.hidden,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn, activation_function="gelu_new",
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      use_cache=False)


def build_hf_gpt2(cfg: ModelConfig) -> nn.Module:
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise SabError("--compare hf needs Hugging Face transformers: pip install 'sab-byon-omni[bench]'") from None
    transformers.utils.logging.set_verbosity_error()
    return GPT2LMHeadModel._from_config(hf_gpt2_config(cfg), attn_implementation="sdpa")


class HFStep:
    """One step of HF GPT-2 the way the HF Trainer runs it by default."""

    def __init__(self, cfg: RunConfig, batch: Batch, precision: Precision) -> None:
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        self.model = build_hf_gpt2(cfg.model).to(precision.device).train()
        fused = precision.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                           weight_decay=t.weight_decay, fused=fused or None)
        self.scaler = precision.scaler()
        self.precision, self.max_norm = precision, t.max_grad_norm
        self.batch = batch.to(precision.device)

    def __call__(self) -> None:
        with self.precision.autocast():
            loss = self.model(input_ids=self.batch.input_ids, labels=self.batch.labels).loss
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _interleave(runners: dict[str, Callable[[], Any]], steps: int, device: torch.device) -> dict[str, list[float]]:
    """``steps`` timed calls of each runner, alternating which goes first (ABBA) so that a slow
    spell on a shared machine hits both."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(_timed(runners[name], device))
    return times


# ------------------------------------------------------------------------------------ benchmarks
@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _peak(precision: str, device: torch.device, override: float | None,
          measure: bool = True) -> tuple[float | None, str]:
    """Peak TFLOP/s for MFU and where it came from."""
    if override is not None:
        return override, "user (--peak-tflops)"
    if device.type == "cuda":
        return gpu_peak_tflops(device_name(device), precision)
    if not measure:
        return None, "not measured"
    return measure_matmul_peak(DTYPES[precision], device) / 1e12, f"measured {precision} matmul, this run"


def _machine(device: torch.device, precision: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "device_name": device_name(device),
                            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cpu":
        info["cpu_flags"] = cpu_flags_summary()
        info["cpu_native_bf16"] = cpu_has_native_bf16()
    return info


def run_train_bench(opts: BenchOptions) -> dict[str, Any]:
    """Time ``opts.steps`` training steps (after ``opts.warmup``) and return a flat result dict."""
    with tempfile.TemporaryDirectory(prefix="sab_bench_") as tmp, _threads(opts.threads):
        cfg = run_config(opts, os.path.join(tmp, "ckpt"))
        device = resolve_device(opts.device)
        precision = make_precision(opts.precision, device)
        if device.type == "cpu" and precision.name != "fp32" and not cpu_has_native_bf16():
            log.warning("this CPU has no native bf16/fp16 matmul (no AVX-512-BF16 or AMX): %s runs emulated and "
                        "far slower than fp32", precision.name)
        batch = random_batch(opts.batch_size, opts.seq_len, opts.vocab_size, opts.seed)
        tokens = opts.batch_size * opts.seq_len
        flops_tok = train_flops_per_token(cfg.model, opts.seq_len)
        peak_a, peak_src = _peak(precision.name, device, opts.peak_tflops)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours = OursStep(cfg, batch)
        first = _timed(ours, device) if opts.warmup else None
        for _ in range(max(opts.warmup - 1, 0)):
            _timed(ours, device)
        # Memory now, before any peer exists: optimizer state, gradients and activations have peaked.
        memory = peak_memory_mb(device)
        runners: dict[str, Callable[[], Any]] = {"ours": ours}
        if opts.compare == "hf":
            hf = HFStep(cfg, batch, precision)
            for _ in range(opts.warmup):
                _timed(hf, device)
            runners["hf"] = hf
        times = _interleave(runners, opts.steps, device)
        peak_b, _ = _peak(precision.name, device, opts.peak_tflops)
        peak = max(p for p in (peak_a, peak_b) if p is not None) if peak_a is not None else None

        def summary(name: str) -> dict[str, Any]:
            step_s = statistics.median(times[name])
            tps = tokens / step_s
            tflops = tps * flops_tok / 1e12
            return {"step_s": step_s, "step_times_s": times[name], "tokens_per_s": tps, "tflops": tflops,
                    "mfu": tflops / peak if peak else None}

        n_params = ours.model.num_parameters()
        result: dict[str, Any] = {
            "mode": "train", "preset": opts.preset, "params": n_params, "matmul_params": matmul_params(cfg.model),
            "vocab_size": opts.vocab_size, "seq_len": opts.seq_len, "batch_size": opts.batch_size,
            "precision": precision.name, "compile": opts.compile,
            "activation_checkpointing": opts.activation_checkpointing, "optimizer": _optimizer_kind(ours),
            "steps": opts.steps, "warmup": opts.warmup, **_machine(device, precision.name),
            "flops_per_token": flops_tok, "peak_tflops": peak, "peak_source": peak_src,
            **summary("ours"),
            "peak_memory_mb": memory,
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
            "first_step_s": first,
        }
        if opts.compile and first is not None:
            result["compile_s"] = max(first - result["step_s"], 0.0)
        if "hf" in times:
            hf_sum = summary("hf")
            result.update({f"hf_{k}": v for k, v in hf_sum.items()})
            result["hf_params"] = sum(p.numel() for p in runners["hf"].model.parameters())
            result["ratio_vs_hf"] = result["tokens_per_s"] / hf_sum["tokens_per_s"]
        return result


def run_epoch_bench(config: str | None, overrides: dict[str, Any], steps: int, warmup: int,
                    threads: int | None = None, peak_tflops: float | None = None) -> dict[str, Any]:
    """Time optimizer steps of a real job (its config, data, batching and accumulation) and project
    the first epoch's time against its matmul bound: the epoch's real tokens x FLOPs per token /
    the measured matmul peak. The steps timed are the epoch's first ``warmup + steps`` windows."""
    from sab_byon_omni.config import load_config
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.data.factory import load_datasets

    if steps < 1 or warmup < 0:
        raise SabError(f"--steps={steps} must be at least 1 and --warmup={warmup} not negative")
    with tempfile.TemporaryDirectory(prefix="sab_bench_") as tmp, _threads(threads):
        cfg = load_config(config, {**overrides, "train.checkpoint_dir": os.path.join(tmp, "ckpt"),
                                   "train.resume": "none", "train.progress": "false"})
        tokenizer, train, _ = load_datasets(cfg.data)
        sab = SABTranscendentV2(config=cfg, tokenizer=tokenizer)
        trainer = Trainer(sab.model, tokenizer, train, None, sab.config)
        trainer._setup()
        t, d = sab.config.train, sab.config.data
        if trainer.info.enabled:
            raise SabError("--mode epoch runs in one process")
        batches = list(trainer.epoch_batches(0))
        windows = [batches[i:i + t.gradient_accumulation_steps]
                   for i in range(0, len(batches), t.gradient_accumulation_steps)]
        if warmup + steps > len(windows):
            raise SabError(f"--warmup + --steps = {warmup + steps} exceeds the epoch's {len(windows)} optimizer steps")

        def real(ws: list[list[Batch]]) -> int:  # non-padding input positions
            return sum(int((b.labels != IGNORE_INDEX).sum()) for w in ws for b in w)

        def positions(ws: list[list[Batch]]) -> int:
            return sum(b.input_ids.numel() for w in ws for b in w)

        device, precision = trainer.device, trainer.precision
        peak_a, peak_src = _peak(precision.name, device, peak_tflops)
        for w in windows[:warmup]:
            _timed(lambda w=w: trainer.train_step(w), device)
        timed = windows[warmup:warmup + steps]
        seconds = sum(_timed(lambda w=w: trainer.train_step(w), device) for w in timed)
        peak_b, _ = _peak(precision.name, device, peak_tflops)
        peak = max(peak_a, peak_b) if peak_a is not None and peak_b is not None else (peak_a or peak_b)
        epoch_real, timed_real = real(windows), real(timed)
        mean_len = epoch_real / sum(b.input_ids.shape[0] for w in windows for b in w)
        flops_tok = train_flops_per_token(sab.config.model, round(mean_len))
        tps = timed_real / seconds
        result: dict[str, Any] = {
            "mode": "epoch", "config": config or "(defaults)", "preset": sab.config.model.preset,
            "precision": precision.name, "batch_size": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "length_bucketing": d.length_bucketing,
            **_machine(device, precision.name),
            "optimizer_steps_per_epoch": len(windows), "steps": steps, "warmup": warmup,
            "epoch_real_tokens": epoch_real, "epoch_positions": positions(windows), "mean_sample_len": mean_len,
            "flops_per_token": flops_tok, "peak_tflops": peak, "peak_source": peak_src,
            "tokens_per_s": tps, "timed_s": seconds, "epoch_s": epoch_real / tps,
            "mfu": tps * flops_tok / (peak * 1e12) if peak else None,
        }
        result["bound_s"] = epoch_real * flops_tok / (peak * 1e12) if peak else None
        result["epoch_over_bound"] = result["epoch_s"] / result["bound_s"] if peak else None
        return result


def _optimizer_kind(ours: OursStep) -> str:
    d = ours.trainer.optimizer.defaults
    return "AdamW fused" if d.get("fused") else ("AdamW foreach" if d.get("foreach") else "AdamW for-loop")


def run_generate_bench(opts: BenchOptions, prompt_len: int = 64, new_tokens: int = 128) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` after a random prompt, batch 1, with the KV cache; the
    peer is HF ``generate`` (its default dynamic cache) on a GPT-2 of the same dimensions."""
    if prompt_len < 1 or new_tokens < 1:
        raise SabError("--prompt-len and --new-tokens must be at least 1")
    if opts.preset not in PRESETS:
        raise SabError(f"--preset={opts.preset!r} is not one of: {', '.join(PRESETS)}")
    max_len = PRESETS[opts.preset]["max_seq_len"]
    if prompt_len + new_tokens > max_len:
        raise SabError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the {opts.preset} "
                       f"preset's max_seq_len={max_len}")
    opts = dataclasses.replace(opts, seq_len=max(prompt_len + new_tokens, 2))
    with tempfile.TemporaryDirectory(prefix="sab_bench_") as tmp, _threads(opts.threads):
        cfg = run_config(opts, os.path.join(tmp, "ckpt"))
        device = resolve_device(opts.device)
        precision = make_precision(opts.precision, device)
        torch.manual_seed(opts.seed)
        ours = CausalTransformer(cfg.model).to(device).eval()
        prompt = random_batch(1, prompt_len, opts.vocab_size, opts.seed).input_ids.to(device)

        def run_ours() -> None:
            with precision.autocast():
                n = sum(1 for _ in generate_tokens(ours, prompt[0].tolist(), max_new_tokens=new_tokens, temperature=0))
            assert n == new_tokens

        runners: dict[str, Callable[[], Any]] = {"ours": run_ours}
        if opts.compare == "hf":
            hf = build_hf_gpt2(cfg.model).to(device).eval()
            hf.generation_config.pad_token_id = 0

            @torch.no_grad()
            def run_hf() -> None:
                with precision.autocast():
                    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True)
                assert out.shape[1] == prompt_len + new_tokens

            runners["hf"] = run_hf
        for _ in range(opts.warmup):
            for fn in runners.values():
                _timed(fn, device)
        times = _interleave(runners, opts.steps, device)
        bandwidth = measure_read_bandwidth(device)
        bytes_tok = decode_bytes_per_token(ours, prompt_len + new_tokens / 2)
        result: dict[str, Any] = {
            "mode": "generate", "preset": opts.preset, "params": ours.num_parameters(), "vocab_size": opts.vocab_size,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": 1, "precision": precision.name,
            "steps": opts.steps, "warmup": opts.warmup, **_machine(device, precision.name),
            "bytes_per_token": bytes_tok, "read_bandwidth_gbs": bandwidth / 1e9,
            "seconds": statistics.median(times["ours"]),
        }

        def rates(prefix: str, seconds: float) -> None:
            tps = new_tokens / seconds
            result[f"{prefix}tokens_per_s"] = tps
            result[f"{prefix}gbs"] = tps * bytes_tok / 1e9  # prefill time included: a lower bound
            result[f"{prefix}mbu"] = tps * bytes_tok / bandwidth

        rates("", result["seconds"])
        if "hf" in times:
            result["hf_seconds"] = statistics.median(times["hf"])
            rates("hf_", result["hf_seconds"])
            result["ratio_vs_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
        return result


# ------------------------------------------------------------------------------------ report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(r: dict[str, Any]) -> str:
    """A Markdown table (one row per model) and the setup it was measured on."""
    where = f"{r['device_name']} ({r['device']}, {r['threads']} thread{'' if r['threads'] == 1 else 's'}"
    where += f", {r['cpu_flags']})" if "cpu_flags" in r else ")"
    if r["mode"] == "epoch":
        return "\n".join([
            f"one epoch of {r['config']}: {r['preset']}, batch {r['batch_size']} x accumulation "
            f"{r['gradient_accumulation_steps']}, {r['precision']}, length bucketing {r['length_bucketing']}; {where}",
            f"{r['optimizer_steps_per_epoch']} optimizer steps, {r['epoch_real_tokens']:,} real tokens in "
            f"{r['epoch_positions']:,} positions ({100 * (r['epoch_positions'] / r['epoch_real_tokens'] - 1):.1f}% "
            f"padding), mean sample {r['mean_sample_len']:.1f} tokens, {r['flops_per_token'] / 1e6:.1f} MFLOP per "
            f"token; peak {_fmt(r['peak_tflops'], '.3g')} TFLOP/s ({r['peak_source']})",
            "", "| real tokens/s | MFU | epoch s (projected) | matmul bound s | epoch / bound |",
            "|---:|---:|---:|---:|---:|",
            f"| {r['tokens_per_s']:,.0f} | {_pct(r['mfu'])} | {r['epoch_s']:,.0f} | {_fmt(r['bound_s'], ',.0f')} | "
            f"{_fmt(r['epoch_over_bound'], '.2f')}x |",
            "", f"{r['steps']} optimizer step(s) timed after {r['warmup']} warm-up ({r['timed_s']:.1f} s); the epoch "
            "is projected from their real tokens/s"])
    if r["mode"] == "generate":
        lines = [f"generation: {r['preset']} ({r['params'] / 1e6:.1f}M params), vocab {r['vocab_size']}, prompt "
                 f"{r['prompt_len']} + {r['new_tokens']} new tokens, batch 1, greedy, {r['precision']}; {where}",
                 f"each new token reads {r['bytes_per_token'] / 1e6:.1f} MB (weights + KV cache); read bandwidth "
                 f"{r['read_bandwidth_gbs']:.1f} GB/s (measured, this run); MBU = achieved / measured bandwidth",
                 "", "| model | new tokens/s | seconds | GB/s | MBU |", "|---|---:|---:|---:|---:|",
                 f"| sab-byon-omni (KV cache) | {r['tokens_per_s']:,.1f} | {r['seconds']:.2f} | {r['gbs']:.1f} | "
                 f"{_pct(r['mbu'])} |"]
        if "hf_tokens_per_s" in r:
            lines.append(f"| HF GPT-2 generate | {r['hf_tokens_per_s']:,.1f} | {r['hf_seconds']:.2f} | "
                         f"{r['hf_gbs']:.1f} | {_pct(r['hf_mbu'])} |")
            lines += ["", f"ratio (ours / HF): {r['ratio_vs_hf']:.2f}x, median of {r['steps']} interleaved runs"]
        return "\n".join(lines)
    lines = [
        f"training step: {r['preset']} ({r['params'] / 1e6:.1f}M params), vocab {r['vocab_size']}, batch "
        f"{r['batch_size']} x {r['seq_len']}, {r['precision']}, {r['optimizer']}, "
        f"compile {'on' if r['compile'] else 'off'}, "
        f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}; {where}",
        f"FLOPs per token: {r['flops_per_token'] / 1e6:.1f} M (6 x {r['matmul_params'] / 1e6:.2f}M matmul weights "
        f"+ 12 x layers x seq_len x hidden); peak {_fmt(r['peak_tflops'], '.3g')} TFLOP/s ({r['peak_source']})",
        "",
        "| model | tokens/s | step s | TFLOP/s | MFU | peak memory MB |",
        "|---|---:|---:|---:|---:|---:|",
        f"| sab-byon-omni | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['tflops']:.3g} | "
        f"{_pct(r['mfu'])} | {r['peak_memory_mb']:,.0f} ({r['memory_kind']}) |",
    ]
    if "hf_tokens_per_s" in r:
        lines.append(f"| HF GPT-2 ({r['hf_params'] / 1e6:.1f}M params) | {r['hf_tokens_per_s']:,.0f} | "
                     f"{r['hf_step_s']:.2f} | {r['hf_tflops']:.3g} | {_pct(r['hf_mfu'])} | - |")
    lines.append("")
    lines.append(f"median of {r['steps']} timed step(s) after {r['warmup']} warm-up"
                 + (f"; first step {r['first_step_s']:.1f} s" if r.get("first_step_s") else "")
                 + (f", compile about {r['compile_s']:.1f} s" if "compile_s" in r else ""))
    if "ratio_vs_hf" in r:
        lines.append(f"ratio (ours / HF tokens/s): {r['ratio_vs_hf']:.2f}x, steps interleaved in one process")
    return "\n".join(lines)
