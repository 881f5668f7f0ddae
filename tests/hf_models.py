"""Tiny transformers models of each family, written locally (config -> random init ->
``save_pretrained``) with a tokenizer of that family's kind, saved by transformers' own tokenizer
class: nothing is downloaded.

``write_family(path, family)`` writes one folder; :data:`FAMILIES` names them. The tokenizers mimic
the real ones: GPT-2 / GPT-NeoX byte-level BPE, Llama 2 / TinyLlama / Mistral SentencePiece-style
BPE with byte fallback and a BOS, Llama 3 byte-level BPE with its split regex and a BOS from the
post processor, Qwen2 with its chat tokens; chat templates where those models have them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog.", "café naïve Ångström 日本語 😀 한국어",
          "def f(x):\n    return x ** 2  # note", "It's what we've done; they'll see.", "1234567 + 89 = ?"] * 30
TEXTS = ["Hello, world! 123", "café naïve Ångström Straße", "日本語のテキスト，中文。한국어", "emoji 😀👍🏽🇷🇴 ok",
         "def f(x):\n\treturn x ** 2  # note\r\n", "<|endoftext|> and <|im_start|>user<|im_end|> <s></s><unk> typed",
         "<|begin_of_text|><|eot_id|>", "", "   leading and trailing   ", " n't it 's .", "\x00\x07 \u200b\ufeff"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


def _merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _byte_level(specials: list[str], split: str | None = None, size: int = 420):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), level])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_tokenizer(kind: str, path: Path) -> None:
    """A tokenizer of ``kind`` (gpt2, neox, qwen2, llama2, llama3) saved by transformers into ``path``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    if kind == "gpt2":
        tok = transformers.GPT2Tokenizer(*_merges(_byte_level(["<|endoftext|>"])))
    elif kind == "neox":
        tok = transformers.GPTNeoXTokenizer(*_merges(_byte_level(["<|endoftext|>", "<|padding|>"])))
    elif kind == "qwen2":
        tok = transformers.Qwen2Tokenizer(*_merges(_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])),
                                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML
    elif kind == "llama2":
        sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        specials = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
        sp.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=520, special_tokens=specials, show_progress=False))
        tok = transformers.LlamaTokenizer(*_merges(sp))
        tok.add_bos_token = True  # as Llama 2's files: <s> before every text
        tok.chat_template = LLAMA2_CHAT
    else:  # llama3
        bl = _byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], split=LLAMA3_SPLIT)
        bos = bl.token_to_id("<|begin_of_text|>")
        bl.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", bos)], pair="<|begin_of_text|> $A <|begin_of_text|> $B:1")
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<|begin_of_text|>",
                                                   eos_token="<|eot_id|>")
        tok.chat_template = LLAMA3_CHAT
    tok.save_pretrained(path)


# family -> (config class, config fields, tokenizer kind); every model small but with each option on
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={
                                      "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}), "llama3"),
    "tinyllama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=1, rms_norm_eps=1e-5, tie_word_embeddings=False), "llama2"),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, sliding_window=None, rope_theta=1e6), "llama2"),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
              "qwen2"),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new"), "gpt2"),
    "pythia": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu"), "neox"),
}
CONTEXT = 64


def write_family(path: Path, family: str, seed: int = 0, sharpen: float = 1.0, tokenizer: bool = True):
    """A tiny random ``family`` model and its tokenizer saved into ``path`` (returns the
    transformers model, in eval mode). Weights are moved off their initial values (norm gains and
    biases included) so that every parameter counts; ``sharpen`` scales the matrices."""
    import transformers

    cls, fields, kind = FAMILIES[family]
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None}
    vocab = 300
    if tokenizer:
        write_tokenizer(kind, path)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        vocab = len(tok) + 6  # spare rows, as Qwen2's padded vocabulary
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    positions = {"n_positions": CONTEXT} if family == "gpt2" else {"max_position_embeddings": CONTEXT}
    config = getattr(transformers, cls)(vocab_size=vocab, **positions, **fields, **ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.02)).mul_(sharpen if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    return model
