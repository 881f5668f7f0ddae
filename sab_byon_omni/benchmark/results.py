"""What a benchmark measured, as typed results: one dataclass per mode, flattened to one JSON
object (``--json``) and rendered as a Markdown table for people."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from sab_byon_omni.benchmark.breakdown import ceiling
from sab_byon_omni.machine import cpu_flags_summary, cpu_has_native_bf16, device_name


@dataclass
class Machine:
    device: str
    device_name: str
    threads: int
    torch: str
    cpu_flags: str | None = None
    cpu_native_bf16: bool | None = None

    @classmethod
    def of(cls, device: torch.device) -> "Machine":
        cpu = device.type == "cpu"
        return cls(device.type, device_name(device), torch.get_num_threads(), torch.__version__,
                   cpu_flags_summary() if cpu else None, cpu_has_native_bf16() if cpu else None)

    def describe(self) -> str:
        where = f"{self.device_name} ({self.device}, {self.threads} thread{'' if self.threads == 1 else 's'}"
        return where + (f", {self.cpu_flags})" if self.cpu_flags is not None else ")")


@dataclass
class Speed:
    """One model's timed training steps."""

    step_s: float  # median
    step_times_s: list[float]
    tokens_per_s: float
    tflops: float
    mfu: float | None
    params: int = 0
    isolated_peak_mb: float | None = None  # peak RSS of a fresh process running only this model (--isolated-memory)
    isolated_base_mb: float | None = None  # that process's RSS before the model was built


@dataclass
class TrainBench:
    preset: str
    params: int
    matmul_params: int
    vocab_size: int
    seq_len: int
    batch_size: int
    precision: str
    compile: bool
    activation_checkpointing: bool
    optimizer: str
    steps: int
    warmup: int
    machine: Machine
    flops_per_token: float
    peak_tflops: float | None
    peak_source: str
    ours: Speed
    peak_memory_mb: float
    memory_kind: str
    first_step_s: float | None = None
    compile_s: float | None = None
    peers: dict[str, Speed] = field(default_factory=dict)  # "hf", "minimal"
    peer_names: dict[str, str] = field(default_factory=dict)  # what each peer is ("HF LlamaForCausalLM ...")
    measured_peak_tflops: float | None = None  # the dtype's matmul rate measured in the run
    mode: str = "train"
    newton_schulz_flops: int | None = None  # Muon's per step (counted in ours' TFLOP/s and MFU)
    newton_schulz_dtype: str | None = None  # the dtype Muon's Newton-Schulz ran in
    newton_schulz_peak_tflops: float | None = None  # that dtype's peak, which MFU counts those FLOPs against
    allocator: str = ""  # CPU: the C allocator's settings from the environment (machine.malloc_settings)
    clock: str = "wall"  # what the step times count: wall seconds, or this process's CPU seconds (--clock cpu)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> kernel class -> ms (--breakdown)

    def ratio(self, peer: str) -> float:
        return self.ours.tokens_per_s / self.peers[peer].tokens_per_s

    def measured_mfu(self, speed: Speed) -> float | None:
        """MFU against the matmul peak measured in the run (the data-sheet one is ``speed.mfu``)."""
        return speed.tflops / self.measured_peak_tflops if self.measured_peak_tflops else None


@dataclass
class GenerateBench:
    preset: str
    params: int
    vocab_size: int
    prompt_len: int
    new_tokens: int
    batch_size: int
    precision: str
    steps: int
    warmup: int
    machine: Machine
    bytes_per_token: float
    read_bandwidth_gbs: float
    seconds: float
    tokens_per_s: float
    gbs: float
    mbu: float
    hf_seconds: float | None = None
    hf_tokens_per_s: float | None = None
    hf_gbs: float | None = None
    hf_mbu: float | None = None
    mode: str = "generate"


@dataclass
class EpochBench:
    config: str
    preset: str
    precision: str
    batch_size: int
    gradient_accumulation_steps: int
    length_bucket_size: int
    machine: Machine
    optimizer_steps_per_epoch: int
    steps: int
    warmup: int
    epoch_real_tokens: int
    epoch_positions: int
    mean_sample_len: float
    flops_per_token: float
    peak_tflops: float | None
    peak_source: str
    tokens_per_s: float
    timed_s: float
    epoch_s: float
    mfu: float | None
    bound_s: float | None
    epoch_over_bound: float | None
    optimizer: str = "adamw"  # train.optimizer; with muon, its schedule and Newton-Schulz FLOPs per optimizer step
    newton_schulz: str = ""
    newton_schulz_flops: int = 0
    mode: str = "epoch"


Result = TrainBench | GenerateBench | EpochBench


def to_json(r: Result) -> dict[str, Any]:
    """One flat object: the machine's fields and our speed at the top level, each peer's speed
    prefixed with its name (``hf_tokens_per_s``) and its ratio (``ratio_vs_hf``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(r):
        value = getattr(r, f.name)
        if f.name in ("machine", "ours"):
            out.update(dataclasses.asdict(value))
            if f.name == "ours":
                out["measured_mfu"] = r.measured_mfu(value)
        elif f.name == "breakdown":
            for model, classes in value.items():
                out.update({f"breakdown_{model}_{c}_ms": ms for c, ms in classes.items()})
                if model != "ours":
                    out[f"ceiling_vs_{model}"] = ceiling(value["ours"], r.ours.step_s, r.peers[model].step_s)
        elif f.name == "peers":
            for peer, speed in value.items():
                out.update({f"{peer}_{k}": v for k, v in dataclasses.asdict(speed).items()})
                out[f"{peer}_measured_mfu"] = r.measured_mfu(speed)
                out[f"ratio_vs_{peer}"] = r.ratio(peer)
                if speed.isolated_peak_mb and r.ours.isolated_peak_mb:
                    out[f"memory_ratio_vs_{peer}"] = r.ours.isolated_peak_mb / speed.isolated_peak_mb
        else:
            out[f.name] = value
    if isinstance(r, GenerateBench) and r.hf_tokens_per_s:
        out["ratio_vs_hf"] = r.tokens_per_s / r.hf_tokens_per_s
    return out
