"""A GGUF file as a SOURCE and as an export format on the command line: ``export --format gguf``
re-writes a GGUF (F16, Q8_0) without building a model, refuses what it cannot write in one line,
and every command that takes a model reaches the GGUF reader."""

from __future__ import annotations

import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sab_byon_omni.cli import main  # noqa: E402
from sab_byon_omni.core.export import checkpoint_dict  # noqa: E402
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2  # noqa: E402
from sab_byon_omni.files.checkpoint import save_checkpoint  # noqa: E402
from sab_byon_omni.interop.gguf import read_gguf  # noqa: E402
from sab_byon_omni.model.generate import generate_tokens  # noqa: E402
from tests.gguf_files import logits, model_from_parts, random_model, transformers_load, write_gguf_file  # noqa: E402
from tests.helpers import tiny_run  # noqa: E402
from tests.hostile import assert_one_error_line  # noqa: E402

IDS = torch.tensor([[1, 40, 60, 260, 261, 3, 70, 80, 100, 200, 262, 263, 264, 265, 90, 33, 2]])


@pytest.fixture
def tiny(in_tmp):
    model = random_model()
    return model, write_gguf_file(in_tmp / "tiny.gguf", model, "F16")


@pytest.mark.parametrize("gguf_type, matrices", [(None, "F16"), ("q8_0", "Q8_0")])
def test_export_rewrites_a_gguf_in_the_asked_type(tiny, capsys, gguf_type, matrices):
    model, path = tiny
    flags = ["--gguf-type", gguf_type] if gguf_type else []
    assert main(["export", "--checkpoint", str(path), "-o", "out.gguf", *flags]) == 0  # the name picks the format
    assert "wrote out.gguf" in capsys.readouterr().out
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader("out.gguf").tensors}
    assert kinds["blk.0.ffn_up.weight"] == matrices and kinds["output_norm.weight"] == "F32"
    back = logits(transformers_load(path.parent / "out.gguf"), IDS)
    assert (back - logits(model, IDS)).abs().max() <= 0.04 * logits(model, IDS).abs().max()
    assert main(["export", "--checkpoint", str(path), "-o", "out.gguf"]) == 2  # never replaced without --force
    assert main(["export", "--checkpoint", str(path), "-o", "out.gguf", "--force"]) == 0


def test_a_folder_holding_one_gguf_is_that_gguf(tiny, capsys):
    _, path = tiny
    (path.parent / "repo").mkdir()
    path.rename(path.parent / "repo" / "model.gguf")
    assert main(["export", "--checkpoint", "repo", "-o", "again.gguf", "--format", "gguf"]) == 0
    assert set(read_gguf("again.gguf").tensors) == set(read_gguf("repo/model.gguf").tensors)


def test_what_export_cannot_write_is_one_line(tiny, capsys):
    _, path = tiny
    sab = SABTranscendentV2(preset="tiny")
    save_checkpoint(checkpoint_dict(sab), "sab.pt")
    cases = [(["--checkpoint", "sab.pt", "-o", "sab.gguf"], "a SAB-family model"),
             (["--checkpoint", str(path), "-o", "x.gguf", "--dtype", "bf16"], "--gguf-type"),
             (["--checkpoint", str(path), "-o", "x.safetensors", "--gguf-type", "q8_0"], "applies to a GGUF export")]
    for argv, says in cases:
        assert main(["export", *argv]) == 2, argv
        assert_one_error_line(capsys.readouterr().err, says)
    assert not list(path.parent.glob("*.gguf.*")) and not (path.parent / "sab.gguf").exists()


def test_a_bad_gguf_given_to_init_from_is_one_line(in_tmp, capsys):
    (in_tmp / "cut.gguf").write_bytes(b"GGUF\x03\0\0\0" + b"\0" * 8)
    assert main(["train", *tiny_run(preset=None), "--init_from", "cut.gguf", "--checkpoint_dir", "ck"]) == 2
    assert_one_error_line(capsys.readouterr().err, "cut.gguf", "shorter than its fixed header")


def test_our_model_from_a_gguf_gives_transformers_logits_and_tokens(tiny):
    model, path = tiny
    sab = SABTranscendentV2.load(path)
    reference = model_from_parts(read_gguf(path))
    with torch.no_grad():
        ours = sab.model(IDS)
    ours = ours if isinstance(ours, torch.Tensor) else ours.logits
    assert (ours - logits(reference, IDS)).abs().max() <= 1e-4
    prompt = sab.tokenizer.encode("the world")
    greedy = list(generate_tokens(sab.model, prompt, 8, 0.0, None, None, 0, None, True))
    theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=2)
    assert greedy == theirs[0, len(prompt):].tolist()


def test_without_the_gguf_package_the_line_says_how_to_install_it(tiny, capsys, monkeypatch):
    _, path = tiny
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert main(["generate", "--checkpoint", str(path), "--prompt", "in"]) == 2
    assert_one_error_line(capsys.readouterr().err, "needs the gguf package", "pip install 'sab-byon-omni[gguf]'")


@pytest.mark.parametrize("extra, hint", [({}, "Use --format hf"), ({"value_embed": True}, "--format safetensors or pt keeps it")])
def test_the_gguf_refusal_points_at_a_format_that_takes_the_model(in_tmp, capsys, extra, hint):
    """A SAB model with a lever no transformers class computes was sent to --format hf, which refuses it too."""
    from sab_byon_omni.config import build_config
    from sab_byon_omni.data.tokenizers import build_tokenizer

    cfg = build_config({"model": {"preset": "tiny", **extra}, "data": {"tokenizer": "byte"}})
    SABTranscendentV2(config=cfg, tokenizer=build_tokenizer("byte")).save_pretrained(in_tmp / "m")
    assert main(["export", "--checkpoint", "m", "--format", "gguf", "-o", "m.gguf"]) == 2
    err = capsys.readouterr().err
    assert hint in err and ("Use --format hf" in err) == (not extra), err
