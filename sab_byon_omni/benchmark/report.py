"""Benchmark results as Markdown for people (``--json`` prints :func:`results.to_json` instead)."""

from __future__ import annotations

from sab_byon_omni.benchmark.breakdown import CLASSES, SHARED, ceiling, shared_share
from sab_byon_omni.benchmark.results import EpochBench, GenerateBench, Result, Speed, TrainBench
from sab_byon_omni.estimate import plural

PEER_NAMES = {"hf": "HF GPT-2", "minimal": "plain reference GPT"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(r: Result) -> str:
    """A Markdown table (one row per model) and the set-up it was measured on."""
    if isinstance(r, EpochBench):
        return _epoch(r)
    if isinstance(r, GenerateBench):
        return _generate(r)
    return _train(r)


def _epoch(r: EpochBench) -> str:
    return "\n".join([
        f"one epoch of {r.config}: {r.preset}, batch {r.batch_size} x accumulation {r.gradient_accumulation_steps}, "
        f"{r.precision}, length bucketing {r.length_bucket_size}, optimizer {r.optimizer}"
        + (f" (Newton-Schulz {r.newton_schulz}: {r.newton_schulz_flops / 1e9:.3g} GFLOP per optimizer step, not in "
           "the MFU or the matmul bound)" if r.newton_schulz_flops else "") + f"; {r.machine.describe()}",
        f"{r.optimizer_steps_per_epoch} optimizer steps, {r.epoch_real_tokens:,} real tokens in "
        f"{r.epoch_positions:,} positions ({100 * (r.epoch_positions / r.epoch_real_tokens - 1):.1f}% padding), "
        f"mean sample {r.mean_sample_len:.1f} tokens, {r.flops_per_token / 1e6:.1f} MFLOP per token; peak "
        f"{_fmt(r.peak_tflops, '.3g')} TFLOP/s ({r.peak_source})",
        "", "| real tokens/s | MFU | epoch s (projected) | matmul bound s | epoch / bound |",
        "|---:|---:|---:|---:|---:|",
        f"| {r.tokens_per_s:,.0f} | {_pct(r.mfu)} | {r.epoch_s:,.0f} | {_fmt(r.bound_s, ',.0f')} | "
        f"{_fmt(r.epoch_over_bound, '.2f')}x |",
        "", f"{plural(r.steps, 'optimizer step')} timed after {r.warmup} warm-up ({r.timed_s:.1f} s); the epoch is projected "
            "from their real tokens/s"])


def _generate(r: GenerateBench) -> str:
    lines = [f"generation: {r.preset} ({r.params / 1e6:.1f}M params), vocab {r.vocab_size}, prompt {r.prompt_len} + "
             f"{r.new_tokens} new tokens, batch 1, greedy, {r.precision}; {r.machine.describe()}",
             f"each new token reads {r.bytes_per_token / 1e6:.1f} MB (weights + KV cache); read bandwidth "
             f"{r.read_bandwidth_gbs:.1f} GB/s (measured, this run); MBU = achieved / measured bandwidth",
             "", "| model | new tokens/s | seconds | GB/s | MBU |", "|---|---:|---:|---:|---:|",
             f"| sab-byon-omni (KV cache) | {r.tokens_per_s:,.1f} | {r.seconds:.2f} | {r.gbs:.1f} | {_pct(r.mbu)} |"]
    if r.hf_tokens_per_s:
        lines.append(f"| HF GPT-2 generate | {r.hf_tokens_per_s:,.1f} | {r.hf_seconds:.2f} | {r.hf_gbs:.1f} | "
                     f"{_pct(r.hf_mbu)} |")
        lines += ["", f"ratio (ours / HF): {r.tokens_per_s / r.hf_tokens_per_s:.2f}x, median of {r.steps} "
                      "interleaved runs"]
    return "\n".join(lines)


def _train(r: TrainBench) -> str:
    lines = [
        f"training step: {r.preset} ({r.params / 1e6:.1f}M params), vocab {r.vocab_size}, batch {r.batch_size} x "
        f"{r.seq_len}, {r.precision}, {r.optimizer}, compile {_compiled(r)}, activation "
        f"checkpointing {'on' if r.activation_checkpointing else 'off'}; {r.machine.describe()}",
        f"FLOPs per token: {r.flops_per_token / 1e6:.1f} M (6 x {r.matmul_params / 1e6:.2f}M matmul weights "
        f"+ 12 x layers x seq_len x hidden); peak {_fmt(r.peak_tflops, '.3g')} TFLOP/s ({r.peak_source}); "
        f"matmul measured in this run {_fmt(r.measured_peak_tflops, '.3g')} TFLOP/s"
        + (f"\nallocator, for every model in this process: {r.allocator}" if r.allocator else "")
        + _newton_schulz(r),
        "", "| model | tokens/s | step s | TFLOP/s | MFU | MFU of measured matmul | peak memory MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| sab-byon-omni | {r.ours.tokens_per_s:,.0f} | {r.ours.step_s:.2f} | {r.ours.tflops:#.3g} | "
        f"{_pct(r.ours.mfu)} | {_pct(r.measured_mfu(r.ours))} | "
        f"{_memory(r.ours, f'{r.peak_memory_mb:,.0f} ({r.memory_kind})')} |",
    ]
    names = {**PEER_NAMES, **r.peer_names}
    for name, s in r.peers.items():
        lines.append(f"| {names.get(name, name)} ({s.params / 1e6:.1f}M params) | {s.tokens_per_s:,.0f} | "
                     f"{s.step_s:.2f} | {s.tflops:#.3g} | {_pct(s.mfu)} | {_pct(r.measured_mfu(s))} | "
                     f"{_memory(s, '-')} |")
    lines.append("")
    lines.append(f"median of {plural(r.steps, 'timed step')} after {r.warmup} warm-up"
                 + ("; times are this process's CPU seconds (--clock cpu)" if r.clock == "cpu" else "")
                 + (f"; first step {r.first_step_s:.1f} s" if r.first_step_s else "")
                 + (f", compile about {r.compile_s:.1f} s" if r.compile_s is not None else ""))
    for name, s in r.peers.items():
        lines.append(f"ratio (ours / {names.get(name, name)} tokens/s): {r.ratio(name):.2f}x, steps interleaved "
                     "in one process" + (f"; peak RSS ratio {r.ours.isolated_peak_mb / s.isolated_peak_mb:.2f}x"
                                         if s.isolated_peak_mb and r.ours.isolated_peak_mb else ""))
    if r.ours.isolated_peak_mb:
        lines.append("peak memory: peak RSS of a fresh process running only that model's step (--isolated-memory), "
                     "with the RSS before the model was built in brackets")
    if r.breakdown:
        lines += _breakdown(r, names)
    return "\n".join(lines)


def _breakdown(r: TrainBench, names: dict[str, str]) -> list[str]:
    """--breakdown: each model's profiled steps by kind of kernel, and the ceiling against each peer."""
    clock = "device" if r.machine.device == "cuda" else "CPU"
    lines = ["", f"profiled steps, {clock} ms per step by kind of kernel (--breakdown; the profiler adds to every "
             "op, most to the small ones):", "",
             "| model | " + " | ".join(CLASSES) + " | profiled step |", "|---|" + "---:|" * (len(CLASSES) + 1)]
    for model, classes in r.breakdown.items():
        total = sum(classes.values())
        cells = " | ".join(f"{_ms(classes[c])} ({100 * classes[c] / total:.0f}%)" for c in CLASSES)
        lines.append(f"| {'sab-byon-omni' if model == 'ours' else names.get(model, model)} | {cells} | {_ms(total)} |")
    share = shared_share(r.breakdown["ours"])
    for model in r.peers:
        if model in r.breakdown:
            limit = ceiling(r.breakdown["ours"], r.ours.step_s, r.peers[model].step_s)
            lines.append(f"ceiling against {names.get(model, model)}: {limit:.2f}x = the timed ratio "
                         f"{r.ratio(model):.2f}x / the {100 * share:.0f}% of ours' profiled step in "
                         f"{', '.join(SHARED)} (kernels both run): the ratio ours would reach if all its other "
                         "work took no time")
    if r.optimizer.lower().startswith("muon"):
        lines.append("with Muon the optimizer column holds its Newton-Schulz products, work the AdamW peers do not "
                     "do: the ceiling then counts it as unavoidable")
    return lines


def _compiled(r: TrainBench) -> str:
    if not r.compile:
        return "off"
    return "on (our blocks and each peer's layers)" if r.peers else "on"


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _newton_schulz(r: TrainBench) -> str:
    if not r.newton_schulz_flops:
        return ""
    model = r.batch_size * r.seq_len * r.flops_per_token
    share = r.newton_schulz_flops / (model + r.newton_schulz_flops)
    return (f"\nMuon's Newton-Schulz: {r.newton_schulz_flops / 1e9:.3g} GFLOP per step in {r.newton_schulz_dtype} "
            f"({100 * share:.1f}% of the step's FLOPs), counted in our TFLOP/s; MFU counts them at the "
            f"{r.newton_schulz_dtype} peak ({_fmt(r.newton_schulz_peak_tflops, '.3g')} TFLOP/s): MFU = (model FLOPs "
            "/ run peak + Newton-Schulz FLOPs / its peak) / step time")


def _memory(s: Speed, otherwise: str) -> str:
    if s.isolated_peak_mb is None:
        return otherwise
    return f"{s.isolated_peak_mb:,.0f} ({s.isolated_base_mb:,.0f} before the model)"
