"""--report_to: TensorBoard and Weights & Biases (offline, no network) receive the same rows as
metrics.jsonl, each number under its row's kind at the row's step, and the resolved config."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sab_byon_omni.config import build_config
from sab_byon_omni.errors import SabError
from sab_byon_omni.training import trackers
from sab_byon_omni.training.launch import run_training

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

# 11 steps per epoch: the evaluation every 2 steps and the epoch end meet at step 22, two rows
# with a val_loss each, which must stay two values
RUN = dict(preset="tiny", num_samples=48, seq_len=64, epochs=2, batch_size=4, gradient_accumulation_steps=1,
           learning_rate=3e-3, precision="fp32", device="cpu", progress=False, log_interval=1, eval_interval=2,
           seed=3)


def expected(run: Path) -> dict[tuple[str, int], float]:
    """{(kind/name, step): value} of every number in metrics.jsonl (step and time are the axes)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind = row["kind"]  # every row says what it is
        assert kind in ("train", "eval", "epoch_end"), row
        for k, v in row.items():
            if k not in ("kind", "step", "time") and v is not None:
                key = (f"{kind}/{k}", row["step"])
                assert key not in out, f"{key} twice"
                out[key] = float(v)
    return out


def resolved_config(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["resume"] = "none"  # config.yaml says how to continue; the run itself started fresh
    return cfg


def assert_same_numbers(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=rel, abs_tol=1e-12), (key, got[key], value)


def tensorboard_scalars(run: Path) -> tuple[dict, dict, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    times = [e.wall_time for e in events.Scalars("train/loss")]
    (text,) = events.Tensors("config/text_summary")
    config = yaml.safe_load(text.tensor_proto.string_val[0].decode().removeprefix("```yaml\n").removesuffix("```"))
    return got, config, times


@pytest.mark.parametrize("spelling", [{"report_to": "tensorboard"}, {"tensorboard": True}])
def test_tensorboard_holds_the_metrics_rows_and_the_resolved_config(tmp_path, spelling):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run_training(build_config({**RUN, **spelling, "checkpoint_dir": str(run)}))
    got, config, times = tensorboard_scalars(run)
    want = expected(run)
    assert ("eval/val_loss", 22) in want and ("epoch_end/val_loss", 22) in want
    assert_same_numbers(got, want, rel=1e-6)  # TensorBoard keeps float32
    assert config == resolved_config(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert times == pytest.approx([r["time"] for r in rows], abs=1e-3)  # each row's time is its wall time


def test_a_missing_tracker_package_is_named_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = build_config({**RUN, "report_to": "wandb", "checkpoint_dir": str(tmp_path / "run")})
    with pytest.raises(SabError, match=r"train.report_to=wandb needs the wandb package \(pip install "
                                       r"'sab-byon-omni\[wandb\]'\)"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_rows_become_scalars_named_after_their_kind():
    assert trackers.scalars({"step": 3, "epoch": 1, "val_loss": 2.5, "time": 9.0}) == {"eval/epoch": 1.0,
                                                                                      "eval/val_loss": 2.5}
    assert trackers.scalars({"step": 3, "epoch": 1, "train_loss": None, "val_loss": 2.0, "time": 9.0}) == {
        "epoch_end/epoch": 1.0, "epoch_end/val_loss": 2.0}  # a value JSON could not hold is left out


# ------------------------------------------------------------------------------------- wandb
def wandb_records(path: Path):
    """The records of a W&B run file: a LevelDB-style log of 32 KiB blocks (header ':W&B'), each
    record a protobuf ``Record`` split into FULL/FIRST/MIDDLE/LAST chunks with 7-byte headers."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    i, pending = 7, b""
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a header is padding
            i += 32768 - i % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        pending += data[i + 7:i + 7 + length]
        i += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_logs_the_same_rows_and_the_config(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in RUN.items()]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "sab-test",
           "WANDB_DISABLE_CODE": "true", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-m", "sab_byon_omni.cli", "train", *args, "--report_to",
                          "tensorboard,wandb", "--checkpoint_dir", str(run)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history, config, name = {}, None, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.update({(k, items["_step"]): float(v) for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":
            name = record.run.display_name
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update
                      if item.key != "_wandb"}
    want = expected(run)
    assert_same_numbers(history, want, rel=0)  # JSON numbers: exact
    assert config == resolved_config(run) and name == "run"
    got, _, _ = tensorboard_scalars(run)  # both trackers at once
    assert_same_numbers(got, want, rel=1e-6)


def test_wandb_without_an_account_is_one_line_naming_offline_mode(in_tmp, capsys, monkeypatch):
    pytest.importorskip("wandb")
    from sab_byon_omni.cli import main

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(in_tmp / "wandb-config"))
    monkeypatch.setenv("NETRC", str(in_tmp / "no-netrc"))
    args = [f"--{k}={v}" for k, v in RUN.items()]
    assert main(["train", *args, "--report_to", "wandb", "--checkpoint_dir", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train.report_to=wandb: ") and "WANDB_MODE=offline" in err[-1], err
    assert not (in_tmp / "run").exists()  # the run folder it created is removed again
