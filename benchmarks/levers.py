"""Micro-benchmarks of the speed levers named in issues 5 and 15, each variant interleaved with the
others in one process (so a busy machine slows all of them alike). Run from the repository root:

    python benchmarks/levers.py optimizer     # AdamW for-loop vs foreach vs fused, Lightweight params
    python benchmarks/levers.py sdpa          # SDPA backends on CPU (flash vs math), strided vs contiguous q/k/v
    python benchmarks/levers.py rope          # rotary embedding: textbook, roll + addcmul, q and k at once, compiled
    python benchmarks/levers.py qkv           # one fused qkv projection vs three, forward + backward
    python benchmarks/levers.py mlp           # the MLP: GELU kept vs recomputed vs torch.compile'd vs exact GELU
    python benchmarks/levers.py norm          # LayerNorm without (ours) and with a bias
    python benchmarks/levers.py threads       # a Lightweight training step with 1 vs 2 intra-op threads
    python benchmarks/levers.py vocab         # head + loss with vocab 96 vs 128 (padded to 64)
    python benchmarks/levers.py head_loss     # SmolLM2's head + loss: linear then cross_entropy vs linear_cross_entropy
    python benchmarks/levers.py compile       # a Lightweight step (batch 1 x 1024), eager vs torch.compile
    python benchmarks/levers.py gemv          # one-token decoding's matmuls: F.linear vs rows split over threads
    python benchmarks/levers.py decode_threads --preset small [--busy]  # sampling 64 tokens: 1 vs 2 threads
    python benchmarks/levers.py attention     # causal attention fwd + bwd: SDPA flash kernel vs chunked bmm
    python benchmarks/levers.py attention_backward  # bf16 causal attention by window length: SDPA vs fp32 backward
    python benchmarks/levers.py rmsnorm       # SmolLM2's RMSNorm for training: nn.RMSNorm vs model.ops.RMSNormCpu
    # whole training steps (benchmarks/levers_step.py):
    python benchmarks/levers.py memory_saving # the Trainer's step, memory saving off vs on (batch 4 x 1024)
    python benchmarks/levers.py allocator     # the step, freed memory kept in glibc's heap (GLIBC_TUNABLES) or not
    python benchmarks/levers.py regroup       # the default job's steps: configured micro-batches vs regrouped
    python benchmarks/levers.py matmul_floor  # the default job's step against its own matmuls alone and its bound
    python benchmarks/levers.py compile_block # torch.compile of each block only, compile time apart
    python benchmarks/levers.py bf16          # native bf16? then bf16 autocast vs fp32
    python benchmarks/levers.py profile       # torch.profiler by op category: ours vs the plain reference
    python benchmarks/levers.py muon          # Newton-Schulz fp32/bf16, per matrix/batched; the step AdamW vs Muon
    python benchmarks/levers.py muon_cost     # the bench's step with AdamW vs Muon at the recipe's batch: tiny, small, lightweight

Each prints the median seconds per call of each variant and its speed relative to the first (the
first's time / its time: above 1 is faster). ``--threads N`` sets torch's threads; ``--clock cpu``
times by the process's CPU time (robust to other processes' load with one thread);
``--batch``/``--seq`` change the step levers' shape; ``--preset`` the decoding model; ``--busy``
keeps one other core busy (a ``while True: pass`` process) while it measures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.model.transformer import CausalTransformer, apply_rope, rope_tables

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def interleave(variants: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each variant, alternating the order (ABBA); printed with ratios."""
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = clock()
            variants[name]()
            times[name].append(clock() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[names[0]]
    for name in names:
        print(f"{name:32s} {medians[name] * 1e3:10.1f} ms   {base / medians[name]:5.3f}x vs {names[0]}")
    return medians


def lightweight() -> CausalTransformer:
    return CausalTransformer(ModelConfig.from_name("lightweight", vocab_size=96))


def bench_optimizer(reps: int) -> None:
    variants = {}
    for kind in ("foreach", "fused", "for-loop"):
        model = lightweight()
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        kw = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[kind]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)
        variants[f"AdamW {kind}"] = opt.step
    interleave(variants, reps)


def bench_sdpa(reps: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = 1, 12, 1024, 64
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))

    def run(backend: SDPBackend) -> Callable[[], None]:
        def fn() -> None:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return fn

    qkv = torch.randn(b, t, 3, h, d)

    def strided(contiguous: bool) -> Callable[[], None]:
        def fn() -> None:  # q, k, v as the model makes them: views of one (B, T, 3, H, D) projection
            x = qkv.clone().requires_grad_()
            q, k, v = (y.contiguous() if contiguous else y for y in x.permute(2, 0, 3, 1, 4))
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return fn

    interleave({"flash (CPU kernel)": run(SDPBackend.FLASH_ATTENTION), "math": run(SDPBackend.MATH),
                "flash, q/k/v strided views": strided(False), "flash, q/k/v made contiguous": strided(True)}, reps)


def rope_cat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The textbook form: x * cos + cat(-x2, x1) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def bench_rope(reps: int) -> None:
    b, h, t, d = 4, 12, 1024, 64
    cos, sin_signed = rope_tables(d, t)
    sin = torch.cat([-sin_signed[:, : d // 2], sin_signed[:, d // 2:]], dim=-1)
    x = torch.randn(b, t, 3, h, d)
    ref = rope_cat(x[:, :, 0].transpose(1, 2), cos, sin)
    torch.testing.assert_close(apply_rope(x[:, :, 0].transpose(1, 2), cos, sin_signed), ref)

    def run(fn: Callable[..., torch.Tensor], table: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            xx = x.detach().requires_grad_()
            q, k = xx[:, :, 0].transpose(1, 2), xx[:, :, 1].transpose(1, 2)
            (fn(q, cos, table).sum() + fn(k, cos, table).sum()).backward()
        return step

    compiled = torch.compile(apply_rope, dynamic=False)

    def together() -> None:  # q and k in one call, on their (B, T, 2, H, D) view
        xx = x.detach().requires_grad_()
        qk = xx[:, :, :2]
        apply_rope(qk, cos[:, None, None], sin_signed[:, None, None]).sum().backward()

    t0 = time.perf_counter()
    run(compiled, sin_signed)()
    print(f"torch.compile of apply_rope: first call {time.perf_counter() - t0:.1f} s")
    interleave({"cat (textbook)": run(rope_cat, sin), "roll + addcmul (apply_rope)": run(apply_rope, sin_signed),
                "q and k in one call": together, "torch.compile(apply_rope)": run(compiled, sin_signed)}, reps)


def bench_qkv(reps: int) -> None:
    """One (h -> 3h) projection against three (h -> h), forward and backward, batch 4 x 1024."""
    x0, h = torch.randn(4, 1024, 768), 768
    fused = (torch.randn(3 * h, h) * 0.02).requires_grad_()
    parts = [(torch.randn(h, h) * 0.02).requires_grad_() for _ in range(3)]

    def run(weights: list[torch.Tensor]) -> Callable[[], None]:
        def fn() -> None:
            x = x0.clone().requires_grad_()
            sum(F.linear(x, w).sum() for w in weights).backward()
        return fn

    interleave({"one fused qkv (ours)": run([fused]), "three projections": run(parts)}, reps)


def bench_mlp(reps: int) -> None:
    """Lightweight's MLP, forward + backward, batch 4 x 1024: GELU kept for backward (memory saving off),
    recomputed in backward (on), and the whole MLP compiled by torch.compile (GELU fused)."""
    from sab_byon_omni.model.transformer import MLP

    mlp = MLP(ModelConfig.from_name("lightweight", vocab_size=96))
    x0, g = torch.randn(4, 1024, 768), torch.randn(4, 1024, 768)
    compiled = torch.compile(mlp, dynamic=False)

    def run(module: torch.nn.Module, recompute: bool) -> Callable[[], None]:
        def fn() -> None:
            mlp.recompute_gelu = recompute
            module(x0.clone().requires_grad_()).backward(g)
        return fn

    def exact() -> None:  # the textbook (erf) GELU that nanoGPT and the plain reference use, for comparison
        mlp.down(F.gelu(mlp.up(x0.clone().requires_grad_()))).backward(g)

    t0 = time.perf_counter()
    run(compiled, False)()
    print(f"torch.compile of the MLP: first call {time.perf_counter() - t0:.1f} s")
    interleave({"GELU kept (memory saving off)": run(mlp, False), "GELU recomputed (on)": run(mlp, True),
                "torch.compile(MLP)": run(compiled, False), "exact (erf) GELU, kept": exact}, reps)


def bench_norm(reps: int) -> None:
    """LayerNorm over 4 x 1024 x 768, forward + backward: weight only (ours) and weight + bias."""
    x0, g = torch.randn(4, 1024, 768), torch.randn(4, 1024, 768)
    norms = {"bias-free (ours)": torch.nn.LayerNorm(768, bias=False), "with bias": torch.nn.LayerNorm(768)}

    def run(norm: torch.nn.Module) -> Callable[[], None]:
        def fn() -> None:
            norm(x0.clone().requires_grad_()).backward(g)
        return fn

    interleave({k: run(n) for k, n in norms.items()}, reps)


def bench_threads(reps: int) -> None:
    from sab_byon_omni.loss import model_loss

    model = lightweight()
    ids = torch.randint(1, 96, (1, 1024))
    opt = torch.optim.AdamW(model.parameters(), fused=True)

    def step(n: int) -> Callable[[], None]:
        def fn() -> None:
            torch.set_num_threads(n)
            model_loss(model, ids, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    interleave({"2 threads": step(2), "1 thread": step(1)}, reps)


def bench_vocab(reps: int) -> None:
    x = torch.randn(4 * 1024, 768, requires_grad=True)
    labels = torch.randint(1, 96, (4 * 1024,))

    def run(v: int) -> Callable[[], None]:
        w = (torch.randn(v, 768) * 0.02).requires_grad_()

        def fn() -> None:
            F.cross_entropy(x @ w.t(), labels).backward()
        return fn

    interleave({"vocab 96": run(96), "vocab 128 (padded to 64)": run(128)}, reps)


def bench_head_loss(reps: int) -> None:
    """SmolLM2-135M's output head (576 -> 49,152) and its summed loss over 4 x 256 tokens, forward
    and backward, in fp32 and (where the CPU has it) bf16 autocast: ``F.linear`` then
    ``F.cross_entropy`` on fp32 logits (the textbook's and transformers' way) against the model's
    ``linear_cross_entropy``, its softmax taken 16 rows at a time, the default number, or 256."""
    from sab_byon_omni.machine import cpu_has_native_bf16
    from sab_byon_omni.model import ops

    x = torch.randn(1024, 576, requires_grad=True)
    w = (torch.randn(49152, 576) * 0.02).requires_grad_()
    labels = torch.randint(0, 49152, (1024,))

    def run(dtype: torch.dtype, rows: int | None) -> Callable[[], None]:
        def fn() -> None:
            x.grad = w.grad = None
            default, ops.head_chunk_rows = ops.head_chunk_rows, (lambda v, d: rows) if rows else ops.head_chunk_rows
            try:
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    if rows == 0:
                        loss = F.cross_entropy(F.linear(x, w).float(), labels, reduction="sum")
                    else:
                        loss = ops.linear_cross_entropy(x, w, labels)
                loss.backward()
            finally:
                ops.head_chunk_rows = default
        return fn

    print("SmolLM2-135M's head: hidden 576 -> vocabulary 49,152, 1,024 tokens (4 x 256), forward + backward")
    for dtype in (torch.float32, torch.bfloat16) if cpu_has_native_bf16() else (torch.float32,):
        print(f"{dtype}:")
        default = ops.head_chunk_rows(49152, "cpu")
        interleave({"linear + cross_entropy": run(dtype, 0), "linear_cross_entropy, 16 rows": run(dtype, 16),
                    f"linear_cross_entropy, {default} rows": run(dtype, None),
                    "linear_cross_entropy, 256 rows": run(dtype, 256)}, reps)


def bench_compile(reps: int) -> None:
    from sab_byon_omni.loss import causal_lm_loss  # the whole model compiled: its logits, then the loss

    model = lightweight()
    compiled = torch.compile(model)
    ids = torch.randint(1, 96, (1, 1024))
    opt = torch.optim.AdamW(model.parameters(), fused=True)

    def step(m: torch.nn.Module) -> Callable[[], None]:
        def fn() -> None:
            causal_lm_loss(m(ids), ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    t0 = time.perf_counter()
    step(compiled)()
    print(f"first compiled step (compile + run): {time.perf_counter() - t0:.1f} s")
    interleave({"eager": step(model), "torch.compile": step(compiled)}, reps)


def bench_gemv(reps: int) -> None:
    """Lightweight's 24 block weights times one row (a decoding step's matmuls, 170 MB of fp32)."""
    from sab_byon_omni.model.ops import linear

    model = lightweight()
    weights = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    x = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for w in weights}
    print(f"{len(weights)} weights, {sum(w.numel() for w in weights) * 4 / 1e6:.0f} MB, "
          f"{torch.get_num_threads()} threads")
    with torch.inference_mode():
        interleave({"F.linear": lambda: [F.linear(x[w.shape[1]], w) for w in weights],
                    "linear (rows split over threads)": lambda: [linear(x[w.shape[1]], w) for w in weights]}, reps)


class _ChunkedCausal(torch.autograd.Function):
    """Causal attention by query chunks of ``c`` against the keys up to each chunk's end, with
    bmm; backward recomputes the probabilities from the saved log-sum-exp (flash style)."""

    @staticmethod
    def forward(ctx, q, k, v, c):  # type: ignore[override]
        t, scale = q.shape[2], q.shape[-1] ** -0.5
        out, lse = torch.empty_like(q), torch.empty(*q.shape[:3], 1)
        tri = torch.ones(c, c, dtype=torch.bool).triu(1)
        for s0 in range(0, t, c):
            e = min(s0 + c, t)
            s = torch.matmul(q[:, :, s0:e], k[:, :, :e].transpose(-1, -2)).mul_(scale)
            s[..., s0:e].masked_fill_(tri[:e - s0, :e - s0], float("-inf"))
            lse[:, :, s0:e] = torch.logsumexp(s, -1, keepdim=True)
            out[:, :, s0:e] = torch.matmul(s.sub_(lse[:, :, s0:e]).exp_(), v[:, :, :e])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        c, t, scale = ctx.c, q.shape[2], q.shape[-1] ** -0.5
        do = do.contiguous()
        delta = (do * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        tri = torch.ones(c, c, dtype=torch.bool).triu(1)
        for s0 in range(0, t, c):
            e = min(s0 + c, t)
            qi, doi = q[:, :, s0:e], do[:, :, s0:e]
            p = torch.matmul(qi, k[:, :, :e].transpose(-1, -2)).mul_(scale)
            p[..., s0:e].masked_fill_(tri[:e - s0, :e - s0], float("-inf"))
            p.sub_(lse[:, :, s0:e]).exp_()
            dv[:, :, :e] += torch.matmul(p.transpose(-1, -2), doi)
            ds = torch.matmul(doi, v[:, :, :e].transpose(-1, -2)).sub_(delta[:, :, s0:e]).mul_(p).mul_(scale)
            dq[:, :, s0:e] = torch.matmul(ds, k[:, :, :e])
            dk[:, :, :e] += torch.matmul(ds.transpose(-1, -2), qi)
        return dq, dk, dv, None


def bench_attention(reps: int) -> None:
    b, h, t, d = 4, 12, 1024, 64
    qkv = torch.randn(b, t, 3, h, d)
    grad = torch.randn(b, h, t, d)

    def run(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x = qkv.clone().requires_grad_()
            q, k, v = x.permute(2, 0, 3, 1, 4)
            fn(q, k, v.contiguous()).backward(grad)
            return x.grad
        return step

    sdpa = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    chunked = {c: run(lambda q, k, v, c=c: _ChunkedCausal.apply(q, k, v, c)) for c in (128, 256)}
    torch.testing.assert_close(chunked[128](), sdpa(), rtol=1e-4, atol=1e-4)
    interleave({"SDPA (CPU flash kernel)": sdpa, **{f"chunked bmm, chunk {c}": f for c, f in chunked.items()}}, reps)


def bench_attention_backward(reps: int) -> None:
    """Causal attention forward + backward in bf16 at Lightweight's 12 heads, batch 4, by window
    length: SDPA (its bf16 kernels) against ``model.ops.CausalAttentionCpu`` (the same forward, the
    backward by the fp32 kernel), which the model takes up to ``FP32_ATTENTION_BACKWARD_MAX_LEN``."""
    from sab_byon_omni.model.ops import FP32_ATTENTION_BACKWARD_MAX_LEN, CausalAttentionCpu

    for t in (48, 72, 128, 160, 192, 256, 320):
        qkv = torch.randn(4, t, 3, 12, 64, dtype=torch.bfloat16)
        grad = torch.randn(4, 12, t, 64, dtype=torch.bfloat16)

        def run(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
            def step() -> torch.Tensor:
                x = qkv.clone().requires_grad_()
                fn(*x.permute(2, 0, 3, 1, 4)).backward(grad)
                return x.grad
            return step

        taken = "taken" if t <= FP32_ATTENTION_BACKWARD_MAX_LEN else "not taken"
        print(f"\n{t} tokens (the model's path: {taken})")
        interleave({"SDPA, bf16 kernels": run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                    "fp32 backward": run(CausalAttentionCpu.apply)}, reps)


def bench_rmsnorm(reps: int) -> None:
    """SmolLM2's RMSNorm (576 wide, 4 x 256 tokens), forward + backward, in fp32 and under bf16
    autocast, where the matmul after it would cast ``nn.RMSNorm``'s fp32 output (the cast counted)."""
    from sab_byon_omni.model.ops import RMSNormCpu

    x0, norm = torch.randn(4, 256, 576), torch.nn.RMSNorm(576, eps=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(4, 256, 576, dtype=dtype)

        def run(fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype = dtype) -> Callable[[], None]:
            def step() -> None:
                x = x0.clone().requires_grad_()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
                    y = fn(x)
                y.backward(grad)
            return step

        print(f"\n{dtype}")
        interleave({"nn.RMSNorm": run(lambda x, dtype=dtype: norm(x).to(dtype)),
                    "RMSNormCpu": run(lambda x, dtype=dtype: RMSNormCpu.apply(x, norm.weight, 1e-5, dtype))}, reps)


MUON_COST_SHAPES = (("tiny", 16, 128, ("fp32", "auto"), 4), ("small", 16, 128, ("fp32", "auto"), 1),
                    ("lightweight", 2, 1024, ("auto",), 0.5))  # preset, batch, seq, precisions, reps factor


def bench_muon_cost(reps: int) -> None:
    """What Muon costs per optimizer step against AdamW, at the from-scratch recipe's smallest step
    (2,048 tokens: 16 x 128 for tiny and small, as the learning benchmark; 2 x 1,024 at lightweight's
    context), where Newton-Schulz weighs most (its work does not grow with the batch). The step is
    the one ``sab-omni bench`` times (``OursStep``: the Trainer's ``train_step``) with ``--optimizer
    adamw`` and ``muon``, interleaved in this process (``--clock cpu`` for a shared machine), and
    Muon with 3 Newton-Schulz iterations instead of 5, to show their share."""
    from levers_step import ours_step

    for preset, batch, seq, precisions, factor in MUON_COST_SHAPES:
        for precision in precisions:
            print(f"\n{preset}, {batch} x {seq} tokens, precision {precision}")
            steps = {"AdamW": ours_step(batch, seq, precision, preset=preset),
                     "Muon + AdamW": ours_step(batch, seq, precision, preset=preset, optimizer="muon"),
                     "Muon + AdamW, 3 iterations": ours_step(batch, seq, precision, preset=preset, optimizer="muon",
                                                             muon_ns_steps=3)}
            interleave(steps, max(2, round(reps * factor)))


def bench_decode_threads(reps: int, preset: str = "lightweight", new_tokens: int = 64) -> None:
    """Greedy sampling with the KV cache, batch 1, fp32 (16-token prompt, ``new_tokens`` new), as
    ``sab-omni generate`` runs it, with 1 and with 2 intra-op threads."""
    from sab_byon_omni.model.generate import generate_tokens

    torch.manual_seed(0)
    model = CausalTransformer(ModelConfig.from_name(preset, vocab_size=96)).eval()
    prompt = torch.randint(0, 96, (16,)).tolist()

    def sample(n: int) -> Callable[[], None]:
        def fn() -> None:
            torch.set_num_threads(n)
            assert sum(1 for _ in generate_tokens(model, prompt, new_tokens, temperature=0)) == new_tokens
        return fn

    medians = interleave({"1 thread": sample(1), "2 threads": sample(2)}, reps)
    print(f"{preset}: " + ", ".join(f"{k} {new_tokens / t:,.1f} tokens/s" for k, t in medians.items()))


OPS = ("optimizer", "muon_cost", "sdpa", "rope", "qkv", "mlp", "norm", "threads", "vocab", "head_loss", "compile", "gemv",
       "attention", "attention_backward", "rmsnorm", "decode_threads")
STEPS = ("memory_saving", "allocator", "regroup", "matmul_floor", "compile_block", "bf16", "profile", "muon")


def main() -> None:
    global clock
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lever", choices=OPS + STEPS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=tuple(CLOCK), default="wall")
    p.add_argument("--batch", type=int, default=None, help="step levers: rows (default 4; muon: 16)")
    p.add_argument("--seq", type=int, default=None, help="step levers: tokens per row (default 1024; muon: 128)")
    p.add_argument("--preset", default="lightweight", help="decode_threads: the model (default lightweight)")
    p.add_argument("--busy", action="store_true", help="keep one other core busy while measuring")
    args = p.parse_args()
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} thread(s), {args.clock} clock" + (", one other core busy" if args.busy else ""))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        if args.lever in STEPS:
            import levers_step

            shape = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v}
            getattr(levers_step, f"bench_{args.lever}")(interleave, args.reps, **shape)
        elif args.lever == "decode_threads":
            bench_decode_threads(args.reps, args.preset)
        else:
            globals()[f"bench_{args.lever}"](args.reps)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
