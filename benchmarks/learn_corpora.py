"""The two corpora of the learning benchmark (``benchmarks/learn.py``), built offline and
deterministically from what this machine's Python installation already holds.

* ``stdlib``: docs/DATA.md's worked example, verbatim: ``$STDLIB/*.py``, the top-level modules of the
  standard library (168 files, 4.70 MB on Python 3.11.7), one document per file.
* ``prose``: English prose from the documentation shipped inside installed Python packages:
  the paragraphs of docstrings (and of ``pydoc_data.topics``, the text of the Python language
  reference that ``help()`` shows) that read as sentences, not as code, parameter lists or tables.
  Sources, in this order: ``pydoc_data.topics`` (one document per topic), then the ``.py`` files
  of the standard library's packages (``$STDLIB/*/``, without the top-level modules the stdlib
  corpus uses) and of this project's runtime dependencies that ship Python source (``numpy``,
  ``matplotlib``, ``huggingface_hub``, ``tqdm``, ``yaml``, ``torch``), one document per source file:
  its docstrings' prose paragraphs in source order. Test folders and files, ``idlelib``,
  ``lib2to3``, ``tkinter``, ``turtledemo`` and ``site-packages`` (inside the stdlib) are skipped; a
  paragraph seen before (templated docstrings repeat) is dropped, so the validation documents do
  not repeat training text; documents under 200 bytes are dropped. :func:`is_prose` is the rule.

Both are split by the package's own reader (``open_corpus``): whole documents, 10% of them
(``data.val_fraction``) chosen by a permutation seeded with ``data.data_seed`` = 1234, and tokenised
with the ``byte`` tokenizer (ids = UTF-8 bytes + 2, ``<EOS>`` after every document). The prose
documents are written once as text files (``NNNNN-<source>.txt``, so sorted order = build order)
into a folder that the package then reads like any ``--data`` folder; a rebuild that produces the
same text leaves the files (and so the token cache) untouched. The result depends on the installed
versions of those packages: the benchmark records the corpus's SHA-256, size and package versions
with every result.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.corpus import Corpus, open_corpus

PROSE_PACKAGES = ("numpy", "matplotlib", "huggingface_hub", "tqdm", "yaml", "torch")
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "pydoc_data"}
MIN_DOC_BYTES = 200
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_UNDERLINE = re.compile(r"^[-=~^*#]{3,}\s*$")
_PARAM = re.compile(r"^[\w*][\w, *\[\]]*\s:(\s|$)")  # numpydoc "x : array_like"
_NOT_PROSE_START = (">>>", "...", "$", ".. ", ":", "-", "*", "|", "+", "#", "[")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_prose(paragraph: str) -> bool:
    """A paragraph of sentences: starts with a capital, ends with . ! or ?, at least 8 words, 85% of
    them plain words; no indented line (code, parameter descriptions), no doctest, directive,
    list, table, heading underline or ``name : type`` line."""
    lines = paragraph.splitlines()
    if not lines or not lines[0][:1].isupper() or paragraph.rstrip()[-1:] not in (".", "!", "?"):
        return False
    for line in lines:
        if line[:1].isspace() or line.startswith(_NOT_PROSE_START) or _UNDERLINE.match(line) or _PARAM.match(line):
            return False
    words = paragraph.split()
    plain = sum(1 for w in words if _WORD.fullmatch(w.strip(".,;:()\"'!?")))
    return len(words) >= 8 and plain >= 0.85 * len(words)


def prose_paragraphs(text: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if is_prose(paragraph):
            yield paragraph


def docstrings(source: str) -> list[str]:
    """The module's, classes' and functions' docstrings in source order ([] if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                          ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _source_files() -> Iterator[tuple[str, Path]]:
    """(name, path) of every source file the prose corpus reads, in a fixed order."""
    lib = stdlib_dir()
    for path in sorted(lib.glob("*/**/*.py")):
        rel = path.relative_to(lib)
        if not STDLIB_SKIP & set(rel.parts) and not rel.name.startswith("test_"):
            yield f"stdlib/{rel.as_posix()}", path
    for package in PROSE_PACKAGES:
        root = Path(__import__(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent)
            if not {"test", "tests", "testing"} & set(rel.parts) and not rel.name.startswith("test_"):
                yield rel.as_posix(), path


def prose_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every prose document, in build order."""
    import pydoc_data.topics

    seen: set[str] = set()

    def fresh(paragraphs: Iterator[str]) -> str:
        kept = []
        for p in paragraphs:
            key = hashlib.sha1(p.encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                kept.append(p)
        return "\n\n".join(kept)

    for topic, text in sorted(pydoc_data.topics.topics.items()):
        yield f"pydoc_topics/{topic}", fresh(prose_paragraphs(text))
    for name, path in _source_files():
        source = path.read_text(encoding="utf-8", errors="replace")
        yield name, fresh(p for d in docstrings(source) for p in prose_paragraphs(d))


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("numpy", "matplotlib", "huggingface_hub", "tqdm", "PyYAML", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def build_prose_folder(folder: Path) -> dict:
    """Write the prose documents as text files into ``folder/docs`` (only when the text changed) and
    return its manifest: documents, bytes, SHA-256 of the whole text, package versions."""
    docs = [(name, text) for name, text in prose_documents() if len(text.encode()) >= MIN_DOC_BYTES]
    digest = hashlib.sha256()
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    manifest = {"documents": len(docs), "bytes": sum(len(t.encode()) for _, t in docs),
                "sha256": digest.hexdigest(), "versions": package_versions()}
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return manifest
    target = folder / "docs"
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.txt"):
        old.unlink()
    for i, (name, text) in enumerate(docs):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]
        (target / f"{i:05d}-{safe}.txt").write_text(text, encoding="utf-8")
    manifest_path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


@dataclass
class BenchCorpus:
    name: str
    corpus: Corpus  # the package's tokenised corpus: train/val token streams and meta
    description: dict


def load(name: str, cache: Path, seq_len: int) -> BenchCorpus:
    """The ``stdlib`` or ``prose`` corpus, tokenised with the byte tokenizer (cached under ``cache``)."""
    if name == "stdlib":
        dataset = str(stdlib_dir() / "*.py")
        description = {"source": "$STDLIB/*.py", "versions": {"python": sys.version.split()[0]}}
    elif name == "prose":
        folder = cache / "prose-src"
        description = {"source": "docstrings + pydoc topics, see benchmarks/learn_corpora.py",
                       **build_prose_folder(folder)}
        dataset = str(folder / "docs")
    else:
        raise ValueError(f"unknown corpus {name!r}")
    cfg = DataConfig(dataset=dataset, tokenizer="byte", seq_len=seq_len, cache_dir=str(cache / f"{name}-byte"))
    corpus = open_corpus(cfg)
    meta = corpus.meta
    description.update(documents=meta["documents"], val_documents=meta["val_documents"],
                       train_bytes=meta["train_bytes"], val_bytes=meta["val_bytes"])
    return BenchCorpus(name, corpus, description)
