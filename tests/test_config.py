import math
import re
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
    ({"optimizer": {}}, "train.optimizer={} is not one of: adamw, muon"),
    ({"train": [1, 2]}, "section 'train' must be a mapping"),
    ({"train": {"max_grad_norm": float("nan")}}, "train.max_grad_norm=nan must be a finite number"),
    ({"model": {"fragmergent_mode": "time"}}, "model.fragmergent_mode='time' is not one of"),
    ({"train": {"compile": "maybe"}}, "train.compile='maybe' must be true or false"),
    # hostile review items 6, 9, 13: accepted, then a math domain error or NaN at every forward
    ({"model": {"fragmergent_mode": "fixed", "fragmergent_t": 1e308}}, "model.fragmergent_t=1e+308 is out of range"),
    ({"model": {"fragmergent_omega": -1e300}}, "model.fragmergent_omega=-1e+300 is out of range"),
    ({"model": {"fragmergent_strength": 1e308}}, "would scale the embeddings by more than 100x"),
    ({"model": {"fragmergent_alpha": -100.0}}, "reaches e^9996"),  # e^(100 t) at step t = 100
    ({"model": {"rope_base": 1e-300}}, "model.rope_base=1e-300 is out of range: it must be in [1, 1e+12]"),
    ({"model": {"rope_scaling": "linear", "rope_scaling_factor": 1e-300}}, "model.rope_scaling_factor=1e-300 is out"),
    ({"model": {"rope_scaling": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0}},
     "model.rope_high_freq_factor=4.0 must be greater than model.rope_low_freq_factor=4.0"),
])
def test_invalid_values_name_the_field(raw, message):
    with pytest.raises(SabError, match=re.escape(message)):
        build_config(raw)


def test_malformed_and_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(SabError, match="bad.yaml: invalid YAML at line"):
        load_config(bad)
    with pytest.raises(SabError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    big = tmp_path / "big.yaml"  # PyYAML raises ValueError (not a YAMLError) for an int() of 5,000 digits
    big.write_text(f"train:\n  seed: {'1' * 5000}\n")
    with pytest.raises(SabError, match=r"big.yaml: a value in it cannot be read \(an integer of more than 4,300"):
        load_config(big)
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


def test_a_preset_is_built_whole_by_name_and_fields_given_win():
    from sab_byon_omni.config import PRESETS

    light = ModelConfig()  # concrete defaults, the lightweight preset's: no None to fill in later
    assert {k: getattr(light, k) for k in PRESETS["lightweight"]} == PRESETS["lightweight"]
    for name, dims in PRESETS.items():
        cfg = build_config({"preset": name})
        assert {k: getattr(cfg.model, k) for k in dims} == dims and cfg.model == ModelConfig.from_name(name)
    mixed = build_config({"model": {"preset": "tiny", "n_layers": 3}})
    assert (mixed.model.hidden, mixed.model.n_layers) == (64, 3)
    assert replace(mixed, hidden=128).model.n_layers == 3  # only a new preset brings new dimensions
    assert replace(mixed, preset="small").model.n_layers == 4
    assert ModelConfig.from_name("tiny", n_layers=3) == mixed.model
    with pytest.raises(SabError, match="model.preset='huge' is not one of"):
        ModelConfig.from_name("huge")


def test_a_stored_config_with_earlier_key_names_loads_as_it_was():
    """A checkpoint stores every field (to_dict); one from before the renames keeps loading."""
    cfg = build_config({"preset": "tiny", "hidden": 96, "length_bucket_size": 8, "auto_micro_batch": True})
    assert build_config(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old["data"]["length_bucketing"] = old["data"].pop("length_bucket_size")
    old["train"]["micro_batch_size"] = {True: "auto", False: "fixed"}[old["train"].pop("auto_micro_batch")]
    assert build_config(old) == cfg
    assert list(cfg.to_dict()) == ["model", "data", "train"] and "preset" in cfg.to_dict()["model"]


@pytest.mark.parametrize("key, given, value", [
    ("epochs", "3.0", 3), ("epochs", 3.0, 3), ("num_samples", "1e3", 1000), ("seed", "18446744073709551615", 2**64 - 1),
    ("vocab_size", "none", None), ("vocab_size", "", None), ("init_from", "null", None), ("cache_dir", "None", None),
    ("compile", "yes", True), ("shuffle", "off", False), ("progress", "0", False), ("learning_rate", "3e-4", 3e-4),
    ("dataset", 2024, "2024"), ("device", "true", "true"), ("resume", "none", "none"), ("memory_saving", False, "off"),
])
def test_a_value_is_read_by_its_field_type(key, given, value):
    """Flags arrive as strings, and YAML 1.1 reads 3e-4 as a string: each is read as its field's type."""
    assert flat(build_config({key: given}))[key] == value


@pytest.mark.parametrize("raw, message", [
    ({"epochs": 3.5}, "train.epochs=3.5 must be an integer"),
    ({"epochs": True}, "train.epochs=True must be an integer"),
    ({"epochs": None}, "train.epochs must not be empty"),
    ({"dataset": None}, "data.dataset must not be empty"),
    ({"learning_rate": [1]}, "train.learning_rate=[1] must be a number"),
    ({"device": {"class_path": "os.system"}}, "train.device={'class_path': 'os.system'} must be a string"),
    ({"precision": "FP16"}, "train.precision='FP16' is not one of: auto, fp32, bf16, fp16 (did you mean 'fp16'?)"),
    ({"tokenizer": "bpe2"}, "data.tokenizer='bpe2' is not one of: char96, byte, bpe, hf (did you mean 'bpe'?)"),
    ({"learning_rate": 10**400}, "config: a value is too large"),
    ({"max_steps": "1" * 5000}, "is too large (a number of 5,000 digits)"),  # a flag: it said "must be an integer"
    ({"data": {"micro_batch_size": "auto"}}, "unknown key 'data.micro_batch_size'"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_field(raw, message):
    with pytest.raises(SabError) as e:
        build_config(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["epochs", "learning_rate", "compile", "vocab_size", "dataset", "init_from",
                                  "precision"])
def test_a_string_value_is_never_expanded_through_yaml_aliases(name):
    """A config file refuses YAML aliases; a value must not bring them back. jsonargparse reads a
    string as YAML with aliases (for a number field even with its parser in json mode): expanded,
    this 330-byte string is 9**7 items and the error message alone 17 MB."""
    import tracemalloc

    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    bomb = "[" + ", ".join(levels) + "]"
    build_config({})  # the checker is built once, outside the measurement
    tracemalloc.start()
    try:
        try:
            build_config({name: bomb})
        except SabError as e:
            assert "\n" not in str(e) and len(str(e)) < 300
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes"


@pytest.mark.parametrize("mode, values", [
    ("fixed", {"fragmergent_t": 1e6, "fragmergent_omega": 1e6}),
    ("fixed", {"fragmergent_t": -1e6, "fragmergent_alpha": 0.0, "fragmergent_strength": 400.0}),
    ("step", {"fragmergent_alpha": -0.02, "fragmergent_strength": 50.0, "fragmergent_lambda": 0.2}),
])
def test_the_fragmergent_values_accepted_give_a_finite_moderate_factor(mode, values):
    """The bounds are the ones that matter: at their edges the factor is still finite and at most 101."""
    from sab_byon_omni.model.fragmergent import Fragmergent

    cfg = ModelConfig(fragmergent_mode=mode, **values)
    f = Fragmergent(mode, cfg.fragmergent_t, cfg.fragmergent_alpha, cfg.fragmergent_lambda, cfg.fragmergent_omega,
                    cfg.fragmergent_strength)
    for step in range(0, 100, 7):
        f.set_step(step)
        scale = float(f.scale())
        assert math.isfinite(scale) and abs(scale) <= 101


def test_an_explicit_max_seq_len_below_seq_len_is_refused_not_overruled():
    """``--seq_len 32 --max_seq_len 4`` trained with max_seq_len 32 silently (hostile review item 11);
    a preset's own shorter max_seq_len is still raised to seq_len when the model is built."""
    with pytest.raises(SabError, match="model.max_seq_len=4 is below data.seq_len=32"):
        load_config(None, {"seq_len": 32, "max_seq_len": 4})
    assert load_config(None, {"seq_len": 32, "max_seq_len": 32}).model.max_seq_len == 32
    assert load_config(None, {"preset": "tiny", "seq_len": 4096}).data.seq_len == 4096
