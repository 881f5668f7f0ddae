"""What the CRC-32 checksum of a checkpoint costs: a Lightweight training checkpoint (weights and
AdamW state) saved and loaded with and without it, in one process, the variants interleaved.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/checksum_cost.py [--repeats 3] [--dir DIR]

Save: ``save_checkpoint`` (checksum computed, then the atomic write) against the same atomic write
of the same dict without it. Load as a resume does it: mapped (``mmap=True``), then copied into the
model and optimizer, with and without checking the tensors. The file is in the page cache (just
written), so the numbers are the CPU cost, not the disk's. Prints medians in seconds and MB/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.files.atomic import atomic_write
from sab_byon_omni.files.checkpoint import FORMAT, checksum, load_checkpoint, save_checkpoint
from sab_byon_omni.machine import cpu_name
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.optim import make_optimizer


def _checkpoint() -> tuple[dict, CausalTransformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = CausalTransformer(ModelConfig.from_name("lightweight", vocab_size=96))
    opt = make_optimizer(model, device="cpu")
    model(torch.randint(0, 96, (1, 16))).float().mean().backward()
    opt.step()
    ck = {"epoch": 0, "global_step": 1, "config": {}, "model_state_dict": model.state_dict(),
          "optimizer_state_dict": opt.state_dict()}
    return ck, model, opt


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    args = ap.parse_args()
    ck, model, opt = _checkpoint()
    d = Path(args.dir or tempfile.mkdtemp())
    plain, summed = d / "plain.pt", d / "summed.pt"

    def resume(path: Path, verify: bool) -> None:
        loaded = load_checkpoint(path, mmap=True, verify_tensors=verify)
        model.load_state_dict(loaded["model_state_dict"])
        opt.load_state_dict(loaded["optimizer_state_dict"])

    runs: dict[str, list[float]] = {k: [] for k in ("save", "save+checksum", "resume", "resume+verify", "crc")}
    for _ in range(args.repeats):  # interleaved, so that drift of a shared machine hits both alike
        runs["save"].append(_timed(lambda: atomic_write(plain, lambda f: torch.save({**ck, "format": FORMAT}, f))))
        runs["save+checksum"].append(_timed(lambda: save_checkpoint(ck, summed)))
        runs["resume"].append(_timed(lambda: resume(plain, False)))
        runs["resume+verify"].append(_timed(lambda: resume(summed, True)))
        runs["crc"].append(_timed(lambda: checksum(ck)))
    mb = summed.stat().st_size / 1e6
    print(f"{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"Lightweight checkpoint {mb:,.0f} MB; median of {args.repeats}")
    for name, times in runs.items():
        t = statistics.median(times)
        print(f"  {name:14s} {t:7.3f} s  ({mb / t:,.0f} MB/s)   runs: {', '.join(f'{x:.3f}' for x in times)}")
    for a, b in (("save", "save+checksum"), ("resume", "resume+verify")):
        ta, tb = statistics.median(runs[a]), statistics.median(runs[b])
        print(f"  {b} / {a}: {tb / ta:.2f}x (+{tb - ta:.3f} s)")


if __name__ == "__main__":
    main()
