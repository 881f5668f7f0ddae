"""The package's shape, checked: imports point one way, no module imports itself back through a
cycle, and no file or function outgrows what one screen should hold."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import sab_byon_omni

ROOT = Path(sab_byon_omni.__file__).parent
PACKAGE = "sab_byon_omni"

# (importer prefix, imported prefix, why): a module under the first may not import one under the second.
FORBIDDEN = [
    ("model", "training", "model code holds no training code"),
    ("model", "data", "the model sees ids, not files or tokenizers"),
    ("model", "interop", "the model knows nothing of other libraries' formats"),
    ("data", "model", "data never depends on the model"),
    ("data", "training", "data never depends on training"),
    ("data", "interop", "data sits below the interop layer (transformers, model sources)"),
    ("config", "", "config imports only errors"),
    ("files", "", "the bottom I/O layer imports nothing of the package but errors"),
    ("estimate", "training", "the estimate is pure arithmetic"),
    ("estimate", "model", "the estimate is arithmetic on configs"),
    ("interop", "training", "file formats know nothing of training loops"),
    ("interop", "core", "file formats sit below the facade"),
    ("core", "training", "the facade sits below training (train_3b imports it)"),
    ("evaluation", "training", "evaluation sits below training, which uses it"),
    ("loss", "training", "the loss sits below training and evaluation"),
    ("machine", "", "machine facts import nothing of the package but errors"),
]
ALLOWED_FROM_ANYWHERE = {"errors"}
LIBRARY_MAY_NOT_IMPORT = ("cli", "commands")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package-relative names of every module ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            base = node.module[len(PACKAGE) + 1:]
            for alias in node.names:  # "from sab_byon_omni.files import dcp" imports the module files.dcp
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name[len(PACKAGE) + 1:] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return {f for f in found if f}


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _under(module: str, prefix: str) -> bool:
    return prefix == "" or module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("importer, imported, why", FORBIDDEN)
def test_no_forbidden_import(importer, imported, why):
    bad = [f"{m} -> {i}" for m, deps in GRAPH.items() if _under(m, importer) for i in deps
           if _under(i, imported) and i not in ALLOWED_FROM_ANYWHERE and not _under(i, importer)]
    assert not bad, f"{why}: {bad}"


def test_no_library_module_imports_the_cli():
    bad = [f"{m} -> {i}" for m, deps in GRAPH.items() if not m.startswith(LIBRARY_MAY_NOT_IMPORT) and m != "__main__"
           for i in deps if i.startswith(LIBRARY_MAY_NOT_IMPORT)]
    assert not bad, bad


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(GRAPH.get(m, ())):
            if dep not in GRAPH:
                continue
            if state[dep] == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if state[dep] == 0:
                visit(dep)
        stack.pop()
        state[m] = 2

    for module in sorted(GRAPH):
        if state[module] == 0:
            visit(module)


def _package(module: str) -> str:
    """The package a module belongs to (``training.trainer`` -> ``training``; a top-level module is its own)."""
    return module.split(".", 1)[0]


PACKAGE_GRAPH = {p: {_package(d) for m, deps in GRAPH.items() if _package(m) == p for d in deps} - {p}
                 for p in {_package(m) for m in GRAPH}}


def test_the_packages_import_each_other_without_a_cycle():
    """Cycles between packages, which module-level checks miss (data.cache -> io.atomic and
    io.sources -> data.tokenizers was one before ``io`` was split into ``files`` and ``interop``)."""
    order: list[str] = []
    state: dict[str, int] = defaultdict(int)

    def visit(p: str, path: list[str]) -> None:
        state[p] = 1
        for dep in sorted(PACKAGE_GRAPH.get(p, ())):
            if dep in ALLOWED_FROM_ANYWHERE or dep not in PACKAGE_GRAPH:
                continue
            if state[dep] == 1:
                pytest.fail("package cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if state[dep] == 0:
                visit(dep, path + [dep])
        state[p] = 2
        order.append(p)

    for p in sorted(PACKAGE_GRAPH):
        if state[p] == 0:
            visit(p, [p])
    assert order.index("files") < order.index("data") < order.index("interop") < order.index("core")


def test_the_checks_see_real_imports():
    """The graph is built from the code (so the tests above can fail): known edges are found."""
    assert "training.build" in GRAPH["training.trainer"] and "training.checkpointer" in GRAPH["training.build"]
    assert "files.dcp" in GRAPH["training.checkpointer"]
    assert "errors" in GRAPH["config.schema"] and "config.schema" in GRAPH["config.parse"]


def _long_functions(path: Path, root: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(root)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


# config.py: one line per field of every section (the model's architecture options added 20), and
# the parsing that jsonargparse is replacing.
LONGER_FILES = {"config.py": 560}


@pytest.mark.parametrize("root", [ROOT, ROOT.parent / "benchmarks"], ids=["package", "benchmarks"])
def test_files_and_functions_stay_readable(root):
    """The package and the benchmark scripts alike: files of at most 500 lines, functions of at most 50."""
    if not root.is_dir():
        pytest.skip(f"{root} is not shipped here (an installed wheel)")
    big_files = [f"{p.relative_to(root)} ({n} lines)" for p in root.rglob("*.py")
                 if (n := len(p.read_text(encoding="utf-8").splitlines())) > LONGER_FILES.get(p.name, 500)]
    assert not big_files, big_files
    long = [f for p in root.rglob("*.py") for f in _long_functions(p, root, 50)]
    assert not long, long


# Attributes a class sets outside __init__ that its base class (outside the package) creates in its own.
INHERITED = {("MuonAdamW", "param_groups"): "torch.optim.Optimizer.__init__ creates it"}


def _self_attributes(fn: ast.AST) -> set[str]:
    """The ``self.x`` a function assigns (plain, augmented, annotated, or inside a tuple)."""
    found = set()
    for node in ast.walk(fn):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    found.add(e.attr)
    return found


def test_every_attribute_is_assigned_in_init():
    """No attribute first appears in another method (read back with ``getattr(self, ..., None)``):
    every attribute of every class is assigned in ``__init__`` or declared as a (dataclass) field."""
    late = []
    for path in ROOT.rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)):
            methods = [f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            init = set().union(*(_self_attributes(f) for f in methods if f.name == "__init__"))
            fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            late += [f"{path.relative_to(ROOT)}: {cls.name}.{attr} (first in {f.name})" for f in methods
                     if f.name != "__init__" for attr in sorted(_self_attributes(f) - init - fields)
                     if (cls.name, attr) not in INHERITED]
    assert not late, late
