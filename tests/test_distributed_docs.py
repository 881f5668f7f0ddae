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


MUON_SPLIT = '''
import sys, torch, torch.distributed as dist
from sab_byon_omni.config import ModelConfig, TrainConfig
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.optim import make_optimizer
dist.init_process_group("gloo")
rank = dist.get_rank()
def model():
    torch.manual_seed(0)  # n_kv_heads 2 of 4: the qkv splits [q, kv, kv], two shape runs
    return CausalTransformer(ModelConfig(vocab_size=50, hidden=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn=160))
alone, split = model(), model()
t = TrainConfig(optimizer="muon", weight_decay=0.1, muon_learning_rate=0.05)
opts = [make_optimizer(alone, t, "cpu"), make_optimizer(split, t, "cpu", process_group=dist.group.WORLD)]
for step in range(3):
    g = torch.Generator().manual_seed(step)  # the same gradient on every rank, as after DDP's all-reduce
    grads = [torch.randn(p.shape, generator=g) for p in alone.parameters()]
    for m, opt in zip((alone, split), opts):
        for p, grad in zip(m.parameters(), grads):
            p.grad = grad.clone()
        opt.step()
diff = max((a - b).abs().max().item() for a, b in zip(alone.parameters(), split.parameters()))
moved = max((a - b).abs().max().item() for a, b in zip(alone.parameters(), model().parameters()))
buffers = all(torch.equal(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"])
              for a, b in zip(alone.parameters(), split.parameters()) if a in opts[0].muon.state)
open(f"result_{rank}.txt", "w").write(f"RESULT rank {rank} diff {diff!r} moved {moved!r} buffers {buffers}")
dist.destroy_process_group()
'''


@pytest.mark.parametrize("native_bf16", ["1", "0"])  # Newton-Schulz in bf16 (gathered in bf16) and in fp32
def test_muon_split_across_ranks_updates_like_muon_on_one_rank(tmp_path, native_bf16):
    """Each rank orthogonalises its share of the shape batches, one all-gather shares the
    directions: after 3 steps every rank's weights and momentum buffers are those of Muon alone."""
    (tmp_path / "split.py").write_text(MUON_SPLIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAB_CPU_NATIVE_BF16": native_bf16}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "split.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [(tmp_path / f"result_{r}.txt").read_text().split() for r in (0, 1)]
    assert sorted(r[2] for r in results) == ["0", "1"]
    for r in results:
        assert float(r[4]) <= 1e-6 and float(r[6]) > 1e-3 and r[8] == "True", r  # the same, and it trained


def final_weights(run: Path, step: int) -> dict:
    import torch

    return torch.load(run / f"step_{step}.pt", weights_only=True)["model_state_dict"]


def test_ddp_from_scratch_with_data_and_muon_resumes_2_then_1_then_2_processes_like_an_uninterrupted_run(tmp_path):
    """DISTRIBUTED.md's DDP line with --data (the from-scratch recipe: Muon, split across the two
    ranks), 6 steps straight, against the same run stopped at step 2 (2 processes), continued to
    step 4 by one process (twice the micro-batch: the same global batch) and finished by 2 again."""
    import torch

    write_corpus(tmp_path / "corpus")
    common = ["train", "--preset", "tiny", "--tokenizer", "bpe", "--data", "corpus/", "--seq_len", "64",
              "--precision", "fp32", "--gradient_accumulation_steps", "2", "--epochs", "1", "--save_every", "2",
              "--eval_interval", "0", "--lr_schedule", "constant", "--warmup_steps", "1", "--muon_warmup_steps", "1"]
    # (a schedule of its own: a cosine or warmup planned for max_steps would change with each leg's max_steps)
    env = {"SAB_MUON_NS_DTYPE": "fp32"}  # fp32 Newton-Schulz: rank-order rounding stays near 1e-7
    out = sab_omni([*common, "--batch_size", "2", "--max_steps", "6", "--checkpoint_dir", "full"], tmp_path, env=env)
    assert "Muon for the blocks' matrices" in out.stdout + out.stderr
    sab_omni([*common, "--batch_size", "2", "--max_steps", "2", "--checkpoint_dir", "chain"], tmp_path, env=env)
    sab_omni([*common, "--batch_size", "4", "--max_steps", "4", "--checkpoint_dir", "chain", "--resume", "auto"],
             tmp_path, nproc=1, env=env)
    sab_omni([*common, "--batch_size", "2", "--max_steps", "6", "--checkpoint_dir", "chain", "--resume", "auto"],
             tmp_path, env=env)
    full, chain = final_weights(tmp_path / "full", 6), final_weights(tmp_path / "chain", 6)
    start = final_weights(tmp_path / "chain", 2)
    assert full.keys() == chain.keys()
    assert max((full[k] - start[k]).abs().max().item() for k in full) > 1e-3  # steps 3-6 moved the weights
    for k in full:
        torch.testing.assert_close(chain[k], full[k], rtol=0, atol=1e-5, msg=k)
