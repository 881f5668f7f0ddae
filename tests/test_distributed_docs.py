"""The commands of docs/DISTRIBUTED.md that fit a CPU, run as written there but scaled down (preset
tiny, short sequences, a few steps): two gloo processes under torchrun, DDP and FSDP, from scratch
with --data, with Muon, and a resume 2 -> 1 -> 2 processes."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat while dogs ran far away into hills and rivers under bright skies".split()


def write_corpus(folder: Path, files: int = 3, lines: int = 300) -> Path:
    """Plain text files of lines of 5-60 words: windows of different lengths."""
    folder.mkdir()
    rng = random.Random(0)
    for f in range(files):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(lines))
        (folder / f"part{f}.txt").write_text(text)
    return folder


def sab_omni(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m sab_byon_omni.cli ARGS`` (or one plain process);
    a hang fails the test at ``timeout`` instead of hanging it."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))  # this checkout
    full.pop("WORLD_SIZE", None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "sab_byon_omni.cli", *args]
    try:
        out = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(args[:3])}... did not finish within {timeout} s (a hang?): "
                    f"{(e.stderr or b'')[-2000:]!r}")
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


def steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]


def test_the_documented_fsdp_command_runs_from_scratch_with_adamw_and_says_why(tmp_path):
    """DISTRIBUTED.md's FSDP line (--preset 3b --tokenizer bpe --data corpus/ --parallel fsdp
    --activation_checkpointing true --batch_size 1 --gradient_accumulation_steps 8 --seq_len 2048),
    with preset tiny, 64 tokens and 3 steps: the recipe would pick Muon for a fresh model, which
    FSDP cannot run; it picks AdamW and the banner says so."""
    write_corpus(tmp_path / "corpus")
    out = sab_omni(["train", "--preset", "tiny", "--tokenizer", "bpe", "--data", "corpus/", "--parallel", "fsdp",
                    "--activation_checkpointing", "true", "--batch_size", "1", "--gradient_accumulation_steps", "8",
                    "--seq_len", "64", "--max_steps", "3", "--checkpoint_dir", "run"], tmp_path)
    assert "AdamW, not the recipe's Muon: --parallel fsdp" in out.stderr + out.stdout
    assert (tmp_path / "run" / "step_3.dcp").is_dir()
    assert steps(tmp_path / "run")[-1]["step"] == 3
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "optimizer: adamw" in cfg and "parallel: fsdp" in cfg


def test_fsdp_with_accumulation_over_variable_lengths_finishes_when_ranks_hold_different_token_counts(tmp_path):
    """The passes per accumulation window come from facts every rank shares: with each rank's own
    count (about 1,080 tokens per rank and window, 1,024 per pass on CPU; no length buckets) the ranks
    ran 2 and 1 passes at step 4, and FSDP's all-gathers waited for each other until the timeout."""
    args = ["train", "--preset", "tiny", "--num_samples", "400", "--seq_len", "128", "--batch_size", "5",
            "--gradient_accumulation_steps", "3", "--length_bucket_size", "0", "--parallel", "fsdp", "--precision", "fp32", "--max_steps", "6",
            "--learning_rate", "1e-3", "--checkpoint_dir", "run", "--progress", "false", "--log_interval", "1"]
    sab_omni(args, tmp_path, timeout=150, env={"SAB_DIST_TIMEOUT_S": "40"})
    assert [r["step"] for r in steps(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
