import os
from pathlib import Path

import pytest
import torch

from sab_byon_omni.config import build_config
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint, to_cpu
from sab_byon_omni.training.checkpointer import Checkpointer
from sab_byon_omni.training.train_3b import train_3b_rapid

GUIDE_KEYS = {"epoch", "model_state_dict", "optimizer_state_dict", "loss", "global_step", "config"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    sab = SABTranscendentV2(preset="tiny")
    result = train_3b_rapid(sab, epochs=2, batch_size=8, grad_accum=2, seq_len=128, num_samples=120,
                            learning_rate=3e-3, checkpoint_dir=str(d / "checkpoints"), progress=False)
    return sab, result, d


def test_epoch_checkpoints_have_the_guide_keys_and_plain_primitives(trained):
    sab, result, d = trained
    for path in result.checkpoints:
        ck = torch.load(path)  # torch 2.13 default: weights_only=True
        assert GUIDE_KEYS <= ck.keys()
        assert {"scaler_state_dict", "scheduler_state_dict", "rng_state", "data_state", "tokenizer"} <= ck.keys()
        assert isinstance(ck["config"], dict) and ck["config"]["train"]["learning_rate"] == 3e-3
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model_state_dict"])
    assert [torch.load(p)["epoch"] for p in result.checkpoints] == [1, 2]


def saved_locations(path) -> set[str]:
    """The device every tensor of a checkpoint file was saved from ('cpu', 'cuda:0', ...), read
    without moving anything (works on a machine without CUDA)."""
    seen = set()

    def where(storage, location):
        seen.add(location)
        return storage

    torch.load(path, map_location=where, weights_only=True)
    return seen


def test_checkpoints_hold_cpu_tensors_only(trained):
    """A plain torch.load works on a CPU-only machine (tests/gpu saves them from a CUDA model)."""
    sab, result, d = trained
    for path in result.checkpoints:
        assert saved_locations(path) == {"cpu"}


def test_to_cpu_keeps_the_structure_and_state_dict_metadata():
    sd = torch.nn.LayerNorm(4).state_dict()
    ck = {"model": sd, "rng": (3, (1, 2), None), "opt": {"state": {0: {"step": torch.tensor(2.0)}}}, "n": 1}
    out = to_cpu(ck)
    assert out["n"] == 1 and type(out["model"]) is type(sd) and out["model"]._metadata == sd._metadata
    assert out["rng"] == (3, (1, 2), None) and torch.equal(out["opt"]["state"][0]["step"], torch.tensor(2.0))
    assert out["model"]["weight"] is sd["weight"]  # CPU tensors are not copied


def test_the_guides_loading_snippet_works_verbatim(trained):
    sab, result, d = trained
    model = SABTranscendentV2(preset="tiny").model
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() >= 2]},
         {"params": [p for p in model.parameters() if p.dim() < 2]}], lr=1e-3)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        checkpoint = torch.load('checkpoints/best_model.pt')
        model.load_state_dict(checkpoint['model_state_dict'])
        optimizer.load_state_dict(checkpoint['optimizer_state_dict'])
    finally:
        os.chdir(cwd)
    ids = torch.tensor([sab.tokenizer.encode("Consciousness is")])
    sab.model.to("cpu").eval()
    torch.testing.assert_close(model.eval()(ids), sab.model(ids))


def test_best_model_follows_the_validation_loss(trained):
    sab, result, d = trained
    best = torch.load(d / "checkpoints" / "best_model.pt")
    assert best["val_loss"] == min(result.val_losses)


def test_from_checkpoint_rebuilds_model_and_tokenizer(trained):
    sab, result, d = trained
    again = SABTranscendentV2.from_checkpoint(result.checkpoints[-1])
    ids = torch.tensor([sab.tokenizer.encode("[CODE] def")])
    torch.testing.assert_close(again.model.eval()(ids), sab.model.cpu().eval()(ids))
    assert again.config.model.preset == "tiny"


def test_compiled_model_saves_plain_keys(tmp_path):
    cfg = build_config({"model": {"preset": "tiny"}, "data": {"num_samples": 40, "seq_len": 64},
                        "train": {"epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 1,
                                  "compile": True, "checkpoint_dir": str(tmp_path), "progress": False}})
    from tests.helpers import trainer_for
    trainer = trainer_for(cfg)
    trainer.save_checkpoint("c", loss=0.0)
    keys = torch.load(tmp_path / "c.pt")["model_state_dict"].keys()
    assert "embed.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_checkpoint({"a": torch.ones(2)}, path)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(SabError, match="disk full"):
        save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"epoch": 1, "model_state_dict": {}, "global_step": 0, "config": {}}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(SabError, match="trunc.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(SabError, match="not a sab-byon-omni checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(SabError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def _fake_checkpoint(path, step):
    save_checkpoint({"epoch": 0, "model_state_dict": {}, "global_step": step, "config": {}}, path)


def test_prune_keeps_the_newest_step_checkpoints(tmp_path):
    for s in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path / f"step_{s}.pt", s)
    _fake_checkpoint(tmp_path / "epoch_1.pt", 12)
    _fake_checkpoint(tmp_path / "step_99.pt", 99)  # past the run's step (another branch): not counted, not deleted
    (tmp_path / "step_98.pt").write_bytes(b"damaged")
    Checkpointer(tmp_path, keep_last=2).prune(upto=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "step_15.pt", "step_20.pt", "step_98.pt",
                                                          "step_99.pt"]


def test_the_guides_snippet_works_with_the_documented_optimizer(trained):
    """A plain AdamW(model.parameters()) has one group and refuses the trainer's two-group state;
    ``make_optimizer`` builds the trainer's own optimizer, so the guide's lines run as written."""
    from sab_byon_omni.training.train_3b import make_optimizer

    sab, result, d = trained
    checkpoint = torch.load(d / "checkpoints" / "best_model.pt")
    model = SABTranscendentV2(preset="tiny").model
    with pytest.raises(ValueError, match="parameter group"):
        torch.optim.AdamW(model.parameters()).load_state_dict(checkpoint["optimizer_state_dict"])
    optimizer = make_optimizer(model)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    assert optimizer.state_dict()["state"].keys() == checkpoint["optimizer_state_dict"]["state"].keys()


def test_the_guides_snippet_works_with_a_muon_run(tmp_path):
    """A run with ``optimizer: muon`` saves one optimizer state (Muon's momentum and AdamW's
    moments); ``make_optimizer(model, config.train)`` loads it with the guide's line."""
    from sab_byon_omni.config import TrainConfig
    from sab_byon_omni.training.train_3b import make_optimizer

    sab = SABTranscendentV2(preset="tiny")
    train_3b_rapid(sab, epochs=1, batch_size=8, grad_accum=1, seq_len=64, num_samples=40, optimizer="muon",
                   checkpoint_dir=str(tmp_path / "ck"), progress=False)
    checkpoint = torch.load(tmp_path / "ck" / "epoch_1.pt")
    assert checkpoint["config"]["train"]["optimizer"] == "muon"
    model = SABTranscendentV2(preset="tiny").model
    optimizer = make_optimizer(model, TrainConfig(**checkpoint["config"]["train"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    kinds = {tuple(sorted(s)) for s in optimizer.state_dict()["state"].values()}
    assert ("momentum_buffer",) in kinds and ("exp_avg", "exp_avg_sq", "step") in kinds
    with pytest.raises(ValueError, match="parameter group"):  # the AdamW-only optimizer does not fit it
        make_optimizer(model).load_state_dict(checkpoint["optimizer_state_dict"])


def test_a_resume_from_a_hostile_optimizer_state_is_one_line_and_exit_2(in_tmp, capsys):
    """An Adam moment of the wrong size (which would crash fused AdamW) in a correctly checksummed
    checkpoint: refused at load with the file named, nothing written or lost."""
    from sab_byon_omni.cli import main
    from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint
    from tests.helpers import tiny_run

    args = ["train", *tiny_run(max_steps=2, save_every=2, optimizer="muon"), "--checkpoint_dir", "ck"]
    assert main(args) == 0
    ck = load_checkpoint("ck/step_2.pt")
    for key in ("format", "checksum"):
        ck.pop(key)
    state = next(s for s in ck["optimizer_state_dict"]["state"].values() if "exp_avg" in s)
    state["exp_avg"] = torch.zeros(5)
    save_checkpoint(ck, "ck/step_2.pt")
    before = sorted(p.name for p in Path("ck").iterdir())
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "step_2.pt: cannot resume from it" in err and "exp_avg (5,) does not fit" in err and "Traceback" not in err
    assert sorted(p.name for p in Path("ck").iterdir()) == before


@pytest.mark.parametrize("value", ["1e308", "11"])
def test_a_muon_rate_beyond_reason_is_refused(in_tmp, capsys, value):
    from sab_byon_omni.cli import main
    from tests.helpers import tiny_run

    assert main(["train", *tiny_run(optimizer="muon", muon_learning_rate=value), "--checkpoint_dir", "x"]) == 2
    assert "train.muon_learning_rate" in capsys.readouterr().err and not Path("x").exists()


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp resumes an fsdp folder", "fsdp resumes a ddp folder"])
def test_resume_auto_refuses_a_folder_of_the_other_kind_even_with_its_best_model(tmp_path, sharded):
    """A folder holding another kind's checkpoints (best_model among them, as every validated run
    writes) is refused, not started over: a new run there would drop the old run's metrics rows."""
    from sab_byon_omni.errors import SabError
    from sab_byon_omni.training.checkpointer import Checkpointer

    other = ".pt" if sharded else ".dcp"
    for name in ("step_2", "best_model"):
        target = tmp_path / f"{name}{other}"
        target.mkdir() if other == ".dcp" else target.write_bytes(b"x")
    with pytest.raises(SabError, match="holds only"):
        Checkpointer(tmp_path, sharded=sharded).resume_point("auto", verify=False)
    (tmp_path / f"step_2{other}").rename(tmp_path / "elsewhere")  # only the best model left: still that run's
    with pytest.raises(SabError, match="holds only"):
        Checkpointer(tmp_path, sharded=sharded).resume_point("auto", verify=False)
