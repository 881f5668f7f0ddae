"""A GGUF file from a stranger: every malformed, hostile, truncated or unsupported one is one line
(exit 2 from the CLI) that names what is wrong, read in bounded time and memory, before any
tensor is dequantised."""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from sab_byon_omni.cli import main  # noqa: E402
from sab_byon_omni.errors import SabError  # noqa: E402
from sab_byon_omni.files.gguf_header import MAX_ITEMS, read_gguf_header  # noqa: E402
from sab_byon_omni.interop.gguf import block_sizes, read_gguf  # noqa: E402
from tests.gguf_files import gguf_string, random_model, raw_gguf, write_gguf_file  # noqa: E402
from tests.hostile import assert_one_error_line  # noqa: E402

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
ARCH = ("general.architecture", int(V.STRING), gguf_string("llama"))


def _u32(key: str, value: int) -> tuple[str, int, bytes]:
    return key, int(V.UINT32), struct.pack("<I", value)


def _array(key: str, item: int, count: int, payload: bytes = b"") -> tuple[str, int, bytes]:
    return key, int(V.ARRAY), struct.pack("<IQ", item, count) + payload


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_gguf_file(tmp_path_factory.mktemp("gguf") / "good.gguf", random_model(), "Q8_0")


# (name, the file's bytes, what the one line says)
STRUCTURE = [
    ("empty", b"", "shorter than its fixed header"),
    ("text", b"hello, this is not a model at all\n", "not a GGUF file: it starts with 'hello, t' (a text file?)"),
    ("png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a GGUF file: it is a PNG image"),
    ("version 1", raw_gguf(version=1), "GGUF version 1 is not one this reads"),
    ("big-endian", b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    ("a trillion tensors", raw_gguf(n_tensors=10**12), "1,000,000,000,000 tensors"),
    ("a header cut short", raw_gguf([ARCH])[:40], "truncated GGUF file: its header runs past the end"),
    ("an array of 2^62 bytes", raw_gguf([_array("x", int(V.UINT8), 1 << 62)]), f"more than {MAX_ITEMS:,} values"),
    ("an array of a million strings in 80 bytes", raw_gguf([_array("x", int(V.STRING), 10**6)]), "truncated"),
    ("arrays inside arrays", raw_gguf([_array("x", int(V.ARRAY), 1, struct.pack("<IQ", int(V.ARRAY), 1)
                                              + struct.pack("<IQ", int(V.ARRAY), 1) + struct.pack("<IQ", 0, 0))]),
     "nested more than 3 deep"),
    ("a string of a terabyte", raw_gguf([("x", int(V.STRING), struct.pack("<Q", 1 << 40))]), "a string of"),
    ("a key that is not UTF-8", b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2) + b"\xff\xfe" + struct.pack("<IB", 0, 0),
     "a metadata key that is not UTF-8"),
    ("a value of type 99", raw_gguf([("x", 99, b"")]), "a metadata value of unknown type 99"),
    ("a key twice", raw_gguf([ARCH, ARCH]), "appears twice"),
    ("alignment 3", raw_gguf([ARCH, _u32("general.alignment", 3)]), "general.alignment 3 is not a power of two"),
    ("five dimensions", raw_gguf([ARCH], [("t", [1, 1, 1, 1, 1], 0, 0)]), "has 5 dimensions"),
    ("a zero dimension", raw_gguf([ARCH], [("t", [0, 4], 0, 0)]), "each must be positive"),
    ("half a block", raw_gguf([ARCH], [("t", [16, 1], int(Q.Q8_0), 0)]), "a multiple of its type's block of 32"),
    ("type 200", raw_gguf([ARCH], [("t", [4], 200, 0)]), "ggml type 200"),
    ("misaligned data", raw_gguf([ARCH], [("t", [4], 0, 8)], b"\0" * 64), "not a multiple of the alignment"),
    ("data past the end", raw_gguf([ARCH], [("t", [1 << 30], 0, 0)], b"\0" * 64),
     "truncated GGUF file: tensor 't' needs bytes"),
    ("overlapping tensors", raw_gguf([ARCH], [("a", [16], 0, 0), ("b", [16], 0, 32)], b"\0" * 128), "overlap"),
    ("a tensor twice", raw_gguf([ARCH], [("a", [8], 0, 0), ("a", [8], 0, 32)], b"\0" * 128), "appears twice"),
]


@pytest.mark.parametrize("content, says", [c[1:] for c in STRUCTURE], ids=[c[0] for c in STRUCTURE])
def test_a_malformed_header_is_refused_by_name(tmp_path, content, says):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(SabError) as e:
        read_gguf_header(path, block_sizes())
    message = str(e.value)
    assert says in message and "\n" not in message and len(message) < 400, message


def test_the_gguf_packages_reader_would_not_bound_these(tmp_path):
    """Why the header is read here: the gguf package's reader accepts an array longer than the file
    (its elements past the end read as nothing), so a few bytes can claim any amount of work."""
    path = tmp_path / "short.gguf"
    key, kind, value = _array("x", int(V.UINT32), 1000)  # 1000 values in no bytes: the file ends here
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string(key) + struct.pack("<I", kind) + value)
    assert len(gguf.GGUFReader(path).fields["x"].data) == 1000  # 2^60 of them: a loop that never ends
    with pytest.raises(SabError, match="truncated"):
        read_gguf_header(path, block_sizes())


def _variant(tmp_path, name: str, **kw):
    return write_gguf_file(tmp_path / f"{name}.gguf", random_model(), **kw)


def _string(value: str) -> tuple[str, V]:
    return value, V.STRING


MODEL_CASES = [
    ("gemma2", {"arch": "gemma2"}, "GGUF architecture 'gemma2' is not supported (this reads llama, qwen2)"),
    ("sentencepiece", {"metadata": {"tokenizer.ggml.model": _string("llama")}},
     "tokenizer.ggml.model 'llama' (a SentencePiece vocabulary) is not supported"),
    ("unknown pre", {"pre": "made-up"}, "tokenizer.ggml.pre 'made-up' (the pre-tokenizer) is not supported"),
    ("a bad merge", {"metadata": {"tokenizer.ggml.merges": (["a b c"], V.ARRAY)}}, "the merge 'a b c'"),
    ("bos out of range", {"metadata": {"tokenizer.ggml.bos_token_id": (10**6, V.UINT32)}},
     "tokenizer.ggml.bos_token_id 1000000 is not a token id"),
    ("mixture of experts", {"metadata": {"llama.expert_count": (8, V.UINT32)}}, "mixture-of-experts"),
    ("rope scaling", {"metadata": {"llama.rope.scaling.type": _string("yarn")}}, "RoPE scaling"),
    ("huge layer count", {"metadata": {"llama.block_count": (10**9, V.UINT32)}}, "llama.block_count = 1000000000"),
    ("head count a string", {"metadata": {"llama.attention.head_count": _string("4")}},
     "llama.attention.head_count = '4' is not an integer (a str in the metadata)"),  # it said "out of range"
    ("epsilon a string", {"metadata": {"llama.attention.layer_norm_rms_epsilon": _string("x")}},
     "llama.attention.layer_norm_rms_epsilon = 'x' is not a number (a str in the metadata)"),
    ("IQ4_NL", {"drop": ("blk.0.ffn_up.weight",), "extra": {"blk.0.ffn_up.weight": (
        np.zeros((128, 64 // 32 * 18), "uint8"), Q.IQ4_NL)}}, "stored as IQ4_NL, which is not supported"),
    ("rope_freqs", {"extra": {"rope_freqs.weight": (np.ones(8, "float32"), Q.F32)}},
     "RoPE frequency factors"),
    ("missing layer", {"drop": ("blk.1.ffn_down.weight",)}, "no tensor blk.1.ffn_down.weight"),
    ("wrong shape", {"metadata": {"llama.feed_forward_length": (96, V.UINT32)}}, "has shape [128, 64]"),
]


@pytest.mark.parametrize("kw, says", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_an_unsupported_model_is_refused_by_name(tmp_path, kw, says):
    path = _variant(tmp_path, "m", **kw)
    with pytest.raises(SabError) as e:
        read_gguf(path)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("command", [["generate", "--prompt", "x", "--checkpoint"], ["eval", "--checkpoint"],
                                     ["export", "-o", "out.gguf", "--checkpoint"]], ids=["generate", "eval", "export"])
def test_every_command_says_one_line_and_exits_2(in_tmp, capsys, good, command):
    data = good.read_bytes()
    cases = {"cut.gguf": (data[:len(data) // 2], "truncated GGUF file"),
             "head.gguf": (data[:200], "truncated GGUF file: its header runs past the end"),
             "model.bin": (raw_gguf([("general.architecture", int(V.STRING), gguf_string("mamba"))]),
                           "GGUF architecture 'mamba' is not supported"),
             "bomb.gguf": (raw_gguf([_array("x", int(V.UINT64), 1 << 60)]), "values in all")}
    for name, (content, says) in cases.items():
        (in_tmp / name).write_bytes(content)
        assert main([*command, name]) == 2, name
        assert_one_error_line(capsys.readouterr().err, name, says)
    assert not (in_tmp / "out.gguf").exists()


def test_a_folder_of_several_gguf_files_asks_for_one(in_tmp, capsys, good):
    for name in ("a.gguf", "b.gguf"):
        (in_tmp / "repo").mkdir(exist_ok=True)
        (in_tmp / "repo" / name).write_bytes(good.read_bytes()[:100])
    assert main(["generate", "--prompt", "x", "--checkpoint", "repo"]) == 2
    assert_one_error_line(capsys.readouterr().err, "a folder of 2 GGUF files", "pass the one to use")
