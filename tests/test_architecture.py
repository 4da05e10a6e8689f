"""The shape of the code: layers that only import downward, and no import cycle anywhere.

Every module of ``logitstore``, ``builders``, ``trainers`` and ``tools`` is parsed (ast) and
every import it makes, at module level or inside a function (a function-level import is still
an edge), becomes an edge to the module it names. ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when that is a module, else to ``pkg`` itself (its ``__init__``). The
rules (docs/architecture.md):

- ``logitstore`` (the store) imports neither ``builders``, ``trainers`` nor ``tools``;
- ``builders`` and ``trainers`` import the store, not each other, not ``tools``;
- ``tools`` (the command line, demo, benchmarks) is on top and may import all of them;
- there is no cycle among these modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("logitstore", "builders", "trainers", "tools")
#: what each top-level package may import of the others
ALLOWED = {
    "logitstore": set(),
    "builders": {"logitstore"},
    "trainers": {"logitstore"},
    "tools": {"logitstore", "builders", "trainers"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that ``name`` (file ``path``) imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # "import logitstore.codec as c" names a module; strip attributes
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {m: imports_of(m, f, names) for m, f in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def layering_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        top = m.split(".")[0]
        for d in sorted(deps):
            other = d.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                bad.append(f"{m} imports {d}")
    return bad


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downward():
    assert layering_violations(graph()) == []


def test_the_checks_catch_what_they_look_for():
    """The walker sees module-level and function-level imports, and both checks fire on a bad graph."""
    g = graph()
    assert "logitstore.reader" in g["logitstore.subset"]  # a module-level import
    assert "logitstore.views" in g["logitstore.reader"]  # a function-level import (Cache.sql)
    assert "tools.demo" in g["tools.cli.demo"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layering_violations({"logitstore.x": {"builders.y"}, "trainers.z": {"builders.y"},
                                "builders.y": {"logitstore.x"}}) == ["logitstore.x imports builders.y",
                                                                    "trainers.z imports builders.y"]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_module_opens_with_a_docstring(pkg):
    missing = [str(f.relative_to(ROOT)) for f in sorted((ROOT / pkg).rglob("*.py"))
               if not ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))]
    assert missing == []
