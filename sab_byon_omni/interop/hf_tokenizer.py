"""Our tokenizers as the files ``transformers.AutoTokenizer.from_pretrained`` reads (a
``PreTrainedTokenizerFast`` from ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json``), encoding and decoding as ours do; and back.

* ``bpe``: our ``tokenizer.json`` as it is.
* ``byte``: a byte-level BPE with no merges whose vocabulary is ordered by byte value after
  ``<PAD>`` and ``<EOS>`` (byte b -> id b + 2), without the regex pre-split.
* ``char96``: a BPE with no merges over ``<PAD>`` + printable ASCII (ids 1..95) behind normalizers
  that reproduce the lossy rule of :class:`~sab_byon_omni.data.tokenizers.Char96Tokenizer`, one
  character at a time: Python's whitespace (``str.isspace``, which includes ``\\x1c``-``\\x1f``,
  unlike a regex ``\\s``) -> space; a character whose NFKD form is only combining marks (a standalone
  accent) -> ``?``; NFKD; combining marks (canonical combining class != 0, as
  ``unicodedata.combining``) removed; anything else outside printable ASCII -> ``?``. The few
  characters that Python's Unicode tables decompose differently from the ``tokenizers`` library's
  are mapped explicitly to our output.

Special tokens are never matched inside text (``split_special_tokens``: ``"<EOS>"`` typed in a
prompt is five characters, as in ours) and no BOS is added. ``decode(ids, skip_special_tokens=True)``
equals ours (ours always drops ``<PAD>`` and ``<EOS>``).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Iterable
from typing import Any

from sab_byon_omni.data.tokenizers import EOS, PAD, BPETokenizer, ByteTokenizer, Char96Tokenizer, Tokenizer
from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.untrusted import parse_json

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
PRINTABLE = [chr(c) for c in range(32, 127)]


def byte_alphabet() -> list[str]:
    """The printable character that byte-level BPE (GPT-2, ``tokenizers.pre_tokenizers.ByteLevel``)
    uses for each byte value 0..255."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def char96_vocab() -> dict[str, int]:
    """char96's ids as a vocabulary: the tokenizer's own encoding of each printable character."""
    ours = Char96Tokenizer()
    return {PAD: ours.pad_id, **{ch: ours.encode(ch)[0] for ch in PRINTABLE}}


def byte_vocab() -> dict[str, int]:
    """byte's ids as a vocabulary: byte b (id ``b + ByteTokenizer.OFFSET``) under its byte-level character."""
    ours = ByteTokenizer()
    return {PAD: ours.pad_id, EOS: ours.eos_id, **{ch: b + ours.OFFSET for b, ch in enumerate(byte_alphabet())}}


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class (Oniguruma syntax, as ``tokenizers.Regex``) matching ``chars``."""
    ranges: list[list[int]] = []
    for c in sorted({ord(ch) for ch in chars}):
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[" + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in ranges) + "]"


def _no_merge_bpe(vocab: dict[str, int], specials: list[str]) -> Any:
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


@functools.lru_cache(maxsize=1)
def char96_json() -> str:
    """The ``tokenizer.json`` of char96 (built once per process: it scans every code point)."""
    from tokenizers import Regex, decoders, normalizers

    ours = Char96Tokenizer()
    every = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]  # the rule is per character
    nfkd = list(map(functools.partial(unicodedata.normalize, "NFKD"), every))
    spaces = [ch for ch in filter(str.isspace, every) if ch != " "]
    combining = unicodedata.combining
    only_marks = [ch for ch, d in zip(every, nfkd) if combining(d[0]) and all(map(combining, d))]
    steps = [
        normalizers.Replace(Regex(_char_class(spaces)), " "),
        normalizers.Replace(Regex(_char_class(only_marks)), "?"),  # ours: nothing left after stripping -> "?"
        normalizers.NFKD(),
        normalizers.Replace(Regex(_char_class(filter(combining, every))), ""),
        normalizers.Replace(Regex("[^\\x{20}-\\x{7E}]"), "?"),
    ]
    # Where the tokenizers library's Unicode tables decompose a character unlike Python's (newer
    # Unicode versions add decompositions), map that character to our output before anything else.
    theirs = normalizers.NFKD().normalize_str("\x00".join(every)).split("\x00")
    pipeline, fixes = normalizers.Sequence(steps), {}
    for ch in (ch for ch, a, b in zip(every, nfkd, theirs) if a != b):
        want = ours.decode(ours.encode(ch))
        if pipeline.normalize_str(ch) != want:
            fixes.setdefault(want, []).append(ch)
    fixed = [normalizers.Replace(Regex(_char_class(chars)), out) for out, chars in sorted(fixes.items())]
    tok = _no_merge_bpe(char96_vocab(), [PAD])
    tok.normalizer = normalizers.Sequence(fixed + steps)
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def byte_json() -> str:
    from tokenizers import decoders, pre_tokenizers

    tok = _no_merge_bpe(byte_vocab(), [PAD, EOS])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The ``tokenizer.json`` text of one of our tokenizers."""
    name = getattr(tokenizer, "name", None)
    if name == "char96":
        return char96_json()
    if name == "byte":
        return byte_json()
    if name == "bpe":
        return tokenizer.to_spec()["json"]
    raise SabError(f"tokenizer {bounded(name)} has no transformers export; use char96, byte or bpe")


def hf_tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, str]:
    """File name -> text of the files ``AutoTokenizer.from_pretrained`` reads."""
    special = {"pad_token": PAD}
    if tokenizer.eos_id is not None:
        special["eos_token"] = EOS
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
              "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "model_max_length": max_len, "padding_side": "right"}
    if getattr(tokenizer, "chat_template", None) is not None:  # the template a chat run trained with
        config["chat_template"] = tokenizer.chat_template  # type: ignore[attr-defined]
    return {TOKENIZER_JSON: tokenizer_json(tokenizer), TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n",
            SPECIAL_TOKENS_MAP: json.dumps(special, indent=2) + "\n"}


def tokenizer_from_json(text: str, source: str = TOKENIZER_JSON) -> Tokenizer:
    """Ours from a ``tokenizer.json``: char96 or byte when its vocabulary is theirs (a BPE without
    merges), else a BPE with ``<PAD>`` = 0 and ``<EOS>`` = 1 used as it is."""
    raw = parse_json(text, source)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise SabError(f"{source}: not a tokenizers JSON file")
    if model.get("type") != "BPE":
        raise SabError(f"{source}: tokenizer model {bounded(model.get('type'))} is not one of ours "
                       "(char96, byte, or a BPE with <PAD> = 0 and <EOS> = 1)")
    if not model.get("merges"):
        if model.get("vocab") == char96_vocab():
            return Char96Tokenizer()
        if model.get("vocab") == byte_vocab():
            return ByteTokenizer()
    try:
        return BPETokenizer.from_json(text, source)
    except SabError as e:
        raise SabError(f"{source}: {e}") from None
