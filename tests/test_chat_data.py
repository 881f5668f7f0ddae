"""Chat and instruction data (data/chat.py, chat_template.py, chat_corpus.py): the template rendered
as transformers renders it, labels on the assistant's tokens only, the masked loss against a
hand-computed one, conversations cut at exchanges, bad lines named by file:line."""

from __future__ import annotations

import dataclasses
import json
import re
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.config import DataConfig
from sab_byon_omni.data import cache
from sab_byon_omni.data.batching import IGNORE_INDEX, collate, iterate_batches, regroup
from sab_byon_omni.data.chat import cut_to_fit, encode_conversation, file_format
from sab_byon_omni.data.chat_template import DEFAULT_TEMPLATE, ChatTemplate, assistant_segments
from sab_byon_omni.data.corpus import load_corpus
from sab_byon_omni.data.pretrained_tokenizer import HFTokenizer
from sab_byon_omni.data.tokenizers import build_tokenizer
from sab_byon_omni.errors import SabError
from sab_byon_omni.loss import causal_lm_loss

# SmolLM2-135M-Instruct's template, as its GGUF holds it (tests/test_gguf_smollm2.py reads the real one)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome, since 1871."}]


@pytest.fixture(scope="module")
def hf_tok():
    """A small byte-level BPE with ChatML's special tokens and SmolLM2's template: (ours, transformers')."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([m["content"] for m in CONVERSATION] * 20 + ["system user assistant helpful"] * 20, trainer)
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "chat_template": CHATML}
    ours = HFTokenizer.from_parts(tok.to_str(), config)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **config)
    return ours, theirs


# ------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:2]])
@pytest.mark.parametrize("gen", [False, True])
def test_rendering_equals_transformers_apply_chat_template(hf_tok, messages, gen):
    ours, theirs = hf_tok
    text = ChatTemplate.of(ours).render(messages, add_generation_prompt=gen)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert text.startswith("<|im_start|>system\n")


def test_encoded_conversation_equals_transformers_ids_and_masks_the_assistant(hf_tok):
    ours, theirs = hf_tok
    conv = encode_conversation(ours, ChatTemplate.of(ours), CONVERSATION)
    ids = theirs.apply_chat_template(CONVERSATION, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert conv.ids.tolist() == list(ids)
    answers = [i for i, label in enumerate(conv.labels) if label != IGNORE_INDEX]
    assert (conv.labels[answers] == conv.ids[answers]).all()
    # the labelled tokens are exactly each answer and its end of turn, in order
    runs = np.split(np.array(answers), np.where(np.diff(answers) != 1)[0] + 1)
    said = [theirs.decode(conv.ids[r].tolist()) for r in runs]
    assert said == ["Paris.<|im_end|>\n", "Rome, since 1871.<|im_end|>\n"]
    assert conv.turn_ends == [runs[0][-1] + 1, runs[1][-1] + 1] == [runs[0][-1] + 1, len(conv.ids)]


def test_end_of_turn_of_each_template(hf_tok):
    assert ChatTemplate.of(hf_tok[0]).end_of_turn() == "<|im_end|>"
    assert ChatTemplate().end_of_turn() == "<|end|>" and ChatTemplate().is_default
    assert ChatTemplate.of(build_tokenizer("byte")).source == DEFAULT_TEMPLATE


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "fails"),
    ("{{ raise_exception('only user and assistant roles') }}", "refuses this conversation: only user"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}", "more than"),
    ("{% for m in messages %}{{ m.content", "compile"),
    ("{% do messages.append(1) %}{{ messages }}", "compile"),
    ("{{ messages.append(1) }}", "fails"),
    # a hostile tester's: nesting that overflows jinja2's compiler, and builders of huge strings
    ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "nested too deeply"),
    ("{% for message in messages %}" * 2000 + "x" + "{% endfor %}" * 2000, "nested too deeply"),
    ("{{ messages|tojson(indent=300000000) }}", "tojson's indent"),
    ("{{ 'a' * 200000000 }}", "a repeated string"),
    ("{{ [1] * 200000000 }}", "a repeated string or list"),
    ("{{ '%0*d' % (300000000, 1) }}", "a format argument"),
    ("{{ '%0300000000d' % 1 }}", "a format width"),
    ("{{ 'x'.ljust(300000000) }}", "str.ljust"),
    ("{{ '{:>300000000}'.format(1) }}", "a format width"),
    ("{{ '{0:>{1}}'.format(1, 300000000) }}", "a format argument"),
    ("{{ 'x'|center(300000000) }}", "the center filter"),
    ("{{ ('a\n' * 1000)|indent(300000) }}", "the indent filter"),
    ("{{ 2 ** (10 ** 8) }}", "an exponent"),
    ("{{ lipsum(n=1000000) }}", "lipsum"),
])
def test_a_hostile_or_broken_template_is_one_line(template, match):
    with pytest.raises(SabError, match=match) as e:
        ChatTemplate(template).render(CONVERSATION)
    assert "\n" not in str(e.value)


def test_a_template_that_runs_too_long_is_stopped(monkeypatch):
    """Nested loops that print nothing never reach the output limit: the time limit stops them."""
    import sab_byon_omni.data.chat_template as chat_template

    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.5)
    start = time.perf_counter()
    with pytest.raises(SabError, match="ran longer than 0.5 s"):
        ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").render(
            CONVERSATION)
    assert time.perf_counter() - start < 5
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None) and signal.getitimer(signal.ITIMER_REAL) == (0, 0)
    assert ChatTemplate().render(CONVERSATION)  # the timer is off: the next render is not interrupted


def test_the_bounds_leave_ordinary_templates_alone():
    text = ChatTemplate("{{ '%-5s|%3d' % ('ab', 7) }}{{ 'x'.ljust(4) }}{{ '{:>3}'.format(1) }}{{ 2 ** 10 }}"
                        "{{ '-' * 3 }}{{ messages|tojson(indent=2)|length > 0 }}{{ '%d' % 300000000 }}"
                        "{{ '{}'.format(300000000) }}").render(CONVERSATION)
    assert text == "ab   |  7x     11024---True300000000300000000"  # a large number printed is no large string


def test_a_template_that_does_not_grow_is_refused():
    reverse = "{% for m in messages | reverse %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(SabError, match="growing text"):
        assistant_segments(ChatTemplate(reverse), CONVERSATION)


# ------------------------------------------------------------------------------ loss and batches
def test_masked_loss_equals_hand_computed_cross_entropy():
    tok = build_tokenizer("byte")
    rows = [encode_conversation(tok, ChatTemplate(), m) for m in (CONVERSATION, CONVERSATION[1:3])]
    batch = collate([np.stack([r.ids, r.labels]) for r in rows], tok.pad_id)
    logits = torch.randn(*batch.input_ids.shape, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    by_hand, n = 0.0, 0
    for r, row in enumerate(rows):
        for t in range(len(row.ids) - 1):
            if row.labels[t + 1] != IGNORE_INDEX:  # the next token is the assistant's
                by_hand -= torch.log_softmax(logits[r, t].double(), -1)[int(row.ids[t + 1])].item()
                n += 1
    assert n == batch.n_targets == sum(int((r.labels[1:] != IGNORE_INDEX).sum()) for r in rows)
    assert n < sum(len(r.ids) - 1 for r in rows) / 2  # the prompts are most of the text, and masked
    assert causal_lm_loss(logits, batch.labels).item() == pytest.approx(by_hand, rel=1e-5)


def test_plain_rows_batch_as_before_and_regroup_keeps_chat_labels():
    plain = collate([np.arange(1, 6), np.arange(1, 4)], 0)
    assert plain.labels.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, IGNORE_INDEX, IGNORE_INDEX]] and plain.n_targets == 6
    tok = build_tokenizer("byte")
    rows = [encode_conversation(tok, ChatTemplate(), CONVERSATION[: k]) for k in (3, 5, 3, 5)]
    window = [collate([np.stack([r.ids, r.labels])], tok.pad_id) for r in rows]
    passes = regroup(window, max_rows=4, pass_positions=10**6, pad_id=tok.pad_id)
    assert len(passes) == 1 and passes[0].n_targets == sum(b.n_targets for b in window)
    got = sorted(tuple(row[row != IGNORE_INDEX].tolist()) for row in passes[0].labels)
    assert got == sorted(tuple(b.labels[0][b.labels[0] != IGNORE_INDEX].tolist()) for b in window)


def test_cut_at_the_ends_of_exchanges_or_refused():
    tok = build_tokenizer("byte")
    conv = encode_conversation(tok, ChatTemplate(), CONVERSATION)
    first = conv.turn_ends[0]
    pieces = cut_to_fit(conv, first + 5, "f.jsonl:1")
    assert [len(p.ids) for p in pieces] == [first, len(conv.ids) - first]
    assert np.concatenate([p.labels for p in pieces]).tolist() == conv.labels.tolist()
    assert cut_to_fit(conv, len(conv.ids), "x") == [conv]
    with pytest.raises(SabError, match=r"f.jsonl:1: one exchange .* more than data.seq_len=20"):
        cut_to_fit(conv, 20, "f.jsonl:1")


# ------------------------------------------------------------------------------------ files
def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_each_form_is_detected_per_file_and_rendered_as_its_turns(tmp_path):
    msgs = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION[1:3]}] * 3)
    inst = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Capital of", "input": "France", "output": "Paris."}] * 3)
    prom = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}] * 3)
    text = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    assert [file_format(p) for p in (msgs, inst, prom, text)] == ["messages", "instruction", "prompt", None]
    text.unlink()
    tok, train, val = load_corpus(DataConfig(dataset=str(tmp_path), tokenizer="byte", seq_len=128,
                                             cache_dir=str(tmp_path / "cache"), val_fraction=0.2))
    assert len(train) + len(val) == 9 and train.num_targets == sum(int((train[i][1][1:] >= 0).sum())
                                                                   for i in range(len(train)))
    texts = {tok.decode(train[i][0]) for i in range(len(train))} | {tok.decode(val[i][0]) for i in range(len(val))}
    assert texts == {"<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n",
                     "<|user|>\nCapital of\n\nFrance<|end|>\n<|assistant|>\nParis.<|end|>\n"}
    answers = {tok.decode(row[0][row[1] != IGNORE_INDEX]) for row in (train[i] for i in range(len(train)))}
    assert answers == {"Paris.<|end|>\n"}


def test_targets_of_a_step_are_known_to_every_process(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q" * k, "completion": "A" * (k + 1)} for k in range(1, 9)])
    _, train, _ = load_corpus(DataConfig(dataset=str(tmp_path / "a.jsonl"), tokenizer="byte", seq_len=128,
                                         cache_dir=str(tmp_path / "cache")))
    one = [b.n_targets for b in iterate_batches(train, 4, pad_id=0, world=1, seed=3)]
    two = [(b0.global_targets, b1.global_targets, b0.n_targets + b1.n_targets) for b0, b1 in
           zip(iterate_batches(train, 2, pad_id=0, world=2, rank=0, seed=3),
               iterate_batches(train, 2, pad_id=0, world=2, rank=1, seed=3))]
    assert [t for t, _, _ in two] == [u for _, u, _ in two] == [s for _, _, s in two] == one


@pytest.mark.parametrize("line, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"b.jsonl:2: the conversation has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"b.jsonl:2: message 1 has role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"b.jsonl:2: message 1's content is 3, not a string"),
    ({"prompt": "a", "completion": "b"}, r"b.jsonl:2: not a 'messages' record"),
    ("{not json", r"b.jsonl:2: not a JSON record"),
    ({"messages": "hi"}, r"b.jsonl:2: 'messages' is 'hi', not a list"),
    ({"messages": [{"role": "user", "contnet": "hi"}, {"role": "assistant", "content": "x"}]},
     r"b.jsonl:2: message 1 has no 'content' \(keys: role, contnet; did you mean 'content'\?\)"),
])
def test_a_bad_line_is_one_line_naming_file_and_line(tmp_path, capsys, line, match):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "b.jsonl", [{"messages": CONVERSATION}, line])
    code = main(["train", "--data", str(data), "--tokenizer", "byte", "--preset", "tiny", "--seq_len", "256",
                 "--max_steps", "1", "--checkpoint_dir", str(tmp_path / "ck"), "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "c").exists() and not (tmp_path / "ck").exists()


def test_chat_and_text_files_do_not_mix(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}])
    (tmp_path / "b.txt").write_text("plain text\n")
    with pytest.raises(SabError, match="a corpus is all chat data or all text"):
        load_corpus(DataConfig(dataset=str(tmp_path), tokenizer="byte", cache_dir=str(tmp_path / "c")))


def test_cache_is_reused_and_rebuilt_for_another_seq_len(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}] * 4)
    cfg = DataConfig(dataset=str(tmp_path / "a.jsonl"), tokenizer="byte", seq_len=256, cache_dir=str(tmp_path / "c"))
    caplog.set_level("INFO")
    first = load_corpus(cfg)[1]
    assert "building" in caplog.text
    caplog.clear()
    again = load_corpus(cfg)[1]
    assert "building" not in caplog.text and [again[i].tolist() for i in range(3)] == [first[i].tolist() for i in range(3)]
    short = load_corpus(dataclasses.replace(cfg, seq_len=100))[1]
    assert "seq_len changed" in caplog.text and len(short) == 2 * len(first) and math.isfinite(short.num_targets)
    meta = cache.read_meta(tmp_path / "c")  # the text path never reads a chat cache as a token stream
    assert cache.stale_reason(meta, tmp_path / "c", cfg, meta["files"]) == "a chat corpus was cached here"


def test_eval_scores_the_answers_as_training_validated_them(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}] * 6 + [{"messages": CONVERSATION[1:3]}] * 6)
    args = ["--data", str(tmp_path / "a.jsonl"), "--cache_dir", str(tmp_path / "c")]
    assert main(["train", *args[:2], "--tokenizer", "byte", "--preset", "tiny", "--seq_len", "128", "--max_steps", "2",
                 "--batch_size", "4", "--gradient_accumulation_steps", "1", "--precision", "fp32", "--progress", "false",
                 "--checkpoint_dir", str(tmp_path / "ck"), *args[2:]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["val_loss"] for r in rows if r.get("kind") == "eval"][-1]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "ck" / "step_2.pt"), "--json", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(trained, rel=1e-6) and result["samples"] > 0
    assert result["bytes"] == result["tokens"]  # byte tokens: one byte each, answers only


def test_an_hf_export_of_a_chat_run_carries_the_template_it_trained_with(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}] * 6)
    args = ["--data", str(tmp_path / "a.jsonl"), "--cache_dir", str(tmp_path / "c"), "--tokenizer", "char96",
            "--preset", "tiny", "--seq_len", "128", "--batch_size", "4", "--gradient_accumulation_steps", "1",
            "--precision", "fp32", "--progress", "false", "--checkpoint_dir", str(tmp_path / "ck")]
    assert main(["train", *args, "--max_steps", "1"]) == 0
    spec = torch.load(tmp_path / "ck" / "step_1.pt", weights_only=False)["tokenizer"]
    assert spec == {"name": "char96", "chat_template": DEFAULT_TEMPLATE}  # recorded at training time
    assert main(["train", *args, "--max_steps", "2", "--resume", "auto"]) == 0  # the template does not stop a resume
    assert main(["export", "--checkpoint", str(tmp_path / "ck" / "step_2.pt"), "-o", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for gen in (False, True):
        assert theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen) == \
            ChatTemplate().render(CONVERSATION, add_generation_prompt=gen)
    # and through a .pt export and back: the template travels with the tokenizer's spec
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "-o", str(tmp_path / "again.pt")]) == 0
    assert torch.load(tmp_path / "again.pt", weights_only=False)["tokenizer"]["chat_template"] == DEFAULT_TEMPLATE


@pytest.mark.parametrize("record, hint", [
    ({"mesages": CONVERSATION}, r"\(keys: mesages; did you mean 'messages'\?\)"),
    ({"instruction": "a", "outptu": "b"}, r"\(keys: instruction, outptu; did you mean 'output'\?\)"),
])
@pytest.mark.parametrize("beside", [None, "text", "chat"])
def test_a_typo_in_a_chat_key_is_named_not_skipped(tmp_path, capsys, record, hint, beside):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "notes.jsonl", [record])
    if beside == "text":
        (data / "a.txt").write_text("plain text, enough of it. " * 40)
    if beside == "chat":
        write_jsonl(data / "a.jsonl", [{"messages": CONVERSATION}] * 4)
    code = main(["train", "--data", str(data), "--tokenizer", "byte", "--preset", "tiny", "--seq_len", "64",
                 "--max_steps", "1", "--checkpoint_dir", str(tmp_path / "ck"), "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert re.search(r"notes.jsonl(:1: no 'text' field and not a chat record|: its first record is not a chat "
                     r"record) " + hint, err), err


def test_a_record_with_no_near_miss_is_still_skipped(tmp_path):
    write_jsonl(tmp_path / "other.jsonl", [{"id": 3, "label": "x"}])
    (tmp_path / "a.txt").write_text("plain text, enough of it. " * 40)
    _, train, _ = load_corpus(DataConfig(dataset=str(tmp_path), tokenizer="byte", seq_len=32,
                                         cache_dir=str(tmp_path / "c")))
    assert len(train) > 0


@pytest.mark.parametrize("value", [0, False, 5, []])
def test_an_input_that_is_not_a_string_is_refused_even_when_falsy(value):
    from sab_byon_omni.data.chat import messages_of

    with pytest.raises(SabError, match=r"f.jsonl:3: 'input' is .*, not a string"):
        messages_of({"instruction": "i", "input": value, "output": "o"}, "instruction", "f.jsonl:3")
    assert messages_of({"instruction": "i", "input": "", "output": "o"}, "instruction", "x")[0]["content"] == "i"
    assert messages_of({"instruction": "i", "input": None, "output": "o"}, "instruction", "x")[0]["content"] == "i"
