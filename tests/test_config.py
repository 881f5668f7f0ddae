from pathlib import Path

import pytest
import yaml

from sab_byon_omni.config import DataConfig, ModelConfig, RunConfig, TrainConfig, build_config, load_config, replace
from sab_byon_omni.errors import SabError

ROOT = Path(__file__).resolve().parents[1]
GUIDE_TABLE = {"epochs": 3, "batch_size": 4, "gradient_accumulation_steps": 16, "learning_rate": 2e-5,
               "weight_decay": 0.01, "max_grad_norm": 1.0, "seq_len": 1024, "num_samples": 5000}


def flat(cfg: RunConfig) -> dict:
    return {k: v for section in cfg.to_dict().values() for k, v in section.items()}


def test_default_yaml_holds_the_guide_table_exactly():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert {k: flat(cfg)[k] for k in GUIDE_TABLE} == GUIDE_TABLE
    assert cfg.model.preset == "lightweight"
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 64


def test_built_in_defaults_equal_default_yaml():
    assert load_config(ROOT / "configs" / "default.yaml") == RunConfig()


def test_every_shipped_config_loads():
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"default", "lightweight", "tiny"}, shipped
    for path in shipped:
        assert isinstance(load_config(path), RunConfig)
        assert load_config(path.stem) == load_config(path)  # by name too: `sab-omni train --config lightweight`


def test_flat_guide_keys_are_accepted(tmp_path):
    p = tmp_path / "flat.yaml"
    p.write_text(yaml.safe_dump({**GUIDE_TABLE, "epochs": 1, "preset": "tiny"}))
    cfg = load_config(p)
    assert cfg.train.epochs == 1 and cfg.model.preset == "tiny" and cfg.data.seq_len == 1024


def test_presets():
    light = ModelConfig.from_name("lightweight")
    assert (light.hidden, light.n_heads, light.n_layers, light.ffn) == (768, 12, 6, 3072)
    big = ModelConfig.from_name("3b")
    assert (big.hidden, big.n_heads, big.n_layers, big.ffn) == (4096, 64, 36, 16384)


def test_changing_the_preset_resets_its_fields():
    cfg = replace(RunConfig(), preset="tiny")
    assert cfg.model.hidden == 64
    cfg = replace(RunConfig(), **{"model.preset": "tiny", "model.hidden": 128})
    assert cfg.model.hidden == 128


@pytest.mark.parametrize("raw, message", [
    ({"train": {"learning_rate": -1}}, "train.learning_rate=-1.0 must be positive"),
    ({"model": {"n_heads": 10}}, "model.n_heads=10 does not divide model.hidden=768"),
    ({"data": {"seq_len": 1}}, "data.seq_len=1 must be at least 2"),
    ({"model": {"preset": "huge"}}, "model.preset='huge' is not one of"),
    ({"train": {"epochs": "three"}}, "train.epochs='three' must be an integer"),
    ({"train": {"epochs": 0}}, "train.epochs=0 must be a positive integer"),
    ({"train": {"precision": "fp8"}}, "train.precision='fp8' is not one of"),
    ({"train": {"learnin_rate": 1}}, "unknown key 'train.learnin_rate'"),
    ({"scheduler": {}}, "unknown key 'scheduler'"),
    ({"optimizer": {}}, "train.optimizer={} must be a string"),
    ({"train": [1, 2]}, "section 'train' must be a mapping"),
    ({"train": {"max_grad_norm": float("nan")}}, "train.max_grad_norm=nan must be a finite number"),
    ({"model": {"fragmergent_mode": "time"}}, "model.fragmergent_mode='time' is not one of"),
    ({"train": {"compile": "maybe"}}, "train.compile='maybe' must be true or false"),
])
def test_invalid_values_name_the_field(raw, message):
    with pytest.raises(SabError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_config(raw)


def test_malformed_and_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(SabError, match="bad.yaml: invalid YAML at line"):
        load_config(bad)
    with pytest.raises(SabError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SabError, match="expected a mapping"):
        load_config(scalar)


def test_dotted_and_flat_overrides_and_string_coercion():
    cfg = load_config(None, {"train.learning_rate": "3e-4", "epochs": "2", "compile": "true", "vocab_size": "none"})
    assert cfg.train.learning_rate == 3e-4 and cfg.train.epochs == 2 and cfg.train.compile is True
    with pytest.raises(SabError, match="unknown option"):
        load_config(None, {"train.hidden": 3})


def test_every_field_has_help():
    from dataclasses import fields
    for cls in (ModelConfig, DataConfig, TrainConfig):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("flag, value, ok", [
    ("seed", 2**64, False), ("seed", -2**63 - 1, False), ("data_seed", -1, False), ("data_seed", 2**64, False),
    ("seed", 2**64 - 1, True), ("seed", -2**63, True), ("data_seed", 0, True), ("data_seed", 2**64 - 1, True),
])
def test_seeds_are_64_bit_and_an_out_of_range_one_is_one_error_line(in_tmp, capsys, flag, value, ok):
    """`train --seed 18446744073709551616` was a traceback from torch.manual_seed (issue 22, F7)."""
    from sab_byon_omni.cli import main
    from tests.helpers import tiny_run

    rc = main(["-q", "train", *tiny_run(checkpoint_dir="ck", max_steps=1), f"--{flag}", str(value)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if ok:
        assert rc == 0, err[-2000:]
    else:
        assert rc == 2 and [line for line in err.splitlines() if line.startswith("error: ")] == [
            f"error: {'train' if flag == 'seed' else 'data'}.{flag}={value} must be in "
            f"[{'-2**63' if flag == 'seed' else 0}, 2**64)"]
        assert not Path("ck").exists()
