"""Levers measured on whole training steps (the Trainer's own, or the plain reference's), each
variant interleaved with the others in one process. Used by ``benchmarks/levers.py``; run from the
repository root, e.g. ``python benchmarks/levers.py memory_saving``.

On a shared machine, ``--threads 1 --clock cpu`` times each variant by the process's CPU time,
which other processes' load does not inflate (with 2 threads CPU time would count OpenMP's spinning).
"""

from __future__ import annotations

import collections
import tempfile
import time
from collections.abc import Callable

import torch

from sab_byon_omni.benchmark.common import BenchOptions, random_batch
from sab_byon_omni.benchmark.peers import PEER_STEPS
from sab_byon_omni.benchmark.train import OursStep
from sab_byon_omni.config import load_config, replace
from sab_byon_omni.device import make_precision
from sab_byon_omni.estimate import matmul_params, train_flops_per_token
from sab_byon_omni.machine import cpu_flags_summary, cpu_has_native_bf16, measure_matmul_peak

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


def bench_muon(interleave: Interleave, reps: int, batch: int = 16, seq: int = 128) -> None:
    """The Trainer's whole step with AdamW and with Muon for the blocks' matrices, preset small
    (the learning benchmark's model and, by default, its 16 x 128-token step). Muon's Newton-Schulz
    work per matrix does not grow with the batch: try ``--batch 16 --seq 1024`` too."""
    steps = {f"AdamW, small, {batch} x {seq}": ours_step(batch, seq, preset="small"),
             f"Muon + AdamW, small, {batch} x {seq}": ours_step(batch, seq, preset="small", optimizer="muon")}
    interleave(steps, reps)


def bench_regroup(interleave: Interleave, reps: int, windows: int = 2, **_: int) -> None:
    """The default job's first optimizer steps (configs/default.yaml): the configured 16 micro-batches
    of 4 against the plan's regrouping (and two other pass sizes)."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.data.factory import load_datasets
    from sab_byon_omni.training.trainer import Trainer

    cfg = load_config("configs/default.yaml", {"train.checkpoint_dir": tempfile.mkdtemp(prefix="sab_lever_") + "/c",
                                               "train.progress": "false"})
    tok, train, _ = load_datasets(cfg.data)
    trainer = Trainer(SABTranscendentV2(config=cfg, tokenizer=tok).model, tok, train, None, cfg)
    trainer.setup()
    plan = trainer.run.memory
    print(plan.describe(), f"; regrouping: up to {plan.pass_rows} rows, ~{plan.pass_positions} tokens per pass")
    batches = list(trainer.epoch_batches(0))
    per = cfg.train.gradient_accumulation_steps
    wins = [batches[i:i + per] for i in range(0, per * windows, per)]

    def run(positions: int) -> Callable[[], None]:
        def fn() -> None:
            plan.pass_rows, plan.pass_positions = (64, positions) if positions else (0, 0)
            for w in wins:
                trainer.optimizer.zero_grad(set_to_none=True)
                trainer.forward_backward(w)
        return fn

    interleave({"configured (16 x 4)": run(0), "regrouped, ~512 tokens/pass": run(512),
                "regrouped, ~1024 (the plan)": run(1024), "regrouped, ~2048": run(2048)}, reps)


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
