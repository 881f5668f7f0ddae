import json
import subprocess
import sys

import pytest
import torch

from sab_byon_omni.cli import main
from tests.helpers import tiny_run

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

TINY = tiny_run(num_samples=120, seq_len=96, batch_size=8, gradient_accumulation_steps=2, epochs=None,
                precision=None, device=None, log_interval=None)


def test_end_to_end_train_then_generate(in_tmp, capsys):
    assert main(["train", *TINY, "--epochs", "2", "--checkpoint_dir", "run"]) == 0
    out = capsys.readouterr().out
    assert "train loss per epoch" in out and "validation loss per epoch" in out and "tokens/s" in out
    names = sorted(p.name for p in (in_tmp / "run").iterdir())
    assert names == [".lock", "best_model.pt", "config.yaml", "epoch_1.pt", "epoch_2.pt", "metrics.jsonl"]
    rows = [json.loads(line) for line in (in_tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"} <= rows[0].keys()
    assert main(["generate", "--checkpoint", "run/best_model.pt", "--prompt", "[IMAGE]", "--max-new-tokens", "20",
                 "--seed", "3"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("[IMAGE]") and len(text) == len("[IMAGE]") + 20


def test_the_console_script_runs_as_a_module(in_tmp):
    proc = subprocess.run([sys.executable, "-m", "sab_byon_omni", "train", *TINY, "--max_steps", "2",
                           "--checkpoint_dir", "c"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stderr and (in_tmp / "c" / "metrics.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--learning_rate", "-1"], "train.learning_rate=-1.0 must be positive"),
    (["train", "--n_heads", "10"], "model.n_heads=10 does not divide model.hidden=768"),
    (["train", "--seq_len", "1"], "data.seq_len=1 must be at least 2"),
    (["train", "--preset", "huge"], "model.preset='huge'"),
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "--config", "bad.yaml"], "bad.yaml: invalid YAML"),
    (["train", "--config", "unknown.yaml"], "unknown key 'colour'"),
    (["train", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["train", "--epochs", "x"], "train.epochs='x' must be an integer"),
    (["train", "--muon_ns_steps", "0"], "train.muon_ns_steps=0 must be in [1, 20]"),
    (["train", "--muon_ns_steps", "21"], "train.muon_ns_steps=21 must be in [1, 20]"),
    (["train", "--muon_ns_coefficients", "polar"], ("train.muon_ns_coefficients='polar' is not one of: quintic, "
                                                     "polar_express")),
    (["train", "--resume", "nothing.pt"], "checkpoint not found: nothing.pt"),
    (["generate", "--checkpoint", "bad.yaml", "--prompt", "x"], "bad.yaml: not a checkpoint"),
    (["generate", "--checkpoint", "missing.pt", "--prompt", "x"], "checkpoint not found"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(in_tmp, capsys, args, message):
    (in_tmp / "bad.yaml").write_text("train: [\n")
    (in_tmp / "unknown.yaml").write_text("colour: blue\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["bad.yaml", "unknown.yaml"]  # no checkpoints dir


def test_existing_checkpoints_are_never_overwritten_without_resume(in_tmp, capsys):
    assert main(["train", *TINY, "--max_steps", "1", "--checkpoint_dir", "run"]) == 0
    before = {p.name: p.read_bytes() for p in (in_tmp / "run").iterdir()}
    assert main(["train", *TINY, "--max_steps", "1", "--checkpoint_dir", "run"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (in_tmp / "run").iterdir()} == before


def test_resume_auto_continues_the_run(in_tmp, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--checkpoint_dir", "run"]) == 0
    step1 = torch.load(in_tmp / "run" / "epoch_1.pt")["global_step"]
    assert main(["train", *TINY, "--epochs", "2", "--checkpoint_dir", "run", "--resume", "auto"]) == 0
    ck = torch.load(in_tmp / "run" / "epoch_2.pt")
    assert ck["global_step"] == 2 * step1 and len(ck["history"]["train_loss"]) == 2


def test_help_lists_config_fields_with_their_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--train.learning_rate" in out and "AdamW peak learning rate" in out and "examples:" in out


@pytest.mark.parametrize("argv, says", [
    (["generate", "--promt", "hi"], "unrecognized arguments: --promt (did you mean --prompt?)"),
    (["eval", "--checkpint", "x"], "unrecognized arguments: --checkpint (did you mean --checkpoint?)"),
    (["chat", "--checkpont", "x"], "unrecognized arguments: --checkpont (did you mean --checkpoint?)"),
])
def test_an_unknown_flag_is_reported_before_a_missing_required_one(in_tmp, capsys, argv, says):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "required" not in err, err
