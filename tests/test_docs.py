"""The guides' code blocks run, the guides are where the original guide links them, and every CLI
command explains itself (help on each option, an example in the epilog)."""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sab_byon_omni import cli
from sab_byon_omni.commands.common import spellings
from sab_byon_omni.config import RENAMED, SECTIONS

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "TRAINING.md", ROOT / "COLAB_GUIDE.md"]
SKIP = "<!-- skip-test -->"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(path: Path) -> list[tuple[str, str, int, bool]]:
    """(language, code, line, skipped) of every fenced block, in order."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == SKIP
        out.append((m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 1, skipped))
    return out


def test_the_parser_finds_blocks_and_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("a\n```python\nx = 1\n```\n<!-- skip-test -->\n```bash\nexit 1\n```\n```text\nnot code\n```\n")
    found = [(lang, skip) for lang, _, _, skip in code_blocks(doc)]
    assert found == [("python", False), ("bash", True), ("text", False)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_code_block_runs(doc, tmp_path, monkeypatch):
    """Python blocks share one namespace (like a reader's session); shell blocks run in bash; all
    in document order, in an empty directory with a copy of configs/."""
    assert doc.is_file(), f"{doc} is missing"
    blocks = code_blocks(doc)
    runnable = [b for b in blocks if b[0] in ("python", "py", "bash", "sh", "shell") and not b[3]]
    skipped = [b for b in blocks if b[0] in ("python", "py", "bash", "sh", "shell") and b[3]]
    assert len(skipped) <= 3, "skip only the few genuinely long-running or networked blocks"
    for lang, code, line, _ in skipped:  # not run, but at least valid
        if lang in ("python", "py"):
            compile(code, f"{doc.name}:{line}", "exec")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    namespace: dict = {"__name__": "__docs__"}
    for lang, code, line, _ in runnable:
        where = f"{doc.name}:{line}"
        if lang in ("python", "py"):
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as e:
                pytest.fail(f"{where}: {type(e).__name__}: {e}\n{code}")
        else:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{where}: exit {r.returncode}\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def test_guides_are_where_the_original_guide_points():
    # The original TRAINING.md links COLAB_GUIDE.md relatively and names the notebook's path.
    assert (ROOT / "COLAB_GUIDE.md").is_file()
    assert (ROOT / "colab" / "SAB_BYON_OMNI_v2.ipynb").is_file()
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_available_command_has_help_and_an_example():
    commands = _commands()
    assert {"train", "generate", "plot"} <= set(commands) <= set(cli.COMMANDS)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, p in commands.items():
        assert summaries.get(name), f"'{name}' has no one-line help in 'sab-omni --help'"
        assert p.description, f"'{name}' has no description"
        assert p.epilog and "example" in p.epilog.lower() and f"sab-omni {name}" in p.epilog, \
            f"'{name}' --help has no example"
        old = {*spellings(*(f"--{o}" for o in RENAMED), *(f"--{s}.{o}" for o in RENAMED for s in SECTIONS)), "--out"}
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or set(action.option_strings) <= old:
                continue  # the hidden earlier spellings of renamed keys and of --output
            assert action.help and action.help != argparse.SUPPRESS, \
                f"'{name}' option {action.option_strings or action.dest} has no help text"


def test_help_renders_for_every_command(capsys):
    for name in _commands():
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: sab-omni " + name in out and "example" in out.lower()


def test_preset_table_states_the_true_parameter_counts():
    import torch

    from sab_byon_omni.config import PRESETS, ModelConfig
    from sab_byon_omni.model.transformer import CausalTransformer

    rows = re.findall(r"^\| `(\w+)` \|.*\| ([\d,]+) \| ([\d,]+) \|$", (ROOT / "docs" / "TRAINING.md").read_text(), re.M)
    assert {r[0] for r in rows} == set(PRESETS)
    with torch.device("meta"):
        for preset, char96, vocab50k in rows:
            for vocab, stated in ((96, char96), (50_000, vocab50k)):
                real = CausalTransformer(ModelConfig.from_name(preset, vocab_size=vocab)).num_parameters()
                assert int(stated.replace(",", "")) == real, (preset, vocab, stated, real)


def test_reliability_names_only_tests_that_exist():
    """docs/RELIABILITY.md says every row is a test: each ``file.py::name`` it cites is defined."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"(test_\w+\.py)::(test_\w+)", text))
    assert len(cited) >= 30
    missing = [f"{f}::{n}" for f, n in sorted(cited)
               if not re.search(rf"^def {n}\b|^{n} = ", (ROOT / "tests" / f).read_text(encoding="utf-8"), re.M)]
    assert not missing, missing
