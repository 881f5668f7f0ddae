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
from sab_byon_omni.io.checkpoint import load_checkpoint, save_checkpoint
from sab_byon_omni.io.untrusted import MAX_NODES, check_pickle, check_torch_file
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
    for argv in ([*TRAIN, "--checkpoint_dir", "ck", "--resume", str(bad)],
                 ["generate", "--checkpoint", str(bad), "--prompt", "x"],
                 ["export", "--checkpoint", str(bad), "-o", "m.safetensors"]):
        assert main(argv) == 2, argv
        assert_one_error_line(capsys.readouterr().err, "flipped.pt", "checksum")
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
}


def _legacy(trained: Path, out: Path) -> Path:
    torch.save(load_checkpoint(trained), out, _use_new_zipfile_serialization=False)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(trained, in_tmp, capsys, case):
    build, needle = CASES[case]
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
    from sab_byon_omni.training.state import TrainState

    ck = load_checkpoint(trained)
    for bad in (-1, 2.5, True, 10**13, "3"):
        with pytest.raises(SabError, match="global_step"):
            load_checkpoint(_variant(trained, tmp_path / "x.pt", global_step=bad))
    for cursor in (-1, 10**12, 1.5):
        with pytest.raises(SabError, match="cursor"):
            TrainState.from_checkpoint({**ck, "data_state": {**ck["data_state"], "cursor": cursor}}, "x.pt", 100)


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
    from sab_byon_omni.io import untrusted

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

    from sab_byon_omni.io.dcp import _MetadataUnpickler

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
    from sab_byon_omni.io.dcp import read_metadata

    metadata = read_metadata(write_dcp(in_tmp / "good.dcp"))
    assert "model.embed.weight" in metadata.state_dict_metadata
