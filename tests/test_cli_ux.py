"""What a person sees at the command line: both flag spellings, no flag guessed from a prefix, a
"did you mean", clean help, a start banner, step lines, a closing summary, the run folder's
config.yaml, and every way of naming a model (checkpoint, safetensors, save_pretrained folder,
transformers folder, cached Hub id) in generate, eval, export and train --init_from."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sab_byon_omni.cli import build_parser, main
from sab_byon_omni.commands.common import collect_overrides
from sab_byon_omni.config import load_config
from tests.helpers import tiny_run

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

TINY = tiny_run(num_samples=120, seq_len=64, batch_size=8, gradient_accumulation_steps=2, epochs=None,
                precision=None, device=None, log_interval=None)


def one_error(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv", [
    ["generate", "--max_new_tokens", "3"], ["generate", "--max-new-tokens", "3"],
    ["train", "--learning-rate", "1e-3"], ["train", "--learning_rate", "1e-3"], ["train", "--train.learning_rate", "1e-3"],
    ["eval", "--batch_size", "2"], ["bench", "--seq_len", "32"], ["estimate", "--vocab_size", "100"],
])
def test_every_flag_takes_both_spellings(argv):
    base = {"generate": ["--checkpoint", "x", "--prompt", "y"], "eval": ["--checkpoint", "x"]}.get(argv[0], [])
    args = build_parser().parse_args([argv[0], *base, *argv[1:]])
    assert args.command == argv[0]


def _command_parsers() -> dict:
    parser = build_parser()
    return dict(next(a for a in parser._actions if a.dest == "command").choices)


def test_both_spellings_are_declared_for_every_flag_and_help_shows_one():
    """Declared as ordinary option strings of one argument (no private argparse table written);
    --help shows the spelling given first, once."""
    for name, p in _command_parsers().items():
        shown = set(re.findall(r"--[\w.-]+", p.format_help()))
        for action in p._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            for o in long:
                assert {"--" + o[2:].replace("_", "-"), "--" + o[2:].replace("-", "_")} <= set(long), (name, o)
            if action.help != argparse.SUPPRESS:
                first = list({o.replace("_", "-"): o for o in reversed(long)}.values())
                assert set(first) <= shown and not (set(long) - set(first)) & shown, (name, long)


@pytest.mark.parametrize("flag", ["--learning_rate", "--learning-rate", "--train.learning_rate", "--train.learning-rate"])
def test_every_spelling_of_a_config_flag_sets_the_same_field(flag):
    args = build_parser().parse_args(["train", flag, "3e-4", "--data", "notes"])
    assert collect_overrides(args) == {"train.learning_rate": "3e-4", "data.dataset": "notes"}


def test_a_prefix_is_never_taken_for_a_flag_and_a_typo_gets_a_suggestion(in_tmp, capsys):
    assert main(["train", "--learning_rat", "1e-3"]) == 2  # not the 35-minute default job
    one_error(capsys.readouterr().err, "--learning_rat", "did you mean --learning_rate")
    assert main(["generate", "--checkpoint", "x", "--prompt", "y", "--max-new-token", "3"]) == 2
    one_error(capsys.readouterr().err, "did you mean --max-new-tokens")
    assert main(["train", "--train.learning-rat", "1e-3"]) == 2
    one_error(capsys.readouterr().err, "did you mean --train.learning_rate")
    assert main(["plot", "run", "--outptu", "x.png"]) == 2  # the suggestion is a flag --help shows
    one_error(capsys.readouterr().err, "did you mean --output")
    assert list(in_tmp.iterdir()) == []


def test_help_has_no_markup_and_no_repeated_default(capsys):
    for command in ("train", "eval", "generate", "export", "bench", "estimate", "plot", "consolidate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text, command
        for line in text.splitlines():
            assert line.count("(default:") <= 1, (command, line)


def test_version_and_help_answer_without_importing_torch():
    code = ("import sys; from sab_byon_omni.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    out = subprocess.run([sys.executable, "-m", "sab_byon_omni", "--version"], capture_output=True, text=True)
    assert out.stdout.startswith("sab-omni ")


def test_config_keys_renamed_keep_their_old_spellings(in_tmp):
    assert load_config(None, {"data.length_bucketing": "16"}).data.length_bucket_size == 16
    assert load_config(None, {"train.micro_batch_size": "auto"}).train.auto_micro_batch is True
    assert build_parser().parse_args(["train", "--length_bucketing", "8"])


# ---------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "-m", "sab_byon_omni", "train", *TINY, "--epochs", "2",
                           "--checkpoint_dir", "ck", "--log_interval", "2", "--eval_interval", "4"],
                          cwd=d, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return d, proc


def test_the_banner_says_what_the_run_is(run):
    _, proc = run
    for key in ("run folder:", "data:", "tokenizer:", "model:", "device:", "batch:", "steps:", "schedule:",
                "memory:", "validation:", "recipe:", "time:"):
        assert any(line.startswith(key) for line in proc.stderr.splitlines()), key
    lines = proc.stderr.splitlines()
    time_line = next(line for line in lines if line.startswith("time:"))
    assert "per optimizer step" in time_line and "FLOP per step at the measured" in time_line  # before step 1
    assert lines.index(time_line) < next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert "every 4 steps, at each epoch's end and at the last step, on all of 12 samples" in proc.stderr
    assert "recipe:" in proc.stderr and "the guide's defaults (configs/default.yaml), with --preset" in proc.stderr
    assert "108 training samples" in proc.stderr and "16 samples per optimizer step" in proc.stderr
    assert "14 optimizer steps" in proc.stderr  # 7 per epoch x 2


def test_step_and_evaluation_lines_and_a_closing_summary(run):
    d, proc = run
    steps = [line for line in proc.stderr.splitlines() if line.startswith("step ") and "(epoch" in line]
    assert steps and all("tokens/s" in s and "lr " in s for s in steps)
    assert any("validation loss" in line and line.startswith("step 4") for line in proc.stderr.splitlines())
    assert "best validation loss" in proc.stderr
    assert "sab-omni generate --checkpoint ck/best_model.pt" in proc.stderr
    assert "sab-omni eval --checkpoint ck/best_model.pt" in proc.stderr and "sab-omni plot ck" in proc.stderr


def test_a_run_ended_by_max_steps_and_resumed_when_finished_says_where_it_is(in_tmp, capsys):
    """No "-" alone where an epoch did not finish (the last logged loss, the best validation loss);
    a finished run resumed says at which step it is and how to train further; no "1 steps" or "(s)"."""
    argv = ["train", *TINY, "--epochs", "1", "--checkpoint_dir", "ck", "--max_steps", "3", "--log_interval", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^train loss per epoch: - \(no epoch finished; last logged loss \d\.\d{4} at step 3\)$", out, re.M)
    assert re.search(r"^validation loss per epoch: - \(best validation loss \d\.\d{4}\)$", out, re.M), out
    assert "3 optimizer steps in this run, ended at step 3;" in out
    assert "1 epoch," in err and "1 process" in err and "(s)" not in err
    assert main([*argv, "--resume", "auto"]) == 0
    out, err = capsys.readouterr()
    assert "nothing to train: the run is already at step 3 of 3 (train.max_steps=3); to train it further, resume " \
           "with a higher --max_steps or --epochs" in err
    assert out.strip() == "nothing trained: the run is already at step 3 (see above)"
    assert main([*argv[:-4], "--max_steps", "4", "--resume", "auto"]) == 0
    assert "1 optimizer step in this run, ended at step 4;" in capsys.readouterr().out


def test_the_run_folder_holds_a_config_that_continues_it(run):
    d, _ = run
    cfg = load_config(d / "ck" / "config.yaml")
    assert cfg.model.preset == "tiny" and cfg.train.resume == "auto" and cfg.train.epochs == 2
    again = subprocess.run([sys.executable, "-m", "sab_byon_omni", "train", "--config", "ck/config.yaml",
                            "--epochs", "3"], cwd=d, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from ck/epoch_2.pt" in again.stderr and (d / "ck" / "epoch_3.pt").is_file()


# ---------------------------------------------------------------------------------- load routes
@pytest.fixture(scope="module")
def sources(run):
    """The same weights in every form a command accepts."""
    d, _ = run
    ck = d / "ck" / "epoch_2.pt"
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    assert main(["export", "--checkpoint", str(ck), "-o", str(d / "m.safetensors")]) == 0
    SABTranscendentV2.load(ck).save_pretrained(d / "pretrained")
    forms = {"checkpoint": ck, "safetensors": d / "m.safetensors", "pretrained folder": d / "pretrained",
             "pretrained weights file": d / "pretrained" / "model.safetensors"}
    if pytest.importorskip("tokenizers"):
        assert main(["export", "--checkpoint", str(ck), "-o", str(d / "hf"), "--format", "hf"]) == 0
        forms["transformers folder"] = d / "hf"
    return forms


@pytest.mark.parametrize("form", ["checkpoint", "safetensors", "pretrained folder", "pretrained weights file",
                                  "transformers folder"])
def test_generate_and_eval_take_every_form(sources, form, capsys):
    if form not in sources:
        pytest.skip("tokenizers missing")
    src = str(sources[form])
    assert main(["generate", "--checkpoint", src, "--prompt", "[CODE]", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[CODE]") and len(out.removesuffix("\n")) == len("[CODE]") + 12  # spaces are tokens too
    assert main(["eval", "--checkpoint", str(sources["checkpoint"]), "--json"]) == 0
    reference = capsys.readouterr().out
    if form != "transformers folder":  # the exported folder loads with fragmergent off, folded in: same numbers
        assert main(["eval", "--checkpoint", src, "--json"]) == 0
        assert capsys.readouterr().out.split('"loss"')[1][:12] == reference.split('"loss"')[1][:12]


def test_a_hub_id_is_read_from_the_local_cache_only(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--checkpoint", "nobody/absent-model", "--prompt", "x", "--max-new-tokens", "2"]) == 2
    one_error(capsys.readouterr().err, "nobody/absent-model", "local Hugging Face cache", "nothing is downloaded")
    snap = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc"
    snap.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(sources["pretrained folder"], snap)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc")
    assert main(["generate", "--checkpoint", "someone/tiny", "--prompt", "[CODE]", "--max-new-tokens", "4"]) == 0


def test_init_from_starts_a_new_run_from_the_weights(sources, tmp_path, capsys):
    src = str(sources["safetensors"])
    flags = tiny_run(num_samples=120, seq_len=64, batch_size=8, gradient_accumulation_steps=2, epochs=None, preset=None)
    code = main(["train", *flags, "--max_steps", "2", "--checkpoint_dir", str(tmp_path / "ft"), "--init_from", src])
    assert code == 0
    err = capsys.readouterr().err
    assert "weights:" in err and "a fresh optimizer and schedule" in err
    assert "tiny: hidden 64" in err  # the architecture comes from the weights (a --preset is refused)
    from sab_byon_omni.files.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "ft" / "step_2.pt")
    assert ck["global_step"] == 2 and ck["config"]["model"]["preset"] == "tiny"


def test_a_reader_that_leaves_early_is_not_a_traceback():
    """`sab-omni estimate --table | head -1`: the pipe closes under us; exit 0, nothing on stderr."""
    p = subprocess.Popen([sys.executable, "-m", "sab_byon_omni.cli", "estimate", "--table"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_a_folder_holding_a_run_is_refused_before_the_corpus_is_read(in_tmp, capsys):
    (in_tmp / "notes").mkdir()
    (in_tmp / "notes" / "a.txt").write_text("some text to train on. " * 400)
    (in_tmp / "ck").mkdir()
    (in_tmp / "ck" / "epoch_1.pt").write_bytes(b"PK")  # a run was here
    assert main(["train", "--data", "notes", "--preset", "tiny", "--checkpoint_dir", "ck"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints (epoch_1.pt)" in err[0] and "--resume auto" in err[0]
    assert not (in_tmp / ".sab_cache").exists()  # nothing read, nothing written


@pytest.mark.parametrize("content, says", [(b"just some notes\n", "starts with"), (b"", "empty")])
def test_a_file_that_is_no_checkpoint_is_named_as_such(in_tmp, capsys, content, says):
    (in_tmp / "notes.txt").write_bytes(content)
    assert main(["generate", "--checkpoint", "notes.txt", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert says in err and "corrupt" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("content, says", [
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "is a PNG image"), (b"\xff\xd8\xff\xe0" + bytes(40), "is a JPEG image"),
    (b"GIF89a" + bytes(40), "is a GIF image"), (b"%PDF-1.7\n%\xe2\xe3\n", "is a PDF document"),
    (b"\x7fELF\x02\x01\x01" + bytes(40), "is an ELF program"), (b"\x1f\x8b\x08\x00" + bytes(20), "is gzip-compressed"),
    (len(b'{"__metadata__":{}}').to_bytes(8, "little") + b'{"__metadata__":{}}', "is a safetensors file"),
], ids=["png", "jpeg", "gif", "pdf", "elf", "gzip", "safetensors"])
def test_a_binary_file_given_as_a_checkpoint_is_named_by_its_kind(in_tmp, capsys, content, says):
    """Before, a PNG was "(a text file?)"."""
    (in_tmp / "model.bin").write_bytes(content)
    assert main(["generate", "--checkpoint", "model.bin", "--prompt", "x"]) == 2
    assert "text file" not in one_error(capsys.readouterr().err, "model.bin: not a checkpoint", says)


@pytest.mark.parametrize("argv, says", [
    (["generate", "--checkpoint", "/nonexistent", "--prompt", "x"], "checkpoint not found: /nonexistent"),
    (["eval", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["eval", "--checkpoint", "present.pt", "--data", "nowhere"], "data.dataset='nowhere' (train's --data): no such file or folder (relative to "),
    (["train", "--data", "/nonexistent"], "data.dataset='/nonexistent' (train's --data): no such file or folder"),
    (["train", "--init_from", "gone.pt"], "checkpoint not found: gone.pt"),
    (["export", "--checkpoint", "nope", "-o", "out"], "checkpoint not found: nope"),
    (["plot", "nope"], "run directory not found: nope"),
], ids=["generate", "eval", "eval-data", "train-data", "train-init-from", "export", "plot"])
def test_a_wrong_path_fails_before_torch_is_imported(in_tmp, argv, says):
    """Importing torch took most of the 16-18 s that these errors took on a busy machine: a path
    is checked first (the outcome is checked here, not the time)."""
    (in_tmp / "present.pt").write_bytes(b"PK")
    code = "import sys\nfrom sab_byon_omni.cli import main\nrc = main(sys.argv[1:])\nprint(rc, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=in_tmp)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr[-2000:])
    one_error(out.stderr, says)


def test_a_data_path_that_is_a_dangling_link_or_an_unknown_home_says_so(in_tmp, capsys):
    (in_tmp / "gone").symlink_to(in_tmp / "never-there")
    assert main(["train", "--data", "gone"]) == 2
    one_error(capsys.readouterr().err, "data.dataset='gone' (train's --data): a symbolic link to nothing")
    assert main(["train", "--data", "~no_such_user_x/notes.txt"]) == 2
    one_error(capsys.readouterr().err, "'~no_such_user_x' is no user's home folder here")


def test_a_long_message_is_cut_at_a_sentence_not_mid_word():
    from sab_byon_omni.errors import first_line

    msg = "Weights only load failed. " + "In PyTorch 2.6, we changed the default value of weights_only. " * 5
    cut = first_line(msg)
    assert msg.startswith(cut) and cut.endswith("weights_only.") and len(cut) <= 160
    assert first_line("x" * 500).endswith("…") and len(first_line("x" * 500)) == 160


def test_resume_auto_without_data_takes_the_run_folders_config(in_tmp, capsys):
    """`train --resume auto --checkpoint_dir RUN` was refused: 'this command gives --data synthetic'."""
    (in_tmp / "data").mkdir()
    (in_tmp / "data" / "a.txt").write_text("".join(f"line {i} of some text\n" for i in range(400)))
    first = ["train", "--data", "data", *tiny_run(max_steps=2, seq_len=32, num_samples=None), "--checkpoint_dir", "r"]
    assert main(first) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "auto", "--checkpoint_dir", "r", "--max_steps", "3", "--progress", "false"]) == 0
    out, err = capsys.readouterr()
    assert "resuming from r/step_2.pt" in err and "data:       data:" in err and "r/config.yaml, as written" in err
    assert "ended at step 3" in out
    (in_tmp / "other").mkdir()
    (in_tmp / "other" / "b.txt").write_text("other text\n" * 400)
    assert main(["train", "--data", "other", "--resume", "auto", "--checkpoint_dir", "r", "--max_steps", "4"]) == 2
    one_error(capsys.readouterr().err, "the run was trained on --data")


@pytest.mark.parametrize("command, says", [("chat", "interrupted\n"), ("train", "the checkpoints already written")])
def test_ctrl_c_outside_training_does_not_talk_of_checkpoints(monkeypatch, capsys, command, says):
    """Ctrl-C while `chat` loads its model said training's line about checkpoints (a hostile tester's finding)."""
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"sab_byon_omni.commands.{command}"), "run", interrupted)
    argv = {"chat": ["chat", "--checkpoint", "x"], "train": ["train"]}[command]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert says in err and (command == "train") == ("checkpoints" in err)


@pytest.mark.parametrize("flags, says", [
    (["--mlp", "relu2"], "mlp='gelu' (this command: 'relu2')"),
    (["--logit_softcap", "5"], "logit_softcap=0.0 (this command: 5.0)"),
])
def test_a_resume_that_would_change_the_model_is_refused(tmp_path, capsys, flags, says):
    """Same weight shapes, another model: the weights loaded and trained on as a ReLU^2 model (a
    reviewer's finding). A regularisation setting may change."""
    (tmp_path / "notes.txt").write_text("Some notes about the garden and the weather. " * 400)
    run = ["train", "--data", str(tmp_path / "notes.txt"), "--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32",
           "--checkpoint_dir", str(tmp_path / "ck"), "--resume", "auto"]
    assert main([*run, "--max_steps", "2"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert main([*run, "--max_steps", "3", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert main([*run, "--max_steps", "3", "--dropout", "0.1"]) == 0


def test_an_error_whose_first_line_ends_in_a_colon_keeps_what_follows():
    """'Error(s) in loading state_dict for CausalTransformer:' named no key and no option (a reviewer's finding)."""
    from sab_byon_omni.errors import first_line

    e = RuntimeError("Error(s) in loading state_dict for CausalTransformer:\n\tMissing key(s) in state_dict: "
                     '"blocks.0.attn.q_norm.weight".')
    assert first_line(e) == ('Error(s) in loading state_dict for CausalTransformer: Missing key(s) in state_dict: '
                             '"blocks.0.attn.q_norm.weight".')
    assert first_line("one line") == "one line" and first_line("ends here:") == "ends here:"
