"""Sliding-window evaluation against a hand computation, bits per byte, and `sab-omni eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.config import ModelConfig
from sab_byon_omni.data.batching import collate
from sab_byon_omni.data.windows import TokenWindows
from sab_byon_omni.device import resolve_precision
from sab_byon_omni.evaluation import EvalResult, evaluate_stream, stream_loss, window_spans
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.loss import causal_lm_loss
from tests.helpers import CPU_PRECISIONS


@pytest.fixture(scope="module")
def model() -> CausalTransformer:
    torch.manual_seed(0)
    m = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=50, max_seq_len=16, fragmergent_mode="off"))
    with torch.no_grad():  # a sharper, less uniform model than the initial one
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    return m.eval()


def hand_loss(model: CausalTransformer, tokens: np.ndarray, seq_len: int, stride: int) -> tuple[float, int]:
    """One forward pass per target, on exactly the context the sliding window gives it."""
    total, n, scored, begin = 0.0, 0, 1, 0
    while scored < len(tokens):
        end = min(begin + seq_len, len(tokens))
        for p in range(scored, end):
            ctx = torch.tensor([tokens[begin:p].tolist()])
            with torch.no_grad():
                logp = torch.log_softmax(model(ctx)[0, -1].double(), -1)
            total -= float(logp[int(tokens[p])])
            n += 1
        scored, begin = end, begin + stride
    return total, n


@pytest.mark.parametrize("n, seq_len, stride", [(2, 2, 1), (30, 8, 7), (30, 8, 3), (31, 8, 1), (10, 16, 5)])
def test_spans_score_every_target_once_with_enough_context(n, seq_len, stride):
    seen = []
    for begin, end, first in window_spans(n, seq_len, stride):
        assert end - begin <= seq_len and begin < first <= end
        if begin:
            assert first - begin >= seq_len - stride  # each scored token sees at least this context
        seen.extend(range(first, end))
    assert seen == list(range(1, n))


@pytest.mark.parametrize("stride", [0, 8, 9])
def test_bad_stride_is_rejected(stride):
    with pytest.raises(ValueError, match="stride"):
        list(window_spans(20, 8, stride))


@pytest.mark.parametrize("seq_len, stride, batch", [(8, 7, 1), (8, 7, 4), (8, 3, 3), (8, 1, 5), (16, 5, 2)])
def test_stream_loss_matches_a_hand_computation(model, seq_len, stride, batch):
    tokens = np.random.default_rng(1).integers(0, 50, size=37).astype(np.uint16)
    want, n_want = hand_loss(model, tokens, seq_len, stride)
    got, n = stream_loss(model, tokens, seq_len, stride, batch_size=batch)
    assert n == n_want == 36
    assert got == pytest.approx(want, rel=1e-5)


def test_more_context_changes_the_loss(model):
    tokens = np.random.default_rng(2).integers(0, 50, size=60)
    a, _ = stream_loss(model, tokens, 16, 15)
    b, _ = stream_loss(model, tokens, 16, 2)
    assert a != pytest.approx(b, rel=1e-6)


def test_non_overlapping_stride_equals_the_training_validation(model):
    tokens = np.random.default_rng(3).integers(0, 50, size=45)
    windows = TokenWindows(tokens, 8, drop_last=False)
    total, count = 0.0, 0
    for i in range(0, len(windows), 3):
        batch = collate([windows[j] for j in range(i, min(i + 3, len(windows)))], pad_id=0)
        with torch.no_grad():
            total += float(causal_lm_loss(model(batch.input_ids), batch.labels))
        count += batch.n_targets
    got, n = stream_loss(model, tokens, 8, 7, batch_size=2)
    assert n == count == 44 and got == pytest.approx(total, rel=1e-5)


def test_bits_per_byte_and_perplexity_formulas(model):
    tokens = np.random.default_rng(4).integers(0, 50, size=25)
    want, n = hand_loss(model, tokens, 8, 4)
    r = evaluate_stream(model, tokens, n_bytes=100, seq_len=8, stride=4)
    assert r.n_tokens == 24 and r.loss == pytest.approx(want / 24, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(want / 24), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(want / (math.log(2) * 100), rel=1e-5)
    both = r + r
    assert both.loss == pytest.approx(r.loss) and both.bits_per_byte == pytest.approx(r.bits_per_byte)
    assert math.isnan(EvalResult(0.0, 0, 0).loss)


# ------------------------------------------------------------------------------------------ CLI
def train_tiny(root: Path, data: Path, capsys, *extra: str) -> Path:
    for i in range(6):
        (data / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i}\n" * 6, encoding="utf-8")
    code = main(["train", "--data", str(data), "--tokenizer", "byte", "--preset", "tiny", "--seq_len", "32",
                 "--batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--epochs", "1",
                 "--val_fraction", "0.34", "--checkpoint_dir", str(root / "ck"), "--progress", "false", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return root / "ck" / "best_model.pt"


@pytest.fixture
def trained(in_tmp, capsys):
    data = in_tmp / "src"
    data.mkdir()
    return train_tiny(in_tmp, data, capsys), data


def test_eval_cli_reports_loss_perplexity_and_bits_per_byte(trained, capsys):
    ckpt, data = trained
    validation = json.loads(ckpt.parent.joinpath("metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["loss"] == pytest.approx(validation, rel=1e-4)  # default stride = training's validation
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]))
    # six documents are too few for a whole-document split: the last 2 of each one's 6 lines are held out
    val_text = 6 * len("def f0(x):\n    return x * 0 + 0\n" * 2)  # one byte per char
    assert r["bytes"] == val_text and r["tokens"] == val_text + 6 - 1  # + one <EOS> each, - the first token
    assert main(["eval", "--checkpoint", str(ckpt), "--stride", "8", "--split", "all"]) == 0  # data from the checkpoint
    out = capsys.readouterr().out
    assert "all split of" in out and "bits/byte" in out and "stride 8" in out


def test_eval_with_a_checkpoint_whose_tokenizer_differs_from_the_cache(trained, capsys):
    """The default cache is keyed by tokenizer: scoring a byte model never reuses or rebuilds the
    cache of a char96 run on the same files; a --cache-dir built for another tokenizer is refused."""
    ckpt, data = trained
    root = ckpt.parent.parent / ".sab_cache"
    assert main(["train", "--data", str(data), "--tokenizer", "char96", "--preset", "tiny", "--seq_len", "32",
                 "--val_fraction", "0.34", "--checkpoint_dir", "ck_char", "--max_steps", "1",
                 "--progress", "false"]) == 0
    capsys.readouterr()
    stamp = lambda: {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}  # noqa: E731
    caches, before = sorted(root.iterdir()), stamp()
    assert len(caches) == 2  # one per tokenizer
    char96 = next(d for d in caches if '"char96"' in (d / "meta.json").read_text())
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert stamp() == before  # the byte model's own cache was reused, the char96 one untouched
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--cache-dir", str(char96)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the data cache") and "char96" in err and "byte" in err
    assert stamp() == before


@pytest.mark.parametrize("args, match", [
    (["--stride", "40"], "--stride=40 must be in [1, seq_len-1=31]"),
    (["--seq-len", "1000"], "--seq-len=1000"),
    (["--data", "nowhere"], "no such file or folder"),
    (["--batch-size", "0"], "--batch-size=0"),
])
def test_eval_bad_arguments(trained, capsys, args, match):
    ckpt, _ = trained
    assert main(["eval", "--checkpoint", str(ckpt), *args]) == 2
    assert match in capsys.readouterr().err


def test_eval_missing_checkpoint_and_synthetic_data(in_tmp, capsys):
    """A missing model is one error line; a model trained on the synthetic data is scored on the
    same held-out samples as in training (the number its last validation reported)."""
    assert main(["eval", "--checkpoint", "nope.pt", "--data", "."]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--num_samples", "20", "--seq_len", "64", "--epochs", "1",
                 "--checkpoint_dir", "syn", "--progress", "false"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", "syn/best_model.pt", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    best = torch.load("syn/best_model.pt", weights_only=True)
    assert r["data"] == "synthetic" and r["samples"] == 2  # 10% of 20 held out
    # in the precision it trained in (auto: bf16 or fp32, by the CPU) and its batch size: bit-equal
    assert r["loss"] == best["val_loss"]
    assert r["precision"] == resolve_precision("auto", torch.device("cpu")) and r["batch_size"] == 4
    assert 0 < r["entropy_floor"] < r["loss"]


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_eval_repeats_the_validation_of_training_in_its_precision(in_tmp, capsys, precision):
    """By default eval scores in the precision the model trained in: the validation loss training
    reported, bit for bit, on a corpus and on the synthetic data. In the other precision the loss
    differs by rounding only (docs/DATA.md: within 1e-3 relative; ~1e-4 at most measured)."""
    other = "bf16" if precision == "fp32" else "fp32"
    data = in_tmp / "src"
    data.mkdir()
    corpus = train_tiny(in_tmp, data, capsys, "--precision", precision)
    assert main(["train", "--preset", "tiny", "--num_samples", "20", "--seq_len", "64", "--epochs", "1",
                 "--checkpoint_dir", "syn", "--progress", "false", "--precision", precision]) == 0
    capsys.readouterr()
    for ckpt in (corpus, in_tmp / "syn" / "best_model.pt"):
        validation = torch.load(ckpt, weights_only=True)["val_loss"]
        assert main(["eval", "--checkpoint", str(ckpt), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["precision"] == precision and r["loss"] == validation
        assert main(["eval", "--checkpoint", str(ckpt), "--json", "--precision", other]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["precision"] == other and r["loss"] != validation
        assert r["loss"] == pytest.approx(validation, rel=1e-3)


def test_eval_of_a_bf16_model_without_native_bf16_scores_in_fp32(in_tmp, capsys, monkeypatch):
    """bf16 emulated on a CPU without AVX-512 BF16 or AMX runs far slower: eval takes that CPU's
    own precision instead (fp32), and says so."""
    assert main(["train", "--preset", "tiny", "--num_samples", "20", "--seq_len", "64", "--epochs", "1",
                 "--checkpoint_dir", "syn", "--progress", "false", "--precision", "bf16"]) == 0
    capsys.readouterr()
    validation = torch.load("syn/best_model.pt", weights_only=True)["val_loss"]
    monkeypatch.setenv("SAB_CPU_NATIVE_BF16", "0")  # as on an AVX2-only CPU
    assert main(["eval", "--checkpoint", "syn/best_model.pt", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == "fp32" and r["loss"] != validation
    assert r["loss"] == pytest.approx(validation, rel=1e-3)
