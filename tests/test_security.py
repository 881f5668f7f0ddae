"""Security: a checkpoint carrying pickled code is refused and its payload never runs; every
torch.load is weights_only; weights round-trip through safetensors; nothing touches the network."""

from __future__ import annotations

import ast
import builtins
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sab_byon_omni
from sab_byon_omni.cli import main
from sab_byon_omni.core.export import export_safetensors, import_safetensors
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

TRAIN = ["-q", "train", "--preset", "tiny", "--epochs", "1", "--num_samples", "24", "--seq_len", "32",
         "--batch_size", "4", "--gradient_accumulation_steps", "1", "--precision", "fp32", "--device", "cpu",
         "--progress", "false", "--max_steps", "3"]


class Payload:
    """Unpickling this runs ``exec``: it writes a marker file. A stand-in for any attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _checkpoint_shaped(marker: Path) -> dict:
    return {"epoch": 0, "global_step": 0, "config": {}, "model_state_dict": {"embed.weight": torch.zeros(2, 2)},
            "optimizer_state_dict": Payload(marker)}


def _write_malicious(kind: str, path: Path, marker: Path) -> None:
    obj = _checkpoint_shaped(marker)
    if kind == "torch_zip":
        torch.save(obj, path)
    elif kind == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        raise AssertionError(kind)


KINDS = ("torch_zip", "torch_legacy", "raw_pickle")


@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_is_real(in_tmp, kind):
    """Guard against a test that passes because its 'malicious' file is harmless: an unsafe load
    of the same file does run the code."""
    marker = in_tmp / "proof.txt"
    path = in_tmp / "evil.pt"
    _write_malicious(kind, path, marker)
    if kind == "raw_pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main([*TRAIN, "--checkpoint_dir", "ck"]) == 0
    finally:
        os.chdir(cwd)
    return d / "ck"


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_checkpoint_is_refused_and_never_runs(in_tmp, kind, capsys, trained, caplog):
    marker = in_tmp / "pwned.txt"
    evil = in_tmp / "evil.pt"
    _write_malicious(kind, evil, marker)
    with pytest.raises(SabError, match="evil.pt"):
        load_checkpoint(evil)
    with pytest.raises(SabError, match="evil.pt"):
        SABTranscendentV2.from_checkpoint(evil)
    for argv in ([*TRAIN, "--checkpoint_dir", "ck", "--resume", str(evil)],
                 ["generate", "--checkpoint", str(evil), "--prompt", "x"],
                 ["eval", "--checkpoint", str(evil)],
                 ["export", "--checkpoint", str(evil), "--out", "m.safetensors"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "evil.pt" in err and "Traceback" not in err, err
    # planted as the newest checkpoint of a run: --resume auto skips it (with a warning) and
    # resumes from the newest safe one
    run = in_tmp / "ck"
    shutil.copytree(trained, run)
    shutil.copy(evil, run / "step_99.pt")
    with caplog.at_level("WARNING"):
        assert main([*TRAIN, "--checkpoint_dir", "ck", "--resume", "auto", "--max_steps", "4"]) == 0
    assert any("step_99.pt" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(run / "step_4.pt")["global_step"] == 4
    assert not marker.exists(), "the payload ran"
    assert not Path("m.safetensors").exists()


def _allow_listed_unpicklers(tree: ast.AST) -> set[int]:
    """Lines of ``pickle.Unpickler`` used as the base of a class that overrides ``find_class``
    (an allow-list of the globals it may load): the one safe way to read a pickle."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name == "find_class"
                                                  for f in node.body):
            lines |= {b.lineno for b in node.bases}
    return lines


def test_every_torch_load_in_the_package_is_weights_only():
    root = Path(sab_byon_omni.__file__).parent
    calls = 0
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        allowed = _allow_listed_unpicklers(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) \
                    and kw["weights_only"].value is True, f"{path}:{node.lineno} torch.load without weights_only=True"
            if isinstance(node, ast.Attribute) and node.attr in ("loads", "load", "Unpickler") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("pickle", "dill", "cloudpickle") \
                    and not (node.attr == "Unpickler" and node.lineno in allowed):
                pytest.fail(f"{path}:{node.lineno} uses pickle.{node.attr}")
    assert calls >= 1


# ------------------------------------------------------------------------------ safetensors
def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_round_trip_is_bitwise(in_tmp, capsys, tie):
    assert main([*TRAIN, "--checkpoint_dir", "ck", "--tie_embeddings", str(tie).lower()]) == 0
    ck = in_tmp / "ck" / "step_3.pt"
    assert main(["export", "--checkpoint", str(ck), "--out", "model.safetensors"]) == 0
    assert "wrote model.safetensors" in capsys.readouterr().out
    assert main(["export", "--from-safetensors", "model.safetensors", "--out", "back.pt"]) == 0
    original, back = load_checkpoint(ck), load_checkpoint("back.pt")
    _same(original["model_state_dict"], back["model_state_dict"])
    assert back["config"] == original["config"] and back["tokenizer"] == original["tokenizer"]
    assert back["global_step"] == 3 and "optimizer_state_dict" not in back
    with safe_open("model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    # a tied head is stored once (safetensors refuses shared tensors) and re-tied on import
    assert ("head.weight" in stored) + ("embed.weight" in stored) == (1 if tie else 2)
    sab = SABTranscendentV2.from_checkpoint("back.pt")
    assert (sab.model.head.weight is sab.model.embed.weight) == tie
    # the imported checkpoint samples exactly like the original
    a = SABTranscendentV2.from_checkpoint(ck).generate("Con", max_new_tokens=8, temperature=0.0, stream=False)
    b = sab.generate("Con", max_new_tokens=8, temperature=0.0, stream=False)
    assert a == b
    # and fine-tunes: train --resume PATH starts from its weights with a fresh optimizer
    assert main([*TRAIN, "--checkpoint_dir", "ft", "--resume", "back.pt", "--max_steps", "5",
                 "--tie_embeddings", str(tie).lower()]) == 0
    assert load_checkpoint("ft/step_5.pt")["global_step"] == 5


def test_export_never_overwrites_and_converts_dtype(in_tmp, trained, capsys):
    ck = trained / "step_3.pt"
    Path("model.safetensors").write_bytes(b"precious")
    for force in ([], ["--force"]):  # a file export did not write: refused, --force not suggested
        assert main(["export", "--checkpoint", str(ck), "--out", "model.safetensors", *force]) == 2
        err = capsys.readouterr().err
        assert "sab-omni export did not write" in err and "pass --force" not in err, err
    assert Path("model.safetensors").read_bytes() == b"precious"
    os.remove("model.safetensors")
    assert main(["export", "--checkpoint", str(ck), "--out", "model.safetensors"]) == 0
    assert main(["export", "--checkpoint", str(ck), "--out", "model.safetensors"]) == 2  # an earlier export
    assert "already exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ck), "--out", str(ck)]) == 2  # --out is the input
    assert main(["export", "--checkpoint", str(ck), "--out", "model.safetensors", "--force", "--dtype", "bf16"]) == 0
    with safe_open("model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back = import_safetensors("model.safetensors")
    w = load_checkpoint(ck)["model_state_dict"]["blocks.0.attn.qkv.weight"]
    assert torch.equal(back["model_state_dict"]["blocks.0.attn.qkv.weight"], w.to(torch.bfloat16).float())
    assert sorted(os.listdir(in_tmp)) == ["model.safetensors"]  # no temporary files


def test_export_force_replaces_only_an_earlier_export(in_tmp, trained, capsys):
    ck = trained / "step_3.pt"
    Path("notes").mkdir()
    Path("notes/garden.md").write_text("my garden")
    Path("mine").mkdir()
    Path("mine/a.txt").write_text("mine")
    Path("run.pt").write_bytes(ck.read_bytes())  # a training checkpoint is no export either
    for out in ("notes/garden.md", "mine", "run.pt"):
        for force in ([], ["--force"]):
            assert main(["export", "--checkpoint", str(ck), "-o", out, *force]) == 2, out
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "pass --force" not in err and "choose another" in err, err
    assert Path("notes/garden.md").read_text() == "my garden" and Path("mine/a.txt").read_text() == "mine"
    assert Path("run.pt").read_bytes() == ck.read_bytes()
    for out in ("m.pt", "m.safetensors", "hf_folder"):  # what export wrote, it may replace
        assert main(["export", "--checkpoint", str(ck), "-o", out]) == 0
        assert main(["export", "--checkpoint", str(ck), "-o", out]) == 2
        assert "pass --force" in capsys.readouterr().err
        assert main(["export", "--checkpoint", str(ck), "-o", out, "--force"]) == 0


def test_bad_safetensors_inputs_are_one_error_line(in_tmp, trained, capsys):
    save_file({"w": torch.zeros(2)}, "foreign.safetensors")  # no sab-byon-omni metadata
    Path("garbage.safetensors").write_bytes(os.urandom(300))
    export_safetensors(trained / "step_3.pt", "good.safetensors")
    data = Path("good.safetensors").read_bytes()
    Path("truncated.safetensors").write_bytes(data[:len(data) // 2])
    save_file({"w": torch.zeros(2)}, "wrong_tensors.safetensors",
              metadata=dict(safe_open("good.safetensors", framework="pt").metadata()))
    meta = dict(safe_open("good.safetensors", framework="pt").metadata())
    meta["config"] = "{not json"
    save_file({"w": torch.zeros(2)}, "bad_meta.safetensors", metadata=meta)
    for name in ("foreign", "garbage", "truncated", "wrong_tensors", "bad_meta", "missing"):
        assert main(["export", "--from-safetensors", f"{name}.safetensors", "--out", f"{name}.pt"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and f"{name}.safetensors" in err, err
        assert not Path(f"{name}.pt").exists()


def test_nothing_is_fetched_from_the_network(in_tmp, monkeypatch, capsys):
    """Train, sample and export with every socket connection failing."""
    def no_network(*a, **k):
        raise AssertionError(f"network access attempted: {a!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert main([*TRAIN, "--checkpoint_dir", "ck"]) == 0
    assert main(["generate", "--checkpoint", "ck/step_3.pt", "--prompt", "Con", "--max-new-tokens", "4"]) == 0
    assert main(["export", "--checkpoint", "ck/step_3.pt", "--out", "m.safetensors"]) == 0
    sab = SABTranscendentV2.from_checkpoint("ck/step_3.pt")
    if hasattr(sab, "save_pretrained"):  # the Hub-style folder: a local path never goes online
        sab.save_pretrained(in_tmp / "shared")
        again = SABTranscendentV2.from_pretrained(in_tmp / "shared")
        assert torch.equal(again.model.embed.weight, sab.model.embed.weight)
