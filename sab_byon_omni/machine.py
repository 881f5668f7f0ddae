"""Facts about the machine a run or a benchmark uses: CPU name and matmul extensions, GPU name and
data-sheet peak, and the peaks measured in the run (matmul FLOP/s, memory read bandwidth)."""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no sparsity) matmul peaks in TFLOP/s from the vendors' data sheets and architecture
# whitepapers; for GeForce and RTX cards the tensor rate with FP32 accumulation (what PyTorch's
# fp16/bf16 matmuls use), not the FP16-accumulate one. "fp32" is the plain FP32 rate, "tf32" the
# tensor-core rate used when TF32 matmuls are allowed. A device name
# (``torch.cuda.get_device_name()``) matches a row only exactly, once its vendor words ("NVIDIA",
# "Tesla", "GeForce", "Generation"), memory size ("80GB", "HBM3") and SXM form factor are dropped:
# "L40S" is not the L40, "RTX A1000" not the A100, "RTX 4090 D" and "RTX 4090 Laptop GPU" not the
# RTX 4090; a PCIe part has its own row where its rates differ ("H100 PCIe"), else the row without it.
# Sources: NVIDIA H100 / H200 / GH200 / H20 / A100 / A10 / L40 / L40S / L4 / V100 / T4 / RTX A6000 /
# RTX 6000 Ada / HGX B200 data sheets; Ampere GA102 (RTX 3090), Ada (RTX 4090) and Blackwell GB202
# (RTX 5090) architecture whitepapers (their "Peak FP16/BF16 Tensor TFLOPS with FP32 Accumulate",
# dense). B200 lists no plain FP32 figure that fits this table: none is given.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # its H100-class GPU ("NVIDIA GH200 480GB")
    "H20": {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 6000 Ada": {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1, "fp32": 91.1},
    "RTX A6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "RTX 5090": {"bf16": 209.5, "fp16": 209.5, "tf32": 104.8, "fp32": 104.8},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "GENERATION"}


def gpu_table_row(name: str) -> str | None:
    """The row of :data:`GPU_PEAK_TFLOPS` that is exactly this device name (see there), or None."""
    words = [w for w in re.sub(r"[^A-Za-z0-9]+", " ", name).upper().split()
             if w not in _VENDOR_WORDS and not re.fullmatch(r"\d+GB|HBM\w*|SXM\d*", w)]
    rows = {" ".join(row.upper().split()): row for row in GPU_PEAK_TFLOPS}
    for candidate in (words, [w for w in words if w != "PCIE"]):  # a PCIe part without a row of its own
        if " ".join(candidate) in rows:
            return rows[" ".join(candidate)]
    return None


def gpu_peak_tflops(name: str, precision: str, allow_tf32: bool | None = None) -> tuple[float | None, str]:
    """(data-sheet peak TFLOP/s, the table row used) for a CUDA device name, or (None, why not).
    fp32 counts at the TF32 tensor rate when TF32 matmuls are allowed (``allow_tf32``, default:
    torch's current setting, which ``torch.set_float32_matmul_precision("high")`` turns on)."""
    key = precision
    tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    if precision == "fp32" and tf32:
        key = "tf32"
    row = gpu_table_row(name)
    if row is None:
        return None, f"{name[:80]!r} is not in the peak table"
    if key in GPU_PEAK_TFLOPS[row]:
        return GPU_PEAK_TFLOPS[row][key], f"table: {row} {key}"
    return None, f"table: {row} has no {key} figure"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_flags_summary() -> str:
    """The SIMD/matrix extensions that decide CPU matmul speed, as listed in /proc/cpuinfo."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
    flags = cpu_flags()
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


NATIVE_BF16_OPT_OUT = "SAB_CPU_NATIVE_BF16"
_OFF = ("0", "false", "no", "off")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX (where bf16 matmuls beat fp32), unless
    ``SAB_CPU_NATIVE_BF16=0`` says to treat this CPU as one without (``precision: auto`` then picks
    fp32, as on an AVX2-only CPU; the tests of that path run this way on a bf16 machine)."""
    if os.environ.get(NATIVE_BF16_OPT_OUT, "").strip().lower() in _OFF:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _runnable_tasks() -> int:
    """Tasks the kernel counts as running or ready to run now, this one included (``/proc/loadavg``)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        return max(1, os.cpu_count() or 1)


def idle_cpus(reads: int = 3, gap_s: float = 0.005) -> int:
    """CPUs this process may run on that no other task wants now, at least 1: its CPUs (affinity
    mask) minus the other runnable tasks, the fewest of ``reads`` looks ``gap_s`` apart (so a task
    that only woke for a moment does not count; one that keeps a core busy does). 1 where Linux's
    counts are not available."""
    try:
        cpus = len(os.sched_getaffinity(0))
        others = []
        for i in range(reads):
            if i:
                time.sleep(gap_s)
            others.append(_runnable_tasks() - 1)
    except (OSError, AttributeError, ValueError, IndexError):
        return 1
    return max(1, cpus - min(others))


@dataclass(frozen=True)
class Threads:
    """The torch intra-op threads a training process takes on a CPU (:func:`training_threads`):
    ``n`` threads, with ``idle`` of the ``cores`` it may use free as it started (None: not looked
    at, an explicit number), ``ranks`` local processes sharing them; ``why`` says a lowered count."""

    n: int
    idle: int | None
    cores: int
    ranks: int = 1
    why: str = ""
    before: int = 1  # torch's setting before (restored when the run ends)

    def describe(self) -> str:
        """``2 threads (1 idle of 2)``, as the banner says it."""
        seen = f"{self.idle} idle of {self.cores}" if self.idle is not None else f"of {self.cores} core{'' if self.cores == 1 else 's'}"
        share = f", {self.cores // self.ranks} per local process" if self.ranks > 1 else ""
        return f"{self.n} thread{'' if self.n == 1 else 's'} ({seen}{share})"


def local_processes() -> int:
    """The processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), 1 without torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def training_threads(requested: int = 0, idle: int | None = None) -> Threads:
    """The torch threads for training on a CPU. ``requested`` 0 (auto): the cores no other process is
    using as the run starts (``idle``, default :func:`idle_cpus`), at least 1, at most torch's setting
    and this process's share of the cores (the usable cores over torchrun's local processes). An
    explicit number wins, but above that share it is lowered to it (the caller warns with ``why``):
    threads beyond the free cores wait on one another, each op on its slowest thread (1 thread ran
    tiny 6-30x faster than 2 on a loaded 2-vCPU machine, docs/TRAINING.md)."""
    cores, ranks = usable_cpus(), local_processes()
    share = max(1, cores // ranks)
    if requested > 0:
        if requested <= share:
            return Threads(requested, None, cores, ranks, before=torch.get_num_threads())
        where = f" shared by {ranks} local processes" if ranks > 1 else ""
        return Threads(share, None, cores, ranks,
                       f"train.threads={requested} is more than the {share} CPU core{'' if share == 1 else 's'} this "
                       f"process may use ({cores}{where}): training with {share}", torch.get_num_threads())
    free = idle_cpus() if idle is None else idle
    before = torch.get_num_threads()
    return Threads(max(1, min(before, share, free)), free, cores, ranks, before=before)


def busy_machine() -> str:
    """A few words when the machine is busy (1-minute load above its CPUs): a time estimate made from
    rates measured now assumes the cores stay free. Empty when not busy or unknown."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return ""
    return f"the machine is busy (load {load:.1f} on {cpus} CPUs): this assumes free cores" if load > cpus else ""


def malloc_settings() -> str:
    """The C allocator's settings this process started with, in words, for a benchmark's header: glibc
    reads ``GLIBC_TUNABLES`` and its ``MALLOC_*_`` variables once, at start-up (how to keep freed
    memory for the next training step: docs/TRAINING.md, "The C allocator"). Nothing is changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's own allocator (not glibc)"
    chosen = sorted(f"{k}={v.strip()[:120]}" for k, v in os.environ.items()
                    if v.strip() and (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"))
    return "glibc, " + (", ".join(chosen) if chosen else "its defaults")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() if device.type == "cpu" else device.type


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_op_costs(device: torch.device, budget_s: float = 0.15) -> tuple[float, float]:
    """(seconds per small eager op with autograd, elementwise bytes per second) on ``device``, the
    two costs of a training step besides its matmuls: each of the hundreds of ops a step runs pays
    the first, normalisation, activations, residuals and the optimizer stream memory at the second.
    The best of a few rounds within about ``budget_s`` (a busy machine measures slower)."""
    x = torch.ones(8, device=device, requires_grad=True)
    n = 1 << 22
    a, b = torch.ones(n, device=device), torch.ones(n, device=device)
    out = torch.empty(n, device=device)
    per_op = per_byte = float("inf")
    deadline = time.perf_counter() + budget_s
    while True:
        t0 = time.perf_counter()
        y = x
        for _ in range(40):
            y = y * 1.0001
        y.sum().backward()  # 40 multiplies forward, about 80 ops backward
        sync(device)
        per_op = min(per_op, (time.perf_counter() - t0) / 120)
        t0 = time.perf_counter()
        torch.add(a, b, out=out)
        sync(device)
        per_byte = min(per_byte, (time.perf_counter() - t0) / (12 * n))
        if time.perf_counter() > deadline:
            return per_op, 1.0 / per_byte


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, budget_s: float = 1.5,
                        sizes: tuple[int, ...] = (256, 512, 1024, 2048)) -> float:
    """Best square-matmul rate (FLOP/s) of ``dtype`` on ``device``, within about ``budget_s``.

    Sizes grow while one multiply stays cheap, so a dtype that runs emulated (bf16 on a CPU
    without AVX-512-BF16/AMX) is measured on small matrices instead of stalling the run.
    """
    best = 0.0
    per_size = budget_s / len(sizes)
    on = device if device.type == "cuda" else torch.device("cpu")  # a GPU draws its own (8192^2 is slow on a CPU)
    gen = torch.Generator(device=on).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen, device=on).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen, device=on).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up (and a first estimate of the cost)
        sync(device)
        spent, single = 0.0, float("inf")
        while spent < per_size or single == float("inf"):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
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
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def memory_budget(device: torch.device) -> tuple[float, str]:
    """(bytes this process may use, a description): a CUDA device's free memory now
    (``mem_get_info``: what another process or this one already holds is not there to plan on),
    or the available RAM (divided among the processes of this machine) on CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(free), (f"{torch.cuda.get_device_name(device)} ({free / 2**30:.1f} GiB free of "
                             f"{total / 2**30:.1f} GiB)")
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        return float("inf"), "unknown RAM"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f" / {local} processes)" if local > 1 else ")"
    return available / local, f"available RAM ({available / 2**30:.1f} GiB{share}"
