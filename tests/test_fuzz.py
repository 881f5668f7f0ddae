"""Property-based fuzzing (hypothesis) of every door user input comes through: config mappings,
YAML files, command lines, tokenizer text and data files. Each input must end in its documented
handling or a SabError (exit 2 at the CLI): never another exception, never a changed user file."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sab_byon_omni.cli import build_parser, main
from sab_byon_omni.config import FIELD_SECTION, SECTIONS, RunConfig, build_config, load_config
from sab_byon_omni.data.tokenizers import BPETokenizer, ByteTokenizer, Char96Tokenizer
from sab_byon_omni.errors import SabError
from sab_byon_omni.training.trainer import TrainResult

# Modest by default (the whole file runs in well under a minute); SAB_FUZZ_EXAMPLES=2000 digs deeper.
N = int(os.environ.get("SAB_FUZZ_EXAMPLES", "60"))
_common = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FAST = settings(max_examples=N, **_common)
SLOW = settings(max_examples=max(N // 3, 10), **_common)

# Values a user might plausibly (or implausibly) write for any field.
TRICKY = ["auto", "cpu", "cuda:7", "tiny", "3b", "cosine", "none", "null", "", "1e-3", "3", "3.0", "-1", "0",
          "true", "no", "nan", "inf", "-inf", "1e400", "0x10", "1_000", "~", "synthetic", "bpe", "é", "\x00"]
values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(TRICKY),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
field_names = st.one_of(st.sampled_from(sorted(FIELD_SECTION)), st.text(max_size=12))
flat = st.dictionaries(field_names, values, max_size=6)
sectioned = st.dictionaries(st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=6)),
                            st.one_of(values, st.dictionaries(field_names, values, max_size=5)), max_size=4)
any_mapping = st.one_of(flat, sectioned, st.dictionaries(st.one_of(field_names, st.sampled_from(sorted(SECTIONS))),
                                                         st.one_of(values, flat), max_size=5))

INPUTS = {"config": 0, "yaml": 0, "cli": 0, "tokenizer": 0, "data": 0}  # examples run, for the report


def _check_config(cfg: RunConfig) -> None:
    """An accepted config is well-typed and survives its own round trip."""
    for section, cls in SECTIONS.items():
        for name, value in vars(getattr(cfg, section)).items():
            assert not isinstance(value, (list, dict)), (section, name, value)
    assert build_config(cfg.to_dict()) == cfg


@FAST
@given(any_mapping)
def test_build_config_accepts_or_names_the_problem(raw):
    INPUTS["config"] += 1
    try:
        cfg = build_config(raw, source="fuzz")
    except SabError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_config(cfg)


@FAST
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 any_mapping.map(lambda m: yaml.safe_dump(m, allow_unicode=True)),
                 st.sampled_from(["a: [1, 2", "model: {hidden: }", "!!python/object/apply:os.system ['true']",
                                  "train:\n  epochs: 3\n epochs: 4", "- 1\n- 2", "&a [*a]", "%YAML 9.9\n---\n1",
                                  "epochs: !!binary aGVsbG8=", "? [a, b]\n: c", "train: {resume: auto, epochs: 1e3}"])))
def test_yaml_files_load_or_name_the_file(text):
    INPUTS["yaml"] += 1
    d = Path(tempfile.mkdtemp())
    try:
        path = d / "config.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        before = path.read_bytes()
        try:
            _check_config(load_config(path))
        except SabError as e:
            assert "\n" not in str(e)
        assert path.read_bytes() == before
    finally:
        shutil.rmtree(d)


@FAST
@given(st.binary(max_size=200))
def test_binary_yaml_files(data):
    INPUTS["yaml"] += 1
    d = Path(tempfile.mkdtemp())
    try:
        path = d / "config.yaml"
        path.write_bytes(data)
        try:
            load_config(path)
        except SabError as e:  # one line that names the file or the field at fault
            msg = str(e)
            assert "\n" not in msg and len(msg) < 600, msg[:300]
            assert str(path) in msg or any(f"{s}." in msg for s in ("model", "data", "train")) \
                or "unknown key" in msg or "must be" in msg, msg
    finally:
        shutil.rmtree(d)


# --------------------------------------------------------------------------------------- CLI
def _cli_vocabulary() -> tuple[list[str], list[str]]:
    parser = build_parser()
    commands, flags = [], ["--help", "-h", "--version", "-q", "--quiet", "--nonexistent"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name == "bench":  # runs real benchmarks by design; its parsing is the same code
                    continue
                commands.append(name)
                for a in sub._actions:
                    flags.extend(s for s in a.option_strings if s != "--force")
    return commands, sorted(set(flags))


COMMANDS, FLAGS = _cli_vocabulary()
ARG_VALUES = TRICKY + ["precious.txt", "ck", "missing.pt", "out.safetensors", "-5", "9999999999", "char96",
                       "fp16", "bf16", "cosine", "--", "-", "=", "--epochs=2"]


@pytest.fixture
def sandbox(in_tmp, monkeypatch):
    """The CLI runs for real, except that training stops right after its config is validated."""
    import sab_byon_omni.training.launch as launch

    def no_training(cfg, **kw):
        assert isinstance(cfg, RunConfig)
        return None, TrainResult()

    monkeypatch.setattr(launch, "run_training", no_training)
    Path("precious.txt").write_text("the user's file\n")
    return in_tmp


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


@FAST
@given(st.one_of(st.sampled_from(COMMANDS), st.text(max_size=8)),
       st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(ARG_VALUES), st.text(max_size=10)), max_size=8))
def test_any_command_line_ends_in_0_or_one_error_line(sandbox, capsys, command, rest):
    INPUTS["cli"] += 1
    before = _snapshot(sandbox)["precious.txt"]
    try:
        rc = main([command, *rest])
    except SystemExit as e:  # --help and --version print and exit 0, as argparse does
        assert e.code == 0 and {"--help", "-h", "--version"} & {command, *rest}
        rc = 0
    assert rc in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 2:
        assert [line for line in err.splitlines() if line.startswith("error: ")], err
    assert _snapshot(sandbox)["precious.txt"] == before


@FAST
@given(st.dictionaries(st.sampled_from(sorted(FIELD_SECTION)), st.one_of(st.sampled_from(ARG_VALUES),
                                                                          st.text(max_size=6)), max_size=5))
def test_train_flags_validate_or_name_the_field(sandbox, capsys, overrides):
    """Every config field as a CLI flag with hostile values."""
    INPUTS["cli"] += 1
    argv = ["train"]
    for k, v in overrides.items():
        argv.append(f"--{FIELD_SECTION[k]}.{k}={v}")
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 2:
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ")


# -------------------------------------------------------------------------------- tokenizers
# any code point, lone surrogates included (they reach us from undecodable bytes in argv)
any_text = st.lists(st.integers(0, 0x10FFFF).map(chr), max_size=60).map("".join)


@FAST
@given(any_text)
def test_char96_maps_any_text_onto_its_96_ids(text):
    INPUTS["tokenizer"] += 1
    tok = Char96Tokenizer()
    ids = tok.encode(text)
    assert all(1 <= i <= 95 for i in ids)
    decoded = tok.decode(ids)
    assert decoded == tok.normalize(text)  # documented: lossy by a fixed rule
    assert tok.normalize(decoded) == decoded  # ...that is idempotent
    if text.isascii() and text.isprintable():
        assert decoded == text  # and exact on printable ASCII


@FAST
@given(any_text)
def test_byte_tokenizer_is_lossless_for_valid_unicode(text):
    INPUTS["tokenizer"] += 1
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(2 <= i < tok.vocab_size for i in ids)
    decoded = tok.decode(ids)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: documented to come back as U+FFFD
        assert "\ufffd" in decoded
    else:
        assert decoded == text


@FAST
@given(st.lists(st.integers(0, 95), max_size=50), st.lists(st.integers(0, 257), max_size=50))
def test_decoding_any_in_vocabulary_ids_never_fails(char_ids, byte_ids):
    INPUTS["tokenizer"] += 1
    assert isinstance(Char96Tokenizer().decode(char_ids), str)
    assert isinstance(ByteTokenizer().decode(byte_ids), str)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(["Consciousness is awareness.", "def f(x): return x * 2", "héllo wörld ✓ 😀"],
                              vocab_size=300)


@FAST
@given(any_text)
def test_bpe_round_trips_valid_unicode_and_replaces_lone_surrogates(bpe, text):
    INPUTS["tokenizer"] += 1
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    decoded = bpe.decode(ids)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        assert "\ufffd" in decoded
    else:
        assert decoded == text


# -------------------------------------------------------------------------------- data files
def _data_cfg(path: Path, cache: Path, tokenizer: str):
    from sab_byon_omni.config import DataConfig

    return DataConfig(dataset=str(path), seq_len=16, tokenizer=tokenizer, cache_dir=str(cache), bpe_vocab_size=300)


file_contents = st.one_of(
    st.just(b""), st.binary(max_size=3000),
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=40).map(lambda t: (t * 500).encode("utf-8")),  # long lines
    st.lists(st.text(max_size=30), max_size=30).map(lambda ls: "\n".join(ls).encode("utf-8")),
    st.binary(max_size=50).map(lambda b: b"text " * 100 + b"\x00" + b),  # NUL: looks binary
)
suffixes = st.sampled_from([".txt", ".md", ".py", ".json", ".jsonl", ".csv", ".html", ".bin", ""])


@SLOW
@given(st.lists(st.tuples(file_contents, suffixes), min_size=1, max_size=3), st.sampled_from(["char96", "byte", "bpe"]))
def test_data_files_load_or_name_the_problem(files, tokenizer):
    from sab_byon_omni.data.factory import load_datasets

    INPUTS["data"] += 1
    d = Path(tempfile.mkdtemp())
    try:
        data = d / "data"
        data.mkdir()
        for i, (content, suffix) in enumerate(files):
            (data / f"f{i}{suffix}").write_bytes(content)
        before = _snapshot(data)
        try:
            tok, train, val = load_datasets(_data_cfg(data, d / "cache", tokenizer))
        except SabError as e:
            assert str(e) and "\n" not in str(e)
        else:
            assert len(train) >= 1 and len(val) >= 1
            for ds in (train, val):
                for i in range(min(len(ds), 3)):
                    sample = ds[i]
                    assert 1 <= len(sample) <= 16 and int(sample.max()) < tok.vocab_size
        assert _snapshot(data) == before  # the user's files are never changed
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("tokenizer", ["char96", "byte"])
def test_one_huge_line_without_newline(tmp_path, tokenizer):
    """A 3 MiB single line (larger than the reader's chunk) is read, not held whole or refused."""
    from sab_byon_omni.data.factory import load_datasets

    f = tmp_path / "one_line.txt"
    f.write_bytes(b"abc def ghi " * (3 * 2**20 // 12))
    tok, train, val = load_datasets(_data_cfg(f, tmp_path / "cache", tokenizer))
    assert len(train) > 1000 and len(val) >= 1


# ------------------------------------------------------------- algorithmic-complexity inputs
# Inputs shaped to make a reader do more than linear work: constructs left open by the hundred
# thousand, links that loop, columnar files whose declared sizes lie. Each example must end in a
# result or a SabError/skip; a hang is caught by an alarm (60 s, far past the time it needs) and a
# generous deadline, so these tests never measure a speed.
BOUNDED = settings(max_examples=max(N // 4, 8), deadline=30_000, database=None,
                   phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a failing example is reported as found:
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # each is slow


@contextlib.contextmanager
def hang_guard(seconds: int = 60):
    """SIGALRM after ``seconds``: a hang fails the example instead of stalling the run."""
    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


HTML_UNITS = ["<a", "<a ", "<!--", "-->", "<![", "<![CDATA[", "]]>", '<a b="', "<a b='", '="', "</", "</a", "<?",
              "<!", "<!DOCTYPE", "<script>", "</script", "<style>", "<svg>", "<svg/>", "<p>", "<br/>", "<div ", "<a =",
              ">", "<", '"', "'", "&", "&#", "&#x", "&amp", "x", " ", "\n", "é"]


@BOUNDED
@given(st.lists(st.tuples(st.lists(st.sampled_from(HTML_UNITS), min_size=1, max_size=3).map("".join),
                          st.integers(1, 100_000)), min_size=1, max_size=3),
       st.text(max_size=40))
def test_html_with_constructs_left_open_is_read_in_bounded_work(pieces, text):
    INPUTS["data"] += 1
    from sab_byon_omni.data import readers

    html = text + "".join(unit * min(n, 300_000 // len(unit)) for unit, n in pieces) + text
    d = Path(tempfile.mkdtemp())
    try:
        (d / "page.html").write_text(html, encoding="utf-8", errors="surrogatepass")
        with hang_guard():
            visible = readers.html_visible_text(html)
            try:
                docs = list(readers.read_documents(d / "page.html"))
            except readers.SkipFile as e:  # a NUL among the first bytes: a binary file
                assert str(e) == "binary" and "\x00" in html, e
                docs = [visible] if visible else []
        assert isinstance(visible, str) and len(visible) <= len(html)
        assert docs == ([visible] if visible else []) or "\ufffd" in "".join(docs)  # lone surrogates replaced
    finally:
        shutil.rmtree(d)


# a chain of folders root/n/n/...; files at some levels; links at some levels to another level's
# folder (one above: a loop; one below: a second path to it)
folder_trees = st.fixed_dictionaries({
    "depth": st.integers(1, 40),
    "files": st.lists(st.integers(0, 40), min_size=1, max_size=5),
    "links": st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=4),
    "hidden": st.booleans(),
})


@BOUNDED
@given(folder_trees)
def test_nested_folders_and_link_loops_are_searched_in_bounded_work(tree):
    INPUTS["data"] += 1
    from sab_byon_omni.data.readers import find_files

    d = Path(tempfile.mkdtemp())
    try:
        depth = tree["depth"]
        level = [d / "root" / Path(*["n"] * k) if k else d / "root" for k in range(depth + 1)]
        level[-1].mkdir(parents=True)
        want = set()
        for k in tree["files"]:
            f = level[k % (depth + 1)] / f"f{k}.txt"
            f.write_text(f"file at level {k}\n")
            want.add(f.resolve())
        if tree["hidden"]:
            (level[-1] / ".hidden").mkdir(exist_ok=True)
            (level[-1] / ".hidden" / "secret.txt").write_text("never read\n")
        for i, (a, b) in enumerate(tree["links"]):
            at, to = level[a % (depth + 1)], level[b % (depth + 1)]
            (at / f"link{i}").symlink_to(os.path.relpath(to, at), target_is_directory=True)
        for spec in ("root", "root/**", "root/**/*.txt", "root/*"):
            with hang_guard():
                try:
                    found = find_files(str(d / spec))
                except SabError as e:  # root/* on a tree whose only file is deeper: matches are folders
                    assert "\n" not in str(e)
                    continue
            assert found == sorted(set(found)) and set(found) <= want, spec
            if spec != "root/*":
                assert set(found) == want, (spec, tree)
    finally:
        shutil.rmtree(d)


COLUMNAR_CHILD = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from sab_byon_omni.data import readers as R
from sab_byon_omni.errors import SabError
out = []
for name in sys.argv[1:]:
    n = 0
    try:
        for doc in R.read_documents(Path(name)):
            n += 1
        out.append(["read", n])
    except R.SkipFile as e:
        out.append(["skipped", str(e)])
    except SabError as e:
        out.append(["error", str(e)])
print(json.dumps(out))
"""


def _columnar_files() -> dict[str, bytes]:
    import io

    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"document {i} " * (i % 7 + 1) for i in range(60)], "id": list(range(60))})
    files = {}
    for name, options in (("plain", dict(use_dictionary=False)), ("dict", dict(compression="zstd"))):
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=25, **options)
        files[f"{name}.parquet"] = buf.getvalue()
    for name, compression in (("stream.arrow", None), ("zstd.arrow", "zstd")):
        buf = io.BytesIO()
        with pa.ipc.new_stream(buf, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
            for batch in table.to_batches(max_chunksize=20):
                w.write_batch(batch)
        files[name] = buf.getvalue()
    return files


def _dictionary_bomb(value_len: int, rows: int) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["y" * value_len]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": text}), buf, compression="zstd", dictionary_pagesize_limit=1 << 30,
                   store_schema=False, row_group_size=max(rows, 1))
    return buf.getvalue()


columnar_changes = st.lists(st.one_of(
    st.tuples(st.sampled_from(["plain.parquet", "dict.parquet", "stream.arrow", "zstd.arrow"]),
              st.sampled_from(["footer", "anywhere", "truncate"]), st.integers(0, 2**31),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("bomb.parquet"), st.integers(1, 4_000_000), st.integers(1, 3000), st.just(b"")),
), min_size=1, max_size=6)


@settings(max_examples=max(N // 10, 4), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(columnar_changes)
def test_columnar_files_whose_sizes_lie_are_read_or_skipped_in_bounded_memory(changes):
    """Footers and pages overwritten where their sizes are kept, files cut short, dictionary bombs
    of any size: read in one child capped at 2 GiB of address space (a time limit catches a hang)."""
    INPUTS["data"] += 1
    base = _columnar_files()
    d = Path(tempfile.mkdtemp())
    try:
        paths = []
        for i, (name, how, at, patch) in enumerate(changes):
            if name == "bomb.parquet":
                data = _dictionary_bomb(how, at)
            else:
                data = bytearray(base[name])
                footer = int.from_bytes(data[-8:-4], "little") if name.endswith(".parquet") else len(data) - 8
                lo = max(len(data) - 8 - footer, 0) if how == "footer" else 0
                pos = lo + at % max(len(data) - lo, 1)
                data = data[:pos] if how == "truncate" else data[:pos] + patch + data[pos + len(patch):]
            paths.append(d / f"{i}-{name}")
            paths[-1].write_bytes(bytes(data))
        out = subprocess.run([sys.executable, "-c", COLUMNAR_CHILD, *map(str, paths)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        for (kind, detail), change in zip(json.loads(out.stdout), changes):
            assert kind in ("read", "skipped", "error") and "\n" not in str(detail), (kind, detail, change)
            if change[0] == "bomb.parquet" and change[1] * change[2] > 1000 * (2 << 20):
                assert kind == "skipped", (detail, change)  # gigabytes of text from a small file
    finally:
        shutil.rmtree(d)


def test_report_counts():
    """Runs last in this file: how many fuzzed inputs each property saw (pytest -s shows them)."""
    print(f"\nfuzzed inputs: {INPUTS} (total {sum(INPUTS.values())})")
    assert all(v >= 0 for v in INPUTS.values())
