"""Hostile and damaged inputs beyond the plain ``.pt`` payloads of test_security.py: sharded (DCP)
checkpoints that carry code, memory and time bombs built from shared references (YAML aliases,
checkpoint pickles), a checksum that catches a flipped bit, and the inputs that used to end in a
traceback or a hang instead of one ``error:`` line."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sab_byon_omni.cli import main
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint
from sab_byon_omni.files.untrusted import MAX_NODES, check_pickle, check_torch_file
from tests.hostile import (
    Payload,
    assert_one_error_line,
    claim_size,
    deferred_bomb,
    flip_tensor_bit,
    opcode_run,
    plant_metadata_payload,
    run_bounded,
    snapshot,
    torch_bytes,
    tuple_key_bomb,
    unsafe_dcp_load,
    with_pickle,
    with_record,
    write_dcp,
)

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

TRAIN = ["-q", "train", "--preset", "tiny", "--epochs", "1", "--num_samples", "24", "--seq_len", "32",
         "--batch_size", "4", "--gradient_accumulation_steps", "1", "--precision", "fp32", "--device", "cpu",
         "--progress", "false", "--max_steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run: ck/step_2.pt."""
    d = tmp_path_factory.mktemp("run")
    assert main([*TRAIN, "--checkpoint_dir", str(d / "ck")]) == 0
    return d / "ck" / "step_2.pt"


# ------------------------------------------------------------------------------ sharded (DCP)
DCP_PAYLOADS = ["metadata_object_field", "metadata_alone", "shard_byte_entry"]


def _evil_dcp(where: str, path: Path, marker: Path) -> Path:
    if where == "shard_byte_entry":  # a pickled optimizer hyper-parameter inside __0_0.distcp
        return write_dcp(path, optimizer_extra={"lr": Payload(marker)})
    write_dcp(path)
    plant_metadata_payload(path, marker, inside=where == "metadata_object_field")
    return path


@pytest.mark.parametrize("where", DCP_PAYLOADS)
def test_the_dcp_payloads_are_real(tmp_path, where):
    """Control: torch's own DCP reader runs each planted payload."""
    marker = tmp_path / "proof.txt"
    unsafe_dcp_load(_evil_dcp(where, tmp_path / "evil.dcp", marker))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("where", DCP_PAYLOADS)
def test_a_sharded_checkpoint_carrying_code_is_refused_and_never_runs(in_tmp, capsys, where):
    marker = in_tmp / "pwned.txt"
    evil = _evil_dcp(where, in_tmp / "evil.dcp", marker)
    before = snapshot(evil)
    commands = [["consolidate", "evil.dcp", "-o", "out.pt"], [*TRAIN, "--checkpoint_dir", "ck", "--resume", "evil.dcp"]]
    if where != "shard_byte_entry":  # loading only the model never reads the optimizer's entries
        commands += [["generate", "--checkpoint", "evil.dcp", "--prompt", "x"], ["eval", "--checkpoint", "evil.dcp"]]
    for argv in commands:
        assert main(argv) == 2, argv
        line = assert_one_error_line(capsys.readouterr().err, "evil.dcp", "refused")
        assert "DCP" in line or "pickled entry" in line
    assert not marker.exists(), "the payload ran"
    assert not Path("out.pt").exists() and not Path("ck").exists()
    assert snapshot(evil) == before


def test_damaged_sharded_checkpoints_are_one_error_line(in_tmp, capsys):
    good = write_dcp(in_tmp / "good.dcp")
    cases = {"no_metadata": lambda d: (d / ".metadata").unlink(),
             "truncated_metadata": lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:100]),
             "missing_shard": lambda d: (d / "__0_0.distcp").unlink(),
             "truncated_shard": lambda d: (d / "__0_0.distcp").write_bytes(b"\0" * 100),
             "shard_outside_the_folder": lambda d: (d / ".metadata").write_bytes(
                 (d / ".metadata").read_bytes().replace(b"__0_0.distcp", b"../../0.distcp")),
             "not_metadata": lambda d: (d / ".metadata").write_bytes(pickle.dumps({"a": 1}))}
    import shutil

    for name, damage in cases.items():
        d = in_tmp / f"{name}.dcp"
        shutil.copytree(good, d)
        damage(d)
        assert main(["consolidate", str(d), "-o", f"{name}.pt"]) == 2, name
        assert_one_error_line(capsys.readouterr().err, f"{name}.dcp")
        assert not Path(f"{name}.pt").exists()


# ------------------------------------------------------------------------------------ bombs
def _nested(levels: int = 8, fan: int = 9) -> list:
    a = ["x"] * fan
    for _ in range(levels - 1):
        a = [a] * fan  # shared: 9**8 leaves from a few hundred bytes
    return a


def _bomb_checkpoints(trained: Path, d: Path) -> dict[str, Path]:
    ck = load_checkpoint(trained)
    cycle: list = [1]
    cycle.append(cycle)
    cases = {"config_bomb": {**ck, "config": {**ck["config"], "data": {**ck["config"]["data"], "dataset": _nested()}}},
             "history_bomb_fake_checksum": {**ck, "history": {"train_loss": _nested()}},
             "cycle": {**ck, "loss": cycle}}
    out = {}
    for name, obj in cases.items():
        out[name] = d / f"{name}.pt"
        torch.save(obj, out[name])
    out["tuple_key_hash_bomb"] = d / "tuple_key_hash_bomb.pt"
    out["tuple_key_hash_bomb"].write_bytes(with_pickle(torch_bytes({"a": 1}), tuple_key_bomb(40)))
    out["deferred_list_bomb"] = d / "deferred_list_bomb.pt"
    out["deferred_list_bomb"].write_bytes(with_pickle(torch_bytes({"a": 1}), deferred_bomb()))
    # 64 MB of None-then-POP opcodes deflated into a 66 KB data.pkl: the scan used to read all of it
    # and build a graph of 3x10^7 objects (gigabytes); torch.save never compresses a record
    out["compressed_opcode_bomb"] = d / "compressed_opcode_bomb.pt"
    out["compressed_opcode_bomb"].write_bytes(with_record(torch_bytes({"a": 1}), "data.pkl", [
        b"\x80\x02", *[b"N0" * (1 << 19)] * 64, b"N."]))
    assert out["compressed_opcode_bomb"].stat().st_size < 100_000
    # the same opcodes as a sharded checkpoint's .metadata (50 MB: DCP metadata is a plain pickle file)
    out["opcode_bomb.dcp"] = write_dcp(d / "opcode_bomb.dcp")
    with open(out["opcode_bomb.dcp"] / ".metadata", "wb") as f:
        f.write(b"\x80\x04")
        for _ in range(50):
            f.write(b"N0" * (1 << 19))
        f.write(b"N.")
    return out


def test_bombs_and_hangs_end_in_one_error_line_with_bounded_memory_and_time(trained, in_tmp):
    """A 300-byte YAML of nested aliases in a known field, checkpoints whose structure explodes when
    walked or hashed (for every command that reads them) and a batch size with a huge prime factor:
    each one line within 30 s, in a child whose address space is capped at 1.5 GB."""
    levels = ["&a [x,x,x,x,x,x,x,x,x]"] + [f"&{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefg", "bcdefgh")]
    Path("bomb.yaml").write_text(f"data:\n  dataset: [{', '.join(levels)}]\n")  # 9**8 leaves, all in data.dataset
    assert Path("bomb.yaml").stat().st_size < 400
    commands = [["train", "--config", "bomb.yaml"], [*TRAIN, "--checkpoint_dir", "ck", "--batch_size", "1000000007"],
                [*TRAIN, "--checkpoint_dir", "ck", "--batch_size", str(2**20), "--gradient_accumulation_steps",
                 str(2**20 - 1), "--auto_micro_batch", "true"]]
    for path in _bomb_checkpoints(trained, in_tmp).values():
        commands += [["generate", "--checkpoint", str(path), "--prompt", "x"], ["eval", "--checkpoint", str(path)],
                     ["export", "--checkpoint", str(path), "-o", f"{path.stem}.safetensors"],
                     [*TRAIN, "--checkpoint_dir", "ck", "--resume", str(path)]]
        if path.suffix == ".dcp":
            commands += [["consolidate", str(path), "-o", "consolidated.pt"]]
    results = run_bounded(commands, in_tmp, memory_mb=1500, seconds=30)
    for argv, (rc, err) in zip(commands, results):
        assert rc == 2, (argv, rc, err[-2000:])
        line = assert_one_error_line(err)
        assert len(line) < 400, line
    assert not list(in_tmp.glob("*.safetensors")) and not Path("ck").exists() and not Path("consolidated.pt").exists()


def test_the_pickle_scan_refuses_bombs_and_cycles_and_passes_real_checkpoints(trained):
    for name, data in {"deferred": deferred_bomb(), "tuple_key": tuple_key_bomb(40),
                       "shared_lists": pickle.dumps(_nested(), protocol=2)}.items():
        with pytest.raises(SabError, match="expands to more than"):
            check_pickle(data, name)
    cycle: dict = {}
    cycle["self"] = cycle
    with pytest.raises(SabError, match="contains itself"):
        check_pickle(pickle.dumps(cycle, protocol=2), "cycle")
    with pytest.raises(SabError, match="not a readable pickle"):
        check_pickle(b"\x80\x02]q\x00e.", "malformed")  # APPENDS without a mark
    shared_but_small = [[1.0] * 100] * 100  # real data shares references too: 10**4 nodes pass
    check_pickle(pickle.dumps({"a": shared_but_small, "b": (1, 2)}, protocol=2), "fine")
    import zipfile

    z = zipfile.ZipFile(trained)
    check_pickle(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))), "a real checkpoint")
    assert MAX_NODES >= 10**6


# -------------------------------------------------------------------------------- integrity
def test_a_flipped_bit_inside_a_tensor_is_refused(trained, in_tmp, capsys):
    bad = in_tmp / "flipped.pt"
    bad.write_bytes(trained.read_bytes())
    ck = load_checkpoint(trained)
    flip_tensor_bit(bad, ck["model_state_dict"]["blocks.0.mlp.up.weight"] if "blocks.0.mlp.up.weight" in
                    ck["model_state_dict"] else next(iter(ck["model_state_dict"].values())))
    with pytest.raises(SabError, match="checksum"):
        load_checkpoint(bad)
    for argv, advice in (([*TRAIN, "--checkpoint_dir", "ck", "--resume", str(bad)], "resume from another checkpoint"),
                         (["generate", "--checkpoint", str(bad), "--prompt", "x"], "use another copy"),
                         (["eval", "--checkpoint", str(bad)], "use another copy"),
                         (["export", "--checkpoint", str(bad), "-o", "m.safetensors"], "use another copy")):
        assert main(argv) == 2, argv
        line = assert_one_error_line(capsys.readouterr().err, "flipped.pt", "checksum", "damaged", advice)
        assert argv[0] != "generate" or "resume" not in line, line  # the advice fits the command
    assert not Path("m.safetensors").exists()


# --------------------------------------------------------------------- one line, not a traceback
def _variant(trained: Path, out: Path, **changes) -> Path:
    """A copy of the trained checkpoint with top-level or ``config.<section>.<field>`` changes."""
    ck = load_checkpoint(trained)
    for key, value in changes.items():
        if "__" in key:
            section, name = key.split("__")
            ck["config"] = {**ck["config"], section: {**ck["config"][section], name: value}}
        elif key == "data_state":
            ck["data_state"] = {**ck["data_state"], **value}
        elif key == "weights":
            ck["model_state_dict"] = {k: torch.full_like(v, value) for k, v in ck["model_state_dict"].items()}
        else:
            ck[key] = value
    save_checkpoint(ck, out)  # a valid checksum: the values are what is wrong
    return out


def _exported(trained: Path, out: Path, config: str) -> Path:
    from safetensors import safe_open

    from sab_byon_omni.core.export import export_safetensors

    export_safetensors(trained, out.with_suffix(".good.safetensors"))
    with safe_open(str(out.with_suffix(".good.safetensors")), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={**meta, "config": config})
    return out


def _pretrained(trained: Path, out: Path, edit) -> Path:
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    SABTranscendentV2.load(trained).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(edit(cfg))
    return out


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


CASES = {  # name -> (build(trained, tmp) -> argv, what the error line names)
    "seq_len 10^9 on the command line": (lambda c, t: [*TRAIN, "--seq_len", "1000000000"], "seq_len"),
    "seq_len 10^9 in a checkpoint's config": (
        lambda c, t: ["generate", "--checkpoint", str(_variant(c, t / "s.pt", data__seq_len=10**9)), "--prompt", "x"],
        "seq_len"),
    "seq_len 10^9 in safetensors metadata": (
        lambda c, t: ["generate", "--checkpoint", str(_exported(c, t / "s.safetensors", json.dumps(
            {"data": {"seq_len": 10**9}, "model": {"preset": "tiny"}}))), "--prompt", "x"], "seq_len"),
    "seq_len 10^9 in a saved model's config.json": (
        lambda c, t: ["generate", "--checkpoint", str(_pretrained(c, t / "m", lambda j: json.dumps(
            {**j, "data": {**j["data"], "seq_len": 10**9}}))), "--prompt", "x"], "seq_len"),
    "deeply nested JSON in safetensors metadata": (
        lambda c, t: ["generate", "--checkpoint", str(_exported(c, t / "d.safetensors", _deep())), "--prompt", "x"],
        "d.safetensors"),
    "deeply nested config.json": (
        lambda c, t: ["generate", "--checkpoint", str(_pretrained(c, t / "m", lambda j: _deep())), "--prompt", "x"],
        "config.json"),
    "bpe vocabulary of 10^9": (lambda c, t: [*TRAIN, "--tokenizer", "bpe", "--bpe_vocab_size", "1000000000"],
                               "bpe_vocab_size"),
    "temperature nan": (lambda c, t: ["generate", "--checkpoint", str(c), "--prompt", "x", "--temperature", "nan"],
                        "temperature"),
    "NaN weights": (lambda c, t: ["generate", "--checkpoint", str(_variant(c, t / "n.pt", weights=math.nan)),
                                  "--prompt", "x"], "non-finite"),
    "device meta for train": (lambda c, t: [*TRAIN, "--device", "meta"], "meta"),
    "device meta for generate": (lambda c, t: ["generate", "--checkpoint", str(c), "--prompt", "x", "--device",
                                               "meta"], "meta"),
    "negative data cursor": (lambda c, t: [*TRAIN, "--resume", str(_variant(c, t / "c.pt", data_state={"cursor": -4}))],
                             "cursor"),
    "data cursor 10^12": (lambda c, t: [*TRAIN, "--resume", str(_variant(c, t / "c.pt",
                                                                         data_state={"cursor": 10**12}))], "cursor"),
    "negative global_step": (lambda c, t: [*TRAIN, "--resume", str(_variant(c, t / "g.pt", global_step=-3))],
                             "global_step"),
    "non-integer global_step on export": (
        lambda c, t: ["export", "--checkpoint", str(_variant(c, t / "g.pt", global_step=2.5)), "-o", "x.safetensors"],
        "global_step"),
    "legacy pickle to --resume": (lambda c, t: [*TRAIN, "--resume", str(_legacy(c, t / "legacy.pt"))], "refused"),
    "estimate of -5 tokens": (lambda c, t: ["estimate", "--tokens", "-5"], "--tokens"),
    # hostile review items 6 and 13: a math domain error at every forward; "file not found" for a device
    "fragmergent_t 1e308 on the command line": (
        lambda c, t: [*TRAIN, "--fragmergent_mode", "fixed", "--fragmergent_t", "1e308"], "fragmergent_t=1e+308"),
    "fragmergent_t 1e308 in safetensors metadata, exported": (
        lambda c, t: ["export", "--format", "hf", "-o", "out_hf", "--checkpoint", str(_exported(c, t / "f.safetensors",
            json.dumps({"model": {"preset": "tiny", "fragmergent_mode": "fixed", "fragmergent_t": 1e308}})))],
        "fragmergent_t=1e+308"),
    "rope_base 1e-300": (lambda c, t: [*TRAIN, "--rope_base", "1e-300"], "rope_base=1e-300 is out of range"),
    "tokenizer_path /dev/zero": (lambda c, t: [*TRAIN, "--tokenizer", "bpe", "--tokenizer_path", "/dev/zero"],
                                 "not a regular file (a character device)"),
}


def _legacy(trained: Path, out: Path) -> Path:
    torch.save(load_checkpoint(trained), out, _use_new_zipfile_serialization=False)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(trained, in_tmp, capsys, case):
    _one_error_line_and_nothing_written(*CASES[case], trained, in_tmp, capsys)


def _one_error_line_and_nothing_written(build, needle: str, trained: Path, in_tmp: Path, capsys) -> None:
    argv = build(trained, in_tmp)
    if argv[0] == "-q":
        argv += ["--checkpoint_dir", "ck"]
    before = snapshot(in_tmp)
    assert main(argv) == 2, argv
    assert_one_error_line(capsys.readouterr().err, needle)
    assert snapshot(in_tmp) == before and not Path("ck").exists()  # nothing written


def test_a_temperature_too_small_to_divide_by_samples_greedily(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "Con", "--temperature", "1e-45",
                 "--max-new-tokens", "8"]) == 0
    tiny = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "Con", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == tiny


def test_checkpoint_values_out_of_range_are_refused_by_the_loader(trained, tmp_path):
    from sab_byon_omni.training.checkpointer import read_train_state

    ck = load_checkpoint(trained)
    for bad in (-1, 2.5, True, 10**13, "3"):
        with pytest.raises(SabError, match="global_step"):
            load_checkpoint(_variant(trained, tmp_path / "x.pt", global_step=bad))
    for cursor in (-1, 10**12, 1.5):
        with pytest.raises(SabError, match="cursor"):
            read_train_state({**ck, "data_state": {**ck["data_state"], "cursor": cursor}}, "x.pt", 100)


def test_deeply_nested_json_in_data_and_metrics_is_skipped_not_a_traceback(tmp_path, caplog):
    from sab_byon_omni.config import DataConfig
    from sab_byon_omni.data.factory import load_datasets
    from sab_byon_omni.plotting import read_metrics

    data = tmp_path / "data"
    data.mkdir()
    (data / "deep.json").write_text(_deep())
    (data / "deep.jsonl").write_text(_deep() + '\n{"text": "hello there"}\n')
    (data / "a.txt").write_text("plain words to train on\n" * 300)
    (data / "b.txt").write_text("more plain words to hold out\n" * 300)
    _, train, _ = load_datasets(DataConfig(dataset=str(data), seq_len=16, cache_dir=str(tmp_path / "cache")))
    assert len(train) > 0
    assert any("deep.jsonl:1" in r.getMessage() for r in caplog.records)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n' + _deep() + "\n")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


# ------------------------------------------------------------------- bombs bounded by the file's size
def test_a_compressed_or_oversized_record_is_refused_before_it_is_read(trained):
    """torch.save stores every record as it is, so a compressed one (a 66 KB record that inflates to
    64 MB, or a bzip2/lzma one that torch cannot even read) or one whose header claims more bytes
    than it stores is refused from the zip's directory, with almost no memory; a real checkpoint
    re-zipped with deflate (which torch would read) is refused the same way."""
    import io
    import tracemalloc
    import zipfile

    base = torch_bytes({"a": torch.zeros(3)})
    opcodes = [b"\x80\x02", *[b"N0" * (1 << 19)] * 64, b"N."]
    real = trained.read_bytes()
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(real)) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    cases = {"bzip2 pickle": with_record(base, "data.pkl", [opcode_run(b"N0", 10)], 12),
             "pickle claims 10^9 bytes": claim_size(base, "data.pkl", 10**9),
             "tensor claims 10^9 bytes": claim_size(base, "data/0", 10**9),
             "lzma tensor": with_record(base, "data/0", [b"\0" * (1 << 20)] * 8, 14),
             "a real checkpoint deflated": deflated.getvalue(),
             "deflated opcodes": with_record(base, "data.pkl", opcodes)}
    for name, data in cases.items():
        tracemalloc.start()
        try:
            with pytest.raises(SabError, match="compressed|claims") as e:
                check_torch_file(io.BytesIO(data), name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "\n" not in str(e.value) and peak < 4 << 20, (name, peak)
    check_torch_file(io.BytesIO(real), "the real checkpoint")  # the control: stored records pass


def test_cheap_opcode_runs_are_refused_by_count_not_by_exhaustion(monkeypatch):
    """None-then-POP (what the 2.47 GB bomb was made of) is refused at its first POP; other cheap
    runs stop at the opcode, object or reference limits (shown here with small limits), and marks
    are found without searching the stack (10^5 objects under 10^5 empty batches used to cost 10^10
    steps)."""
    from sab_byon_omni.files import untrusted

    with pytest.raises(SabError, match="discards objects"):
        check_pickle(opcode_run(b"N0", 10), "none-pop")
    for unit in (b"(1", b"N2"):  # MARK/POP_MARK, NONE/DUP
        with pytest.raises(SabError, match="discards objects"):
            check_pickle(opcode_run(unit, 10), unit.decode())
    check_pickle(opcode_run(b"(e", 10**5, head=b"]" + b"N" * 10**5, tail=b"."), "marks")  # many marks: fast
    monkeypatch.setattr(untrusted, "MAX_OPS", 1000)
    monkeypatch.setattr(untrusted, "MAX_NODES", 400)
    for name, data in {"empty batches": opcode_run(b"(e", 2000, head=b"]", tail=b"."),
                       "a memo entry per opcode": opcode_run(b"r\0\0\0\0", 2000, head=b"N"),
                       "a long list": opcode_run(b"Na", 500, head=b"]", tail=b"."),
                       "references to one object": opcode_run(b"h\0a", 500, head=b"Nq\0]", tail=b".")}.items():
        with pytest.raises(SabError, match="more than") as e:
            check_pickle(data, name)
        assert "refused to load" in str(e.value)


def test_a_3b_preset_sized_checkpoint_passes_the_scan():
    """The limits leave room: the pickle of a 3b-preset checkpoint (every weight of 36 layers, AdamW's
    step and two moments for each, the config, a long loss history) is about 2x10^4 objects."""
    import io
    import pickletools
    import zipfile

    from sab_byon_omni.config import PRESETS

    layers = PRESETS["3b"]["n_layers"]
    names = ["embed.weight", "fragmergent.step", "norm.weight", "head.weight"] + [
        f"blocks.{i}.{n}" for i in range(layers) for n in ("norm1.weight", "attn.qkv.weight", "attn.proj.weight",
                                                           "norm2.weight", "mlp.up.weight", "mlp.down.weight")]
    one = torch.zeros(1)  # the pickle's size does not depend on the tensors' sizes
    ck = {"epoch": 3, "global_step": 10**6, "config": {"model": dict(PRESETS["3b"]), "train": {"lr": 1e-4}},
          "model_state_dict": {n: one.clone() for n in names},
          "optimizer_state_dict": {"state": {i: {"step": torch.tensor(1.0), "exp_avg": one.clone(),
                                                 "exp_avg_sq": one.clone()} for i in range(len(names))},
                                   "param_groups": [{"params": list(range(len(names))), "lr": 1e-4}]},
          "history": {"train_loss": [1.0] * 1000, "val_loss": [1.0] * 1000}, "rng_state": {"python": list(range(625))}}
    data = torch_bytes(ck)
    check_torch_file(io.BytesIO(data), "3b-sized")
    pkl = zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl")
    objects = sum(1 for op, _, _ in pickletools.genops(pkl) if op.stack_after and op.name not in ("MEMOIZE", "MARK"))
    assert 10**4 < objects < MAX_NODES // 20, objects


# ------------------------------------------------------------- DCP metadata cannot rewire what it imports
def _rewiring_pickle(target: str) -> bytes:
    """A ~100-byte .metadata whose BUILD sets the attribute ``sab_rewired`` on something shared: the
    class PosixPath, the function torch.serialization._get_layout (its layout cache lives in its
    __dict__), or a member of DCP's _MEM_FORMAT_ENCODING enum (one object for the whole process)."""
    def text(s: str) -> bytes:
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    state = b"N}" + text("sab_rewired") + text("by a file") + b"s\x86b."  # (None, {...}): setattr, one by one
    if target == "class":
        return b"\x80\x02cpathlib\nPosixPath\n" + state
    if target == "function":
        return b"\x80\x02ctorch.serialization\n_get_layout\n" + state
    return b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00\x85R" + state


def _rewired(target: str):
    import pathlib

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
    from torch.serialization import _get_layout

    return {"class": pathlib.PosixPath, "function": _get_layout, "member": _MEM_FORMAT_ENCODING(0)}[target]


@pytest.mark.parametrize("target", ["class", "function", "member"])
def test_the_rewiring_pickle_is_real(target):
    """Control: through the allow-list alone (the unpickler DCP metadata used to go through) the
    file does set the attribute: on the class for every PosixPath, on the shared function or enum member."""
    import io

    from sab_byon_omni.files.dcp import _MetadataUnpickler

    obj = _rewired(target)
    assert not hasattr(obj, "sab_rewired")
    try:
        _MetadataUnpickler(io.BytesIO(_rewiring_pickle(target))).load()
        assert getattr(obj, "sab_rewired", None) == "by a file"
        if target == "class":
            assert Path("anything").sab_rewired == "by a file"  # every path in the process sees it
    finally:
        if "sab_rewired" in vars(obj):
            delattr(obj, "sab_rewired")


@pytest.mark.parametrize("target", ["class", "function", "member"])
def test_a_dcp_metadata_cannot_set_attributes_on_what_it_imports(in_tmp, capsys, target):
    dcp_dir = write_dcp(in_tmp / "evil.dcp")
    (dcp_dir / ".metadata").write_bytes(_rewiring_pickle(target))
    assert len(_rewiring_pickle(target)) < 120
    obj = _rewired(target)
    try:
        for argv in (["consolidate", "evil.dcp", "-o", "out.pt"], ["generate", "--checkpoint", "evil.dcp",
                                                                    "--prompt", "x"]):
            assert main(argv) == 2
            assert_one_error_line(capsys.readouterr().err, "evil.dcp", "refused")
            assert not hasattr(obj, "sab_rewired"), "the file changed a class, function or shared object"
    finally:
        if "sab_rewired" in vars(obj):
            delattr(obj, "sab_rewired")
    assert not Path("out.pt").exists()


def test_real_dcp_metadata_still_loads(in_tmp):
    from sab_byon_omni.files.dcp import read_metadata

    metadata = read_metadata(write_dcp(in_tmp / "good.dcp"))
    assert "model.embed.weight" in metadata.state_dict_metadata


# ---------------------------------------------------- one planted file no longer breaks every resume
def _planted(trained: Path, out: Path, kind: str) -> Path:
    """A copy of the trained checkpoint, changed the way a damaged disk or an attacker could, with a
    valid checksum where one can be computed (else the old one)."""
    ck = load_checkpoint(trained)
    weights = dict(ck["model_state_dict"])
    name = "blocks.0.attn.qkv.weight"
    if kind == "format ²":
        ck["format"] = "sab-byon-omni/²"
    elif kind == "format of 5000 digits":
        ck["format"] = "sab-byon-omni/" + "9" * 5000
    elif kind == "sparse":
        weights[name] = weights[name].to_sparse()
    elif kind == "sparse csr":
        weights[name] = weights[name].to_sparse_csr()
    elif kind == "quantized":
        weights[name] = torch.quantize_per_tensor(weights[name], 0.01, 0, torch.qint8)
    elif kind == "meta":
        weights[name] = torch.empty(weights[name].shape, device="meta")
    elif kind == "nested":
        weights[name] = torch.nested.nested_tensor([weights[name][0], weights[name][1]])
    elif kind == "complex64":
        weights[name] = weights[name].to(torch.complex64)
    ck["model_state_dict"] = weights
    try:
        save_checkpoint({k: v for k, v in ck.items() if k != "format"}, out)
        if kind.startswith("format"):  # save_checkpoint writes its own tag: put the planted one back
            torch.save({**load_checkpoint(out), "format": ck["format"]}, out)
    except (RuntimeError, NotImplementedError):  # no checksum of a sparse, meta or nested tensor
        torch.save(ck, out)
    return out


PLANTED = ["format ²", "format of 5000 digits", "sparse", "sparse csr", "quantized", "meta", "nested", "complex64"]


@pytest.mark.parametrize("kind", PLANTED)
def test_a_planted_file_is_skipped_by_resume_auto_and_refused_by_every_other_command(trained, in_tmp, capsys, caplog,
                                                                                      kind):
    """Each once crashed train --resume auto, generate, eval and export with a traceback (int('²'), a
    5000-digit int(), a checksum over a sparse tensor) or loaded silently (complex weights lost their
    imaginary part): --resume auto now skips it with a warning, everything else refuses it by name."""
    import shutil

    run = in_tmp / "ck"
    shutil.copytree(trained.parent, run)
    for p in run.glob(".*"):
        p.unlink()  # the lock file of the fixture's run
    bad = _planted(trained, run / "step_9.pt", kind)
    needle = "format" if kind.startswith("format") else kind.split()[0]
    for argv in (["generate", "--checkpoint", str(bad), "--prompt", "x"], ["eval", "--checkpoint", str(bad)],
                 ["export", "--checkpoint", str(bad), "-o", "m.safetensors"],
                 [*TRAIN, "--checkpoint_dir", "other", "--resume", str(bad)]):
        assert main(argv) == 2, (kind, argv)
        assert_one_error_line(capsys.readouterr().err, "step_9.pt", needle)
    assert not Path("m.safetensors").exists() and not Path("other").exists()
    with caplog.at_level("WARNING"):
        assert main([*TRAIN, "--checkpoint_dir", str(run), "--resume", "auto", "--max_steps", "3"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert any("step_9.pt" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(run / "step_3.pt")["global_step"] == 3 and bad.exists()


# ------------------------------------------------------------------ silent inconsistencies refused
def _with_optimizer_state(trained: Path, out: Path, change) -> Path:
    ck = load_checkpoint(trained)
    osd = ck["optimizer_state_dict"]
    ck["optimizer_state_dict"] = {**osd, "state": change(dict(osd["state"]))}
    save_checkpoint(ck, out)  # a valid checksum: the values are what is wrong
    return out


def _hf_folder(trained: Path, out: Path) -> Path:
    from sab_byon_omni.core.export import export_model

    return export_model(trained, out, fmt="hf")


def _sharded_hf(trained: Path, t: Path, weight_map, outside: bool = False) -> Path:
    """An HF folder whose weights are behind model.safetensors.index.json with ``weight_map``
    (called with the real shard's name); ``outside``: the shard lives in the parent folder."""
    d = _hf_folder(trained, t / "hf")
    shard = (t if outside else d) / "shard-00001.safetensors"
    (d / "model.safetensors").rename(shard)
    keys = list(torch.load(trained, weights_only=True)["model_state_dict"])  # any names: the map is what counts
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map(shard, keys)}))
    return d


def _complex_safetensors(trained: Path, out: Path) -> Path:
    from safetensors import safe_open

    from sab_byon_omni.core.export import export_safetensors

    export_safetensors(trained, out.with_suffix(".good.safetensors"))
    with safe_open(str(out.with_suffix(".good.safetensors")), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.mlp.up.weight"] = tensors["blocks.0.mlp.up.weight"].to(torch.complex64)
    save_file(tensors, str(out), metadata=meta)
    return out


def _complex_hf(trained: Path, t: Path) -> Path:
    from safetensors.torch import load_file

    d = _hf_folder(trained, t / "hf")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["embed_out.weight"] = tensors["embed_out.weight"].to(torch.complex64)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _complex_pretrained(trained: Path, t: Path) -> Path:
    from safetensors.torch import load_file

    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    SABTranscendentV2.load(trained).save_pretrained(t / "m")
    tensors = load_file(str(t / "m" / "model.safetensors"))
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.complex64)
    save_file(tensors, str(t / "m" / "model.safetensors"), metadata={"format": "pt"})
    return t / "m"


def _exported_meta(trained: Path, out: Path, **meta) -> Path:
    from safetensors import safe_open

    from sab_byon_omni.core.export import export_safetensors

    export_safetensors(trained, out.with_suffix(".good.safetensors"))
    with safe_open(str(out.with_suffix(".good.safetensors")), framework="pt") as f:
        old, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={**old, **meta})
    return out


MODEL_FILE_CASES = {  # like CASES: name -> (build(trained, tmp) -> argv, what the error line names)
    "superscript epoch in safetensors metadata": (
        lambda c, t: ["generate", "--checkpoint", str(_exported_meta(c, t / "e.safetensors", epoch="²")),
                      "--prompt", "x"], "epoch"),
    "weight_map a list in a transformers index": (
        lambda c, t: ["generate", "--checkpoint", str(_sharded_hf(c, t, lambda s, k: [])), "--prompt", "x"],
        "weight_map"),
    "transformers index naming a shard outside its folder": (
        lambda c, t: ["generate", "--checkpoint", str(_sharded_hf(c, t, lambda s, k: {n: f"../{s.name}" for n in k},
                                                                  outside=True)), "--prompt", "x"],
        "not a *.safetensors file of the folder"),
    "transformers index naming an absolute path": (
        lambda c, t: ["generate", "--checkpoint", str(_sharded_hf(c, t, lambda s, k: {n: str(s) for n in k},
                                                                  outside=True)), "--prompt", "x"],
        "not a *.safetensors file of the folder"),
    "complex weights in an exported safetensors file": (
        lambda c, t: ["generate", "--checkpoint", str(_complex_safetensors(c, t / "c.safetensors")), "--prompt", "x"],
        "complex"),
    "complex weights in a transformers folder": (
        lambda c, t: ["generate", "--checkpoint", str(_complex_hf(c, t)), "--prompt", "x"], "complex"),
    "complex weights in a saved model": (
        lambda c, t: ["generate", "--checkpoint", str(_complex_pretrained(c, t)), "--prompt", "x"], "complex"),
    "optimizer state under an index no group lists": (
        lambda c, t: [*TRAIN, "--resume", str(_with_optimizer_state(c, t / "o.pt", lambda s: {
            k + 1000: v for k, v in s.items()}))], "no parameter group lists"),
    "AdamW moment stored as bf16": (
        lambda c, t: [*TRAIN, "--resume", str(_with_optimizer_state(c, t / "o.pt", lambda s: {
            k: {**v, "exp_avg": v["exp_avg"].to(torch.bfloat16)} for k, v in s.items()}))], "bfloat16"),
}


@pytest.mark.parametrize("case", sorted(MODEL_FILE_CASES))
def test_inconsistent_model_files_are_one_error_line(trained, in_tmp, capsys, case):
    """Each of these once gave a traceback (int("²"), a list where a mapping belongs) or was accepted
    silently (a shard read from outside its folder, complex weights losing their imaginary part,
    AdamW's moments dropped or cast)."""
    _one_error_line_and_nothing_written(*MODEL_FILE_CASES[case], trained, in_tmp, capsys)


def test_a_transformers_index_naming_shards_in_its_folder_loads(trained, in_tmp):
    """Control for the two index cases above: the shard they point at is a good file with the very
    weights (so before the fix the folder loaded it from outside); named inside the folder, it loads."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    d = _sharded_hf(trained, in_tmp, lambda s, k: {n: s.name for n in k})
    assert SABTranscendentV2.load(d).model.embed.weight.shape[0] == 96


@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16])
def test_muon_momentum_of_another_dtype_is_refused(in_tmp, capsys, caplog, dtype):
    """load_state_dict casts a moment to its parameter's dtype, so an int32 or bf16 momentum used to
    resume silently (int32: rounded); the file's own dtypes are checked as it is read."""
    from tests.helpers import tiny_run

    args = ["train", *tiny_run(max_steps=2, save_every=2, optimizer="muon", precision="fp32")]
    assert main([*args, "--checkpoint_dir", "ck"]) == 0
    ck = load_checkpoint("ck/step_2.pt")
    ck["optimizer_state_dict"]["state"] = {
        k: {n: t.to(dtype) if n == "momentum_buffer" else t for n, t in v.items()}
        for k, v in ck["optimizer_state_dict"]["state"].items()}
    save_checkpoint(ck, "bad.pt")
    capsys.readouterr()
    assert main([*args, "--max_steps", "3", "--checkpoint_dir", "other", "--resume", "bad.pt"]) == 2
    assert_one_error_line(capsys.readouterr().err, "bad.pt", "momentum_buffer", str(dtype).removeprefix("torch."))
    save_checkpoint(ck, "ck/step_3.pt")  # planted as the newest: skipped, the run resumes from step_2
    with caplog.at_level("WARNING"):
        assert main([*args, "--max_steps", "4", "--checkpoint_dir", "ck", "--resume", "auto"]) == 0
    assert any("step_3.pt" in r.getMessage() for r in caplog.records)
    assert load_checkpoint("ck/step_4.pt")["global_step"] == 4


def test_the_optimizer_check_refuses_state_no_parameter_owns():
    """After load_state_dict, state kept under a key that is no parameter (torch keeps what it cannot
    place) is refused; a moment of another dtype too."""
    from sab_byon_omni.config import ModelConfig, TrainConfig
    from sab_byon_omni.model.transformer import CausalTransformer
    from sab_byon_omni.training.optim import check_loaded_state, make_optimizer

    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96))
    opt = make_optimizer(model, TrainConfig(), "cpu")
    model(torch.randint(0, 96, (1, 8))).float().mean().backward()
    opt.step()
    built = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    saved = opt.state_dict()
    shifted = {**saved, "state": {k + 1000: v for k, v in saved["state"].items()}}
    fresh = make_optimizer(model, TrainConfig(), "cpu")
    fresh.load_state_dict(shifted)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        check_loaded_state(fresh, built)
    fresh = make_optimizer(model, TrainConfig(), "cpu")
    fresh.load_state_dict(saved)
    first = next(iter(fresh.state.values()))
    first["exp_avg"] = first["exp_avg"].to(torch.float64)
    with pytest.raises(ValueError, match="float64"):
        check_loaded_state(fresh, built)


def test_a_dcp_whose_moments_are_stored_in_another_dtype_is_refused(in_tmp, capsys):
    write_dcp(in_tmp / "int.dcp", moment_dtype=torch.int32)
    assert main(["consolidate", "int.dcp", "-o", "out.pt"]) == 2
    assert_one_error_line(capsys.readouterr().err, "int.dcp", "exp_avg", "int32")
    assert not Path("out.pt").exists()
    write_dcp(in_tmp / "good.dcp")  # the control: the same folder with fp32 moments consolidates
    assert main(["consolidate", "good.dcp", "-o", "good.pt"]) == 0


# --------------------------------------------------------------------------- messages that fit
@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "symlink to a good shard"])
def test_a_dcp_shard_that_is_not_a_regular_file_is_refused_as_such(in_tmp, capsys, kind):
    import os
    import shutil

    d = write_dcp(in_tmp / "odd.dcp")
    shard = d / "__0_0.distcp"
    if kind == "fifo":
        shard.unlink()
        os.mkfifo(shard)
    else:
        target = "/dev/zero" if "zero" in kind else shutil.move(shard, in_tmp / "elsewhere.distcp")
        shard.unlink(missing_ok=True)
        shard.symlink_to(target)
    for argv in (["consolidate", "odd.dcp", "-o", "out.pt"], ["generate", "--checkpoint", "odd.dcp", "--prompt", "x"]):
        assert main(argv) == 2
        assert_one_error_line(capsys.readouterr().err, "odd.dcp", "__0_0.distcp", "not a regular file")
    assert not Path("out.pt").exists()


def test_a_failed_export_says_the_output_was_not_written(trained, in_tmp, monkeypatch, capsys):
    """An export or a consolidation that hits a full disk has no earlier checkpoints to speak of."""
    import errno
    import io
    import os

    from sab_byon_omni.files import checkpoint as ckpt_io

    real_save = torch.save

    def full(obj, f, *a, **k):  # a file on disk: the disk is full (DCP's reader saves to memory too)
        if isinstance(f, io.BytesIO):
            return real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write_dcp(in_tmp / "s.dcp")
    monkeypatch.setattr(ckpt_io.torch, "save", full)
    for argv, out in ((["export", "--checkpoint", str(trained), "-o", "m.pt"], "m.pt"),
                      (["export", "--from-safetensors", str(_exported_meta(trained, in_tmp / "e.safetensors")),
                        "-o", "i.pt"], "i.pt"),
                      (["consolidate", "s.dcp", "-o", "c.pt"], "c.pt")):
        assert main(argv) == 2, argv
        line = assert_one_error_line(capsys.readouterr().err, out, "disk full", "was not written")
        assert "earlier checkpoints" not in line
        assert not Path(out).exists()


# ------------------------------------------------------------- a diverged run (hostile review items 5, 6, 9, 10)
def test_a_loss_past_e709_has_perplexity_inf_in_every_summary():
    """Validation losses of 987 and 1537 ended the run in ``OverflowError: math range error`` (the
    end-of-run summary), and eval printed e^700 for a loss of 985.6."""
    from sab_byon_omni.commands.train import report
    from sab_byon_omni.estimate import perplexity
    from sab_byon_omni.evaluation import EvalResult
    from sab_byon_omni.training.console import summary
    from sab_byon_omni.training.trainer import TrainResult

    assert perplexity(985.6) == math.inf and perplexity(2.0) == math.exp(2.0) and math.isnan(perplexity(math.nan))
    assert EvalResult(loss_sum=9856.0, n_tokens=10, n_bytes=10).perplexity == math.inf
    result = TrainResult(val_losses=[987.5, 1537.2], global_step=3, best_val_loss=987.5, best_checkpoint="ck/b.pt")
    assert "best validation loss 987.5000 (perplexity inf)" in summary(result, "ck")
    assert "1537.2000 (perplexity inf)" in report(result, "ck")[2]


def test_a_run_whose_steps_were_skipped_says_so():
    """Every step non-finite (``--rope_base 1e-300`` before it was refused) ended "2 optimizer steps in
    this run" with nothing about the skips."""
    from sab_byon_omni.commands.train import report
    from sab_byon_omni.training.trainer import TrainResult

    lines = report(TrainResult(global_step=2, skipped_steps=2, val_losses=[math.nan]), "ck")
    assert "2 optimizer steps in this run, ended at step 2 (2 steps skipped for non-finite gradients" in lines[3]
    assert "skipped" not in report(TrainResult(global_step=2), "ck")[3]


def test_plot_of_a_run_whose_every_loss_is_non_finite_says_so(tmp_path):
    """It said "has no loss rows yet (the first is written after train.log_interval steps)"."""
    from sab_byon_omni.plotting import plot_metrics

    rows = [{"kind": "train", "step": s, "loss": None, "lr": 1e-3} for s in (1, 2)]  # the log writes NaN as null
    rows += [{"kind": "eval", "step": 2, "val_loss": float("nan")}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SabError, match=r"every loss in it is non-finite \(NaN or infinite, 3 values\)"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "lr": 1e-3}) + "\n")
    with pytest.raises(SabError, match="has no loss rows yet"):
        plot_metrics(tmp_path)
