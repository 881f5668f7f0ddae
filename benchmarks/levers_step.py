"""Levers measured on whole training steps (the Trainer's own, or the plain reference's), each
variant interleaved with the others in one process. Used by ``benchmarks/levers.py``; run from the
repository root, e.g. ``python benchmarks/levers.py memory_saving``.

On a shared machine, ``--threads 1 --clock cpu`` times each variant by the process's CPU time,
which other processes' load does not inflate (with 2 threads CPU time would count OpenMP's spinning).
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sab_byon_omni.benchmark.common import BenchOptions, random_batch
from sab_byon_omni.benchmark.peers import PEER_STEPS
from sab_byon_omni.benchmark.train import OursStep
from sab_byon_omni.config import load_config, replace
from sab_byon_omni.data.batching import IGNORE_INDEX, Batch
from sab_byon_omni.device import make_precision
from sab_byon_omni.estimate import matmul_params, train_flops_per_token
from sab_byon_omni.machine import cpu_flags_summary, cpu_has_native_bf16, measure_matmul_peak
from sab_byon_omni.training.trainer import Trainer

Interleave = Callable[[dict[str, Callable[[], object]], int], dict[str, float]]


def ours_step(batch: int, seq: int, precision: str = "fp32", saving: bool = False, preset: str = "lightweight",
              **train: object) -> OursStep:
    opts = BenchOptions.for_preset(preset, seq_len=seq, batch_size=batch, precision=precision)
    step = OursStep(replace(opts.run, checkpoint_dir=tempfile.mkdtemp(prefix="sab_lever_"), **train),
                    random_batch(batch, seq, 96, 0))
    step.model.set_memory_saving(saving)
    return step


def bench_memory_saving(interleave: Interleave, reps: int, batch: int = 4, seq: int = 1024) -> None:
    """The Trainer's step with memory saving off (the plan's choice when the run fits) and on."""
    steps = {"memory saving off": ours_step(batch, seq), "memory saving on": ours_step(batch, seq, saving=True)}
    interleave(steps, reps)


_ALLOC_CHILD = """
import json, resource, statistics, sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
from levers_step import ours_step, plain_step
step = plain_step({batch}, {seq}) if {which!r} == "plain" else ours_step({batch}, {seq}, saving={which!r} == "saving")
step()
times, faults = [], []
for _ in range({steps}):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps([statistics.median(times), statistics.median(faults), peak]))
"""


def plain_step(batch: int, seq: int) -> Callable[[], None]:
    """The plain reference GPT's step (``bench --compare minimal``) at Lightweight's dimensions."""
    cfg = BenchOptions.for_preset("lightweight", seq_len=seq, batch_size=batch, precision="fp32").run
    return PEER_STEPS["minimal"](cfg, random_batch(batch, seq, 96, 0), make_precision("fp32", torch.device("cpu")))


# glibc's malloc keeping freed memory for the next step (read by glibc when a process starts; the
# package never changes it: docs/TRAINING.md, "The C allocator"). MALLOC_MMAP_MAX_=0
# MALLOC_TRIM_THRESHOLD_=2147483647 are the older spelling of the same two settings.
KEEP_FREED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"}


def bench_allocator(interleave: Interleave, reps: int, batch: int = 4, seq: int = 1024, steps: int = 3) -> None:
    """Whole steps, each variant in processes of its own (glibc reads its malloc settings when a
    process starts), alternating: ours with glibc's default, ours with freed memory kept in glibc's
    heap (:data:`KEEP_FREED` in the child's environment), the plain reference GPT (glibc's default),
    and ours with memory saving on (what the plan does when memory is short). Median step time,
    page faults per step, peak RSS."""
    import json
    import os
    import statistics
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    variants = {"ours, glibc's default": ("ours", {}), "ours, freed memory kept (GLIBC_TUNABLES)": ("ours", KEEP_FREED),
                "plain reference (glibc's default)": ("plain", {}), "ours, memory saving on": ("saving", {})}
    rows: dict[str, list[list[float]]] = {k: [] for k in variants}
    for i in range(max(reps, 2)):
        for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            which, env = variants[name]
            code = _ALLOC_CHILD.format(here=os.path.dirname(os.path.abspath(__file__)), threads=torch.get_num_threads(),
                                       batch=batch, seq=seq, steps=steps, which=which)
            out = subprocess.run([sys.executable, "-c", code], env={**base, **env},
                                 capture_output=True, text=True, check=True)
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    last = statistics.median(r[0] for r in rows["plain reference (glibc's default)"])
    rss = max(r[2] for r in rows["plain reference (glibc's default)"])
    for name, rs in rows.items():
        t, peak = statistics.median(r[0] for r in rs), max(r[2] for r in rs)
        print(f"{name:42s} step {t:7.2f} s ({last / t:5.3f}x the plain's speed)   page faults per step "
              f"{statistics.median(r[1] for r in rs):9,.0f}   peak RSS {peak:7,.0f} MB ({peak / rss:5.3f}x the plain's)")


def bench_muon(interleave: Interleave, reps: int, batch: int = 16, seq: int = 128) -> None:
    """What Muon costs. First its Newton-Schulz iterations alone, one optimizer step's worth for
    each preset's matrices (``muon_matrices``, qkv as 3 blocks): fp32 and bf16, one call per matrix,
    the optimizer's batches (``orthogonalize_all``: same-shape matrices stacked up to the device's
    ``BATCH_ELEMENTS``) and one call per shape. Then the Trainer's whole step, preset small (the
    learning benchmark's model and, by default, its 16 x 128-token step), with AdamW and with Muon +
    AdamW in fp32 and in bf16 Newton-Schulz. Muon's work per matrix does not grow with the batch:
    try ``--batch 16 --seq 1024`` too."""
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.model.transformer import CausalTransformer
    from sab_byon_omni.training.muon import orthogonalize, orthogonalize_all, orthogonalize_stacked, shape_batches

    print(f"CPU: {cpu_flags_summary()}; native bf16: {cpu_has_native_bf16()}")
    for preset in ("tiny", "small", "lightweight"):
        model = CausalTransformer(ModelConfig.from_name(preset, vocab_size=96))
        g = torch.Generator().manual_seed(0)
        mats = [torch.randn(k, p.shape[0] // k, p.shape[1], generator=g) for p, k in model.muon_matrices()]
        print(f"\n{preset}: Newton-Schulz of one step, {len(mats)} matrices, {sum(m.numel() for m in mats):,} weights")
        whole = shape_batches([(m.device, m.dtype, *m.shape) for m in mats], max_elements=1 << 40)
        variants = {}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            variants[f"{name}, per matrix"] = lambda d=dtype: [orthogonalize(m, dtype=d) for m in mats]
            variants[f"{name}, batched (the optimizer's)"] = lambda d=dtype: orthogonalize_all(mats, dtype=d)
            variants[f"{name}, one call per shape"] = lambda d=dtype: [
                orthogonalize_stacked([mats[i] for i in b], d) for b in whole]
        interleave(variants, reps)
    print(f"\nthe Trainer's step, small, {batch} x {seq}")
    steps = {"AdamW": ours_step(batch, seq, preset="small")}
    for dtype in (torch.float32, torch.bfloat16):
        step = ours_step(batch, seq, preset="small", optimizer="muon")
        step.trainer.run.optimizer.muon.ns_dtype = dtype
        steps[f"Muon + AdamW, {str(dtype).removeprefix('torch.')} Newton-Schulz"] = step
    interleave(steps, reps)


def default_job(windows: int) -> tuple[Trainer, list[list[Batch]]]:
    """The Trainer of configs/default.yaml (set up as ``sab-omni train`` would) and its first
    ``windows`` accumulation windows."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.data.factory import load_datasets
    from sab_byon_omni.training.build import build_run

    cfg = load_config("configs/default.yaml", {"train.checkpoint_dir": tempfile.mkdtemp(prefix="sab_lever_") + "/c",
                                               "train.progress": "false", "train.resume": "none"})
    tok, train, _ = load_datasets(cfg.data)
    sab = SABTranscendentV2(config=cfg, tokenizer=tok)
    trainer = Trainer(build_run(sab.model, tok, train, None, sab.config))
    batches = list(trainer.epoch_batches(0))
    per = cfg.train.gradient_accumulation_steps
    return trainer, [batches[i:i + per] for i in range(0, per * windows, per)]


def bench_regroup(interleave: Interleave, reps: int, windows: int = 2, **_: int) -> None:
    """The default job's first optimizer steps (configs/default.yaml): the configured 16 micro-batches
    of 4 against the plan's regrouping (and two other pass sizes)."""
    trainer, wins = default_job(windows)
    plan = trainer.run.memory
    print(plan.describe(), f"; regrouping: up to {plan.pass_rows} rows, ~{plan.pass_positions} tokens per pass")

    def run(positions: int) -> Callable[[], None]:
        passes = (64, positions) if positions else (0, 0)
        variant = Trainer(dataclasses.replace(trainer.run, memory=dataclasses.replace(
            plan, pass_rows=passes[0], pass_positions=passes[1])))

        def fn() -> None:
            for w in wins:
                variant.run.optimizer.zero_grad(set_to_none=True)
                variant.forward_backward(w)
        return fn

    interleave({"configured (16 x 4)": run(0), "regrouped, ~512 tokens/pass": run(512),
                "regrouped, ~1024 (the plan)": run(1024), "regrouped, ~2048": run(2048)}, reps)


class _MatmulLog(TorchDispatchMode):
    """Records every matrix multiply (op, and each argument's shape and strides) that runs under it,
    autograd's backward included."""

    OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.OPS:
            self.calls.append((func, tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
                                           for a in args)))
        return func(*args, **(kwargs or {}))


def matmul_replay(step: Callable[[], object]) -> Callable[[], None]:
    """A function that runs, alone, the matrix multiplies ``step`` runs (same ops, shapes, strides and
    order, on random operands): the step's time with everything else free."""
    with _MatmulLog() as log:
        step()
    made: dict[tuple[Any, ...], torch.Tensor] = {}

    def operand(a: Any) -> Any:
        if not isinstance(a, tuple):
            return a
        if a not in made:
            made[a] = torch.empty_strided(*a).normal_()
        return made[a]

    calls = [(op, [operand(a) for a in args]) for op, args in log.calls]

    def replay() -> None:
        for op, args in calls:
            op(*args)
    return replay


def bench_matmul_floor(interleave: Interleave, reps: int, windows: int = 1, **_: int) -> None:
    """The default job's optimizer step against the same matrix multiplies run alone, and against
    its matmul bound (FLOPs / the fp32 peak measured now): how much of the gap to the bound is the
    matmul kernels on these shapes, and how much everything else."""
    trainer, wins = default_job(windows)

    def step() -> None:
        for w in wins:
            trainer.train_step(w)
    step()
    replay = matmul_replay(step)
    times = interleave({"optimizer step(s) of the default job": step, "their matmuls alone": replay}, reps)
    real = sum(int((b.labels != IGNORE_INDEX).sum()) for w in wins for b in w)
    mean = real / sum(b.input_ids.shape[0] for w in wins for b in w)
    top = measure_matmul_peak(torch.float32, torch.device("cpu"))
    bound = real * train_flops_per_token(trainer.run.cfg.model, round(mean)) / top
    s, m = times["optimizer step(s) of the default job"], times["their matmuls alone"]
    print(f"{real:,} real tokens; matmul bound {bound:.2f} s at the fp32 peak measured now ({top / 1e12:.3g} "
          f"TFLOP/s): step / bound {s / bound:.2f}x = matmuls alone / bound {m / bound:.2f}x "
          f"x step / matmuls alone {s / m:.2f}x")


def bench_compile_block(interleave: Interleave, reps: int, batch: int = 4, seq: int = 1024) -> None:
    """torch.compile of each block only (the head, loss and optimizer stay eager); compile time apart."""
    eager, compiled = ours_step(batch, seq), ours_step(batch, seq)
    for block in compiled.model.blocks:
        block.compile()
    t0 = time.perf_counter()
    compiled()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    eager()
    plain = time.perf_counter() - t0
    print(f"first compiled step {first:.1f} s, an eager step {plain:.1f} s: compile about {first - plain:.1f} s")
    interleave({"eager": eager, "blocks compiled": compiled}, reps)


def bench_bf16(interleave: Interleave, reps: int, batch: int = 4, seq: int = 1024) -> None:
    """bf16 autocast against fp32, only where the CPU has native bf16 (AVX-512-BF16 or AMX)."""
    print(f"CPU flags: {cpu_flags_summary()}; native bf16: {cpu_has_native_bf16()}")
    cpu = torch.device("cpu")
    fp32, bf16 = (measure_matmul_peak(d, cpu, budget_s=1.0) / 1e9 for d in (torch.float32, torch.bfloat16))
    print(f"square matmul peak: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s ({bf16 / fp32:.3f}x)")
    if not cpu_has_native_bf16():
        print("no AVX-512-BF16/AMX here: bf16 runs emulated, so the bf16 step figure waits for a CPU that has them")
        return
    interleave({"fp32": ours_step(batch, seq), "bf16 autocast": ours_step(batch, seq, "bf16")}, reps)


# ------------------------------------------------------------------------------- the profile
CATEGORIES = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm")), ("attention", ("flash_attention",)),
              ("gelu", ("gelu",)), ("norm", ("layer_norm",)), ("rope", ("aten::cat", "addcmul", "roll")),
              ("optimizer", ("adam", "sqrt", "lerp", "addcdiv", "_foreach")),
              ("loss", ("log_softmax", "nll_loss")))


def category(op: str) -> str:
    return next((key for key, words in CATEGORIES if any(w in op for w in words)), "other")


def profile_steps(steps: dict[str, Callable[[], None]], reps: int) -> dict[str, collections.Counter]:
    """Seconds per op category of each step: every op call's minimum over ``reps`` interleaved
    profiled steps (a call slowed by another process in one step is fast in another)."""
    from torch.profiler import ProfilerActivity, profile

    runs: dict[str, list] = {name: [] for name in steps}
    names = list(steps)
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            runs[name].append([(e.name, e.self_cpu_time_total / 1e6) for e in prof.events()])
    out = {}
    for name, calls in runs.items():
        by: collections.Counter = collections.Counter()
        for j, (op, _) in enumerate(calls[0]):
            by[category(op)] += min(c[j][1] for c in calls if len(c) == len(calls[0]))
        out[name] = by
    return out


def bench_profile(interleave: Interleave, reps: int, batch: int = 4, seq: int = 1024) -> None:
    """torch.profiler by op category for ours (memory saving off and on) and the plain reference, and
    the ceiling of ours / plain: the plain step's time over our matmuls + attention alone."""
    cfg = BenchOptions.for_preset("lightweight", seq_len=seq, batch_size=batch, precision="fp32").run
    minimal = PEER_STEPS["minimal"](cfg, random_batch(batch, seq, 96, 0), make_precision("fp32", torch.device("cpu")))
    steps = {"ours": ours_step(batch, seq), "ours, memory saving": ours_step(batch, seq, saving=True),
             "plain reference": minimal}
    for s in steps.values():
        s()
    cats = profile_steps(steps, max(reps, 3))
    print(f"{'seconds per step':24s}" + "".join(f"{n:>22s}" for n in steps))
    for key in [k for k, _ in CATEGORIES] + ["other"]:
        print(f"{key:24s}" + "".join(f"{cats[n][key]:22.3f}" for n in steps))
    total = {n: sum(c.values()) for n, c in cats.items()}
    print(f"{'total':24s}" + "".join(f"{total[n]:22.3f}" for n in steps))
    shared = cats["ours"]["matmul"] + cats["ours"]["attention"]
    flops = train_flops_per_token(cfg.model, seq) * batch * seq
    top = measure_matmul_peak(torch.float32, torch.device("cpu")) / 1e12
    print(f"ours / plain: {total['plain reference'] / total['ours']:.3f}x; ceiling with everything but our matmuls "
          f"and attention free: {total['plain reference'] / shared:.3f}x")
    print(f"MFU (peak {top:.3g} TFLOP/s measured now): ours {flops / total['ours'] / top / 1e12:.1%} in the profile, "
          f"{flops / shared / top / 1e12:.1%} with everything but matmuls and attention free; our matmuls alone ran "
          f"at {6 * matmul_params(cfg.model) * batch * seq / cats['ours']['matmul'] / top / 1e12:.1%} of the peak")
