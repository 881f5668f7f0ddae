"""Property-based fuzzing (hypothesis) of the files someone can hand to the package: checkpoints
(random structures, wrong types, huge or negative numbers, missing keys, pickled code, shared-
reference bombs and cycles, flipped bytes of real files), safetensors files (random header JSON,
truncation), sharded DCP folders (random ``.metadata`` pickles including reduce payloads, damaged
or missing shards) and YAML configs (aliases, tags, nesting).

Each input must end in success or one SabError line: never another exception (a traceback),
never a payload run (a marker file never appears), never a file lost (the precious files around
it are unchanged). The default suite runs a small budget; ``pytest -m slow tests/test_fuzz_files.py``
runs the deep one (``SAB_FUZZ_DEEP`` examples per property, 300 by default). The counts are
printed by the last test (``-s`` shows them)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import shutil
import tempfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sab_byon_omni.cli import main
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint
from tests.hostile import (
    Payload,
    claim_size,
    deferred_bomb,
    opcode_run,
    snapshot,
    torch_bytes,
    tuple_key_bomb,
    with_pickle,
    with_record,
    write_dcp,
)

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

FAST_N = int(os.environ.get("SAB_FUZZ_FILES", "12"))
DEEP_N = int(os.environ.get("SAB_FUZZ_DEEP", "300"))
_common = dict(deadline=None, database=None, derandomize=False,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large])
FAST, DEEP = settings(max_examples=FAST_N, **_common), settings(max_examples=DEEP_N, **_common)
COUNTS = {"inputs": 0, "tracebacks": 0, "payloads_run": 0, "files_lost": 0, "accepted": 0, "refused": 0}
TRAIN = ["-q", "train", "--preset", "tiny", "--epochs", "1", "--num_samples", "24", "--seq_len", "32",
         "--batch_size", "4", "--gradient_accumulation_steps", "1", "--precision", "fp32", "--device", "cpu",
         "--progress", "false", "--max_steps", "3", "--save_every", "1", "--keep_last", "1"]


@contextlib.contextmanager
def scratch(world: dict) -> Iterator[Path]:
    """A fresh folder inside the test's world for one example, removed afterwards."""
    d = Path(tempfile.mkdtemp(dir=world["dir"]))
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """A finished tiny run (ck: step_2.pt, metrics), its export, a sharded checkpoint, a marker path."""
    d = tmp_path_factory.mktemp("fuzz")
    assert main([*TRAIN, "--checkpoint_dir", str(d / "ck"), "--max_steps", "2"]) == 0
    from sab_byon_omni.core.export import export_safetensors

    export_safetensors(d / "ck" / "step_2.pt", d / "good.safetensors")
    write_dcp(d / "good.dcp")
    return {"dir": d, "ck": load_checkpoint(d / "ck" / "step_2.pt"), "run": d / "ck", "marker": d / "pwned.txt",
            "safetensors": (d / "good.safetensors").read_bytes(), "dcp": d / "good.dcp",
            "bytes": (d / "ck" / "step_2.pt").read_bytes()}


class _Tracebacks(logging.Handler):
    """Log records that carry a traceback (a library logging its own failure counts as one)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(record.getMessage())


def _outcome(fn, *args) -> Any:
    """Run one input: success or SabError (one line); anything else is counted and fails the test."""
    COUNTS["inputs"] += 1
    logged = _Tracebacks()
    logging.getLogger().addHandler(logged)
    try:
        result = fn(*args)
    except SabError as e:
        assert "\n" not in str(e) and len(str(e)) < 600, str(e)[:2000]
        COUNTS["refused"] += 1
        return e
    except BaseException:
        COUNTS["tracebacks"] += 1
        raise
    finally:
        logging.getLogger().removeHandler(logged)
        if logged.seen:
            COUNTS["tracebacks"] += 1
            raise AssertionError(f"a traceback was logged: {logged.seen[:2]}")
    COUNTS["accepted"] += 1
    return result


def _guard(world: dict, precious: Path, before: dict) -> None:
    if world["marker"].exists():
        COUNTS["payloads_run"] += 1
        world["marker"].unlink()
        raise AssertionError("a payload ran")
    if snapshot(precious) != before:
        COUNTS["files_lost"] += 1
        raise AssertionError("a precious file changed or vanished")


# ------------------------------------------------------------------------------- checkpoints
def _bomb() -> list:
    a: list = [0.5] * 9
    for _ in range(7):
        a = [a] * 9
    return a


def _cycle() -> list:
    c: list = [1]
    c.append(c)
    return c


SPECIAL = {"payload": lambda w: Payload(w["marker"]), "bomb": lambda w: _bomb(), "cycle": lambda w: _cycle()}
DELETE = object()
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 3000),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20),
                 st.sampled_from(["char96", "byte", "bpe", "tiny", "sab-byon-omni/1", "sab-byon-omni/9", "crc32"]),
                 st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 5),
                           st.sampled_from([torch.float32, torch.int64, torch.bool, torch.bfloat16])))
value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
PATHS = [(), ("config",), ("config", "model"), ("config", "data"), ("config", "train"), ("data_state",),
         ("history",), ("tokenizer",), ("rng_state",), ("optimizer_state_dict",), ("model_state_dict",),
         ("checksum",), ("scaler_state_dict",)]
KEYS = ["epoch", "global_step", "config", "model_state_dict", "optimizer_state_dict", "tokenizer", "data_state",
        "history", "best_val_loss", "checksum", "format", "rng_state", "scaler_state_dict", "cursor", "epoch_tokens",
        "seq_len", "hidden", "vocab_size", "n_heads", "max_seq_len", "dataset", "name", "json", "train_loss",
        "state", "param_groups", "value", "algo", "torch", "python", "embed.weight", "x"]
mutations = st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(KEYS),
                               st.one_of(st.just(DELETE), value, st.sampled_from(sorted(SPECIAL)))),
                     min_size=1, max_size=4)


def _mutate(ck: dict, changes: list, world: dict) -> tuple[dict, bool]:
    """A copy of ``ck`` with the changes applied; True if it holds something our own writer cannot
    checksum (a bomb, a cycle, a payload)."""
    ck, special = dict(ck), False
    for path, key, new in changes:
        node = ck
        for part in path:  # copy the dicts along the path; a non-dict on the way: set it there instead
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                break
            node[part] = dict(child)
            node = node[part]
        if new is DELETE:
            node.pop(key, None)
        elif isinstance(new, str) and new in SPECIAL:
            node[key], special = SPECIAL[new](world), True
        else:
            node[key] = new
    return ck, special


def _write(ck: dict, path: Path, special: bool, checksummed: bool) -> None:
    if checksummed and not special:
        try:
            save_checkpoint(ck, path)  # a valid checksum: the values are what is wrong
            return
        except SabError:
            pass
    torch.save(ck, path)


def _load_everywhere(path: Path) -> None:
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    _outcome(load_checkpoint, path)
    _outcome(SABTranscendentV2.load, path)


def _check_checkpoint(world, changes, checksummed):
    with scratch(world) as d:
        ck, special = _mutate(world["ck"], changes, world)
        _write(ck, d / "step_7.pt", special, checksummed)
        before = snapshot(d)
        _load_everywhere(d / "step_7.pt")
        from sab_byon_omni.training.checkpointer import Checkpointer

        _outcome(Checkpointer(d).entries)  # the --resume auto scan
        _guard(world, d, before)


test_hostile_checkpoint_structures = FAST(given(changes=mutations, checksummed=st.booleans())(_check_checkpoint))
test_hostile_checkpoint_structures_deep = pytest.mark.slow(
    DEEP(given(changes=mutations, checksummed=st.booleans())(_check_checkpoint)))


def _loads(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except SabError:
        return False


def _check_resume(world, changes, checksummed, in_tmp, capsys):
    """A hostile file planted as the newest checkpoint of a run, then --resume auto and --resume it:
    the run goes on or stops with one line; a loadable checkpoint always remains, and the planted
    file, if it does not load, is never deleted (at most moved aside by a rewind)."""
    run = in_tmp / f"ck{COUNTS['inputs']}"
    shutil.copytree(world["run"], run)
    ck, special = _mutate(world["ck"], changes, world)
    _write(ck, run / "step_9.pt", special, checksummed)
    planted = (run / "step_9.pt").read_bytes()
    refused = not _loads(run / "step_9.pt")
    before = snapshot(world["run"])
    for resume in ("auto", str(run / "step_9.pt")):
        rc = _outcome(main, [*TRAIN, "--checkpoint_dir", str(run), "--resume", resume])
        err = capsys.readouterr().err
        assert rc in (0, 2) and "Traceback" not in err, err[-3000:]
        kept = [p for p in run.rglob("*.pt") if _loads(p)]
        if not kept or (refused and planted not in [p.read_bytes() for p in run.rglob("step_9.pt")]):
            COUNTS["files_lost"] += 1
            raise AssertionError(f"a checkpoint was lost: {sorted(str(p.relative_to(run)) for p in run.rglob('*'))}")
    _guard(world, world["run"], before)


test_hostile_checkpoint_planted_in_a_run = settings(max_examples=max(FAST_N // 3, 3), **_common)(
    given(changes=mutations, checksummed=st.booleans())(_check_resume))
test_hostile_checkpoint_planted_in_a_run_deep = pytest.mark.slow(settings(max_examples=DEEP_N // 5, **_common)(
    given(changes=mutations, checksummed=st.booleans())(_check_resume)))


byte_damage = st.one_of(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6).map(
        lambda flips: ("flip", flips)),
    st.floats(0, 1, exclude_max=True).map(lambda at: ("truncate", at)),
    st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64)).map(lambda x: ("insert", x)))


def _damage(data: bytes, how: tuple) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[:int(len(data) * arg)]
    if kind == "insert":
        at = int(len(data) * arg[0])
        return data[:at] + arg[1] + data[at:]
    out = bytearray(data)
    for where, xor in arg:
        out[int(len(out) * where)] ^= xor
    return bytes(out)


def _check_damaged_bytes(world, how):
    with scratch(world) as d:
        (d / "step_7.pt").write_bytes(_damage(world["bytes"], how))
        before = snapshot(d)
        _load_everywhere(d / "step_7.pt")
        _guard(world, d, before)


test_damaged_checkpoint_bytes = FAST(given(how=byte_damage)(_check_damaged_bytes))
test_damaged_checkpoint_bytes_deep = pytest.mark.slow(DEEP(given(how=byte_damage)(_check_damaged_bytes)))


# ------------------------------------------------------------------------------- safetensors
json_text = st.one_of(
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                           st.text(max_size=10)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3)),
                 max_leaves=10).map(lambda v: __import__("json").dumps(v)),
    st.text(max_size=50), st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(['{"model": {"preset": "tiny"}, "data": {"seq_len": 1000000000}}', '{"model": {"hidden": -1}}',
                     '{"data": {"tokenizer": "bpe"}}', "null", "[]", '{"model": {"preset": "3b"}}']))


def _check_safetensors(world, field, text, cut):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    with scratch(world) as d:
        good = world["dir"] / "good.safetensors"
        with safe_open(str(good), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        path = d / "m.safetensors"
        save_file(tensors, str(path), metadata={**meta, field: text})
        if cut is not None:
            data = path.read_bytes()
            path.write_bytes(data[:int(len(data) * cut)])
        before = snapshot(d)
        _outcome(SABTranscendentV2.load, path)
        _guard(world, d, before)


safetensors_args = dict(field=st.sampled_from(["config", "tokenizer", "format", "global_step", "epoch"]),
                        text=json_text, cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
test_hostile_safetensors = FAST(given(**safetensors_args)(_check_safetensors))
test_hostile_safetensors_deep = pytest.mark.slow(DEEP(given(**safetensors_args)(_check_safetensors)))


# ---------------------------------------------------------------------------------------- DCP
class _System:
    """A reduce to os.system: what a real attacker would write."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _metadata_pickle(world: dict, kind: str, seed: Any, protocol: int) -> bytes:
    real = (world["dcp"] / ".metadata").read_bytes()
    if kind == "random_object":
        return pickle.dumps(seed, protocol=protocol)
    if kind == "payload_exec":
        return pickle.dumps(Payload(world["marker"]), protocol=protocol)
    if kind == "payload_system":
        return pickle.dumps({"storage_data": _System(world["marker"])}, protocol=protocol)
    metadata = pickle.loads(real)  # our own file
    if kind == "field_payload":
        metadata.planner_data = _System(world["marker"])
    elif kind == "field_random":
        setattr(metadata, ["state_dict_metadata", "storage_data", "planner_data", "storage_meta"][
            abs(hash(str(seed))) % 4], seed)
    return pickle.dumps(metadata, protocol=protocol)


dcp_damage = st.one_of(
    st.tuples(st.just("metadata"), st.sampled_from(["random_object", "payload_exec", "payload_system",
                                                    "field_payload", "field_random"]),
              value, st.integers(0, pickle.HIGHEST_PROTOCOL)),
    st.tuples(st.just("bytes"), st.sampled_from([".metadata", "__0_0.distcp", "meta.pt"]), byte_damage, st.none()),
    st.tuples(st.just("missing"), st.sampled_from([".metadata", "__0_0.distcp", "meta.pt"]), st.none(), st.none()))


def _check_dcp(world, damage):
    from sab_byon_omni.training.consolidate import consolidate

    with scratch(world) as d:
        src = d / "x.dcp"
        shutil.copytree(world["dcp"], src)
        what, name, arg, protocol = damage
        if what == "metadata":
            (src / ".metadata").write_bytes(_metadata_pickle(world, name, arg, protocol))
        elif what == "bytes":
            (src / name).write_bytes(_damage((src / name).read_bytes(), arg))
        else:
            (src / name).unlink()
        before = snapshot(src)
        result = _outcome(consolidate, src, d / "out.pt")
        assert isinstance(result, SabError) or load_checkpoint(d / "out.pt")["global_step"] == 5
        assert isinstance(result, Path) or not (d / "out.pt").exists()
        _guard(world, src, before)


test_hostile_dcp_folders = FAST(given(damage=dcp_damage)(_check_dcp))
test_hostile_dcp_folders_deep = pytest.mark.slow(DEEP(given(damage=dcp_damage)(_check_dcp)))


# --------------------------------------------------------------------------------------- YAML
yaml_piece = st.one_of(
    st.sampled_from(["&a [x, x, x]", "*a", "!!python/object/apply:os.system ['touch {marker}']",
                     "!!python/name:os.system", "!!binary aGVsbG8=", "{", "[", "&b {k: *a}", "1e400", "-1",
                     "1000000000", ".nan", "~", "'x'", "!!set {a, b}", "? [a]\n: b", "%TAG ! x", "\t"]),
    st.text(max_size=8), st.integers(1, 3000).map(lambda n: "[" * n + "]" * n))
yaml_doc = st.lists(st.tuples(st.sampled_from(["epochs", "seq_len", "dataset", "model", "data", "train", "x", "hidden",
                                               "resume", "tokenizer", "  nested"]), yaml_piece), max_size=6).map(
    lambda pairs: "\n".join(f"{k}: {v}" for k, v in pairs))


def _check_yaml(world, text, big):
    from sab_byon_omni.config import load_config

    with scratch(world) as d:
        path = d / "config.yaml"
        body = text.replace("{marker}", str(world["marker"]))
        path.write_bytes(body.encode("utf-8", "surrogatepass") + (b"#" * (1 << 20) if big else b""))
        before = snapshot(d)
        _outcome(load_config, path)
        _guard(world, d, before)


test_hostile_yaml = FAST(given(text=yaml_doc, big=st.booleans())(_check_yaml))
test_hostile_yaml_deep = pytest.mark.slow(DEEP(given(text=yaml_doc, big=st.booleans())(_check_yaml)))


# ------------------------------------------------------------------------- bombs
# A bomb must be refused (never accepted, never a traceback) with bounded memory; a generous
# hypothesis deadline stands for "quickly" (no timing assertion). The default budget scans with
# limits 100x smaller than the real ones (the same code, cheaper examples); the deep run uses the real ones.
BOMB_FAST = settings(max_examples=FAST_N, **{**_common, "deadline": datetime.timedelta(seconds=60)})
BOMB_DEEP = settings(max_examples=DEEP_N // 5, **{**_common, "deadline": datetime.timedelta(seconds=120)})
COMPRESSIONS = {zipfile.ZIP_DEFLATED: 64, zipfile.ZIP_LZMA: 8, zipfile.ZIP_BZIP2: 1}  # MiB each can make quickly

decompression_bombs = st.one_of(
    st.tuples(st.just("compressed"), st.sampled_from(["data.pkl", "data/0", "version", "byteorder"]),
              st.sampled_from(sorted(COMPRESSIONS)), st.integers(1, 64),
              st.sampled_from([b"\0", b"N0", b"(e", b"\x80\x02N0"])),
    st.tuples(st.just("claimed"), st.sampled_from(["data.pkl", "data/0", "version"]), st.just(0),
              st.integers(2**20, 2**32 - 2), st.just(b"")))
cheap = st.sampled_from([(b"N0", b"", b"N."), (b"(1", b"", b"N."), (b"N2", b"N", b"."), (b"(e", b"]", b"."),
                         (b"Na", b"]", b"."), (b"h\0a", b"Nq\0]", b"."), (b"r\0\0\0\0", b"N", b"."),
                         (b"K\x01", b"(", b"l."), (b"\x8c\x01x\x94", b"(", b"t.")])
opcode_bombs = st.one_of(
    st.tuples(st.just("run"), cheap, st.floats(1.01, 3.0)),  # a multiple of the limit it must hit
    st.tuples(st.just("deferred"), st.integers(7, 12), st.integers(8, 12)),  # levels, fan: shared lists
    st.tuples(st.just("tuple_key"), st.integers(21, 64), st.just(0)),  # a key whose hash is 2**levels steps
    st.tuples(st.just("deep"), st.integers(65, 3000), st.just(0)),  # lists inside lists
    st.tuples(st.just("memo_refs"), st.floats(1.01, 3.0), st.sampled_from([b"h\0", b"j\0\0\0\0"])))


def _decompression_bomb(base: bytes, bomb: tuple) -> bytes:
    kind, record, method, mib, unit = bomb
    if kind == "claimed":
        return claim_size(base, record, mib)
    mib = min(mib, COMPRESSIONS[method])
    chunk = unit * ((1 << 20) // len(unit))
    return with_record(base, record, [chunk] * mib, method)


def _opcode_bomb(bomb: tuple) -> bytes:
    from sab_byon_omni.files import untrusted

    kind, a, b = bomb
    if kind == "run":
        (unit, head, tail), times = a, b
        return opcode_run(unit, int(untrusted.MAX_OPS * times), head, tail)
    if kind == "deferred":
        return deferred_bomb(a, b)
    if kind == "tuple_key":
        return tuple_key_bomb(a)
    if kind == "deep":
        return b"\x80\x02" + b"](" * a + b"N" + b"e" * a + b"."
    return b"\x80\x02Nq\0(" + b * int(untrusted.MAX_NODES * a) + b"l."


@contextlib.contextmanager
def _limits(scale: int) -> Iterator[None]:
    """The scan's object and opcode limits divided by ``scale`` for the block."""
    from sab_byon_omni.files import untrusted

    saved = untrusted.MAX_NODES, untrusted.MAX_OPS
    untrusted.MAX_NODES, untrusted.MAX_OPS = saved[0] // scale, saved[1] // scale
    try:
        yield
    finally:
        untrusted.MAX_NODES, untrusted.MAX_OPS = saved


def _refused_within(limit_mb: int, fn, *args) -> None:
    """``fn(*args)`` raises a one-line SabError, and Python allocates at most ``limit_mb`` meanwhile."""
    COUNTS["inputs"] += 1
    tracemalloc.start()
    try:
        with pytest.raises(SabError) as e:
            fn(*args)
        peak = tracemalloc.get_traced_memory()[1]
    except BaseException:
        COUNTS["tracebacks"] += 1
        raise
    finally:
        tracemalloc.stop()
    COUNTS["refused"] += 1
    assert "\n" not in str(e.value) and len(str(e.value)) < 600, str(e.value)[:2000]
    assert peak < limit_mb << 20, f"{peak / 2**20:.0f} MiB to refuse it"


def _check_decompression_bomb(world, bomb):
    with scratch(world) as d:
        (d / "step_7.pt").write_bytes(_decompression_bomb(torch_bytes({"a": torch.zeros(3)}), bomb))
        _refused_within(8, load_checkpoint, d / "step_7.pt")  # refused from the zip's directory: no inflating


def _check_opcode_bomb(world, bomb, where, scale):
    from sab_byon_omni.files.dcp import read_metadata

    with _limits(scale), scratch(world) as d:
        data = _opcode_bomb(bomb)
        if where == "checkpoint":
            (d / "step_7.pt").write_bytes(with_pickle(torch_bytes({"a": 1}), data))
            _refused_within(16 + 200 // scale, load_checkpoint, d / "step_7.pt")
        else:
            shutil.copytree(world["dcp"], d / "x.dcp")
            (d / "x.dcp" / ".metadata").write_bytes(data)
            _refused_within(16 + 200 // scale, read_metadata, d / "x.dcp")


test_decompression_bombs = BOMB_FAST(given(bomb=decompression_bombs)(_check_decompression_bomb))
test_decompression_bombs_deep = pytest.mark.slow(BOMB_DEEP(given(bomb=decompression_bombs)(_check_decompression_bomb)))
_opcode_args = dict(bomb=opcode_bombs, where=st.sampled_from(["checkpoint", "dcp_metadata"]))
test_opcode_bombs = BOMB_FAST(given(**_opcode_args, scale=st.just(100))(_check_opcode_bomb))
test_opcode_bombs_deep = pytest.mark.slow(BOMB_DEEP(given(**_opcode_args, scale=st.just(1))(_check_opcode_bomb)))


def test_every_pickle_in_a_real_checkpoint_is_found_by_the_scan(world):
    """The scan reads the records torch reads (a guard against a zip layout it would miss)."""
    names = zipfile.ZipFile(world["run"] / "step_2.pt").namelist()
    assert [n for n in names if n.endswith("data.pkl")] and torch_bytes({"a": 1})


def test_report_counts():
    """Runs last in this file: what the properties tried (pytest -s shows it)."""
    print(f"\nfile fuzzing: {COUNTS}")
    assert COUNTS["tracebacks"] == COUNTS["payloads_run"] == COUNTS["files_lost"] == 0
