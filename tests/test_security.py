"""Security: nothing in a cache is executed or unpickled, and a teacher or student loads without remote code
unless the user passes ``--trust-remote-code``. (Paths in a manifest that point outside the cache are refused:
``tests/logitstore/test_verify.py::test_malformed_manifest``.)
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import logitstore
from logitstore.verify import verify
from tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("logitstore", "builders", "trainers", "tools")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
#: numpy.load is safe unless given allow_pickle (its default is False), which the keyword check catches
UNSAFE_ATTRS = {("torch", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("yaml", "load"),
                ("yaml", "unsafe_load")}


def unsafe_uses(source: str, name: str = "<source>") -> list[str]:
    """Every place in ``source`` that could execute or unpickle data: imports of pickle-like modules, builtin
    eval/exec/compile/__import__, torch.load without weights_only=True, read_pickle, yaml.load, allow_pickle, and
    trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in UNSAFE_CALLS:
                found.append(f"{where}: {f.id}(...)")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in UNSAFE_ATTRS \
                    and not _weights_only(f, node):
                found.append(f"{where}: {f.value.id}.{f.attr}(...)")
            if isinstance(f, ast.Attribute) and f.attr in ("read_pickle", "loads") and \
                    isinstance(f.value, ast.Name) and f.value.id in UNSAFE_MODULES | {"pd", "pandas"}:
                found.append(f"{where}: {f.value.id}.{f.attr}(...)")
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                    found.append(f"{where}: trust_remote_code=True")
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where}: allow_pickle=...")
    return found


def _weights_only(f: ast.Attribute, call: ast.Call) -> bool:
    """``torch.load(..., weights_only=True)``: tensors and plain containers only, refused otherwise (safe)."""
    return (f.value.id, f.attr) == ("torch", "load") and any(
        kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords)


def test_the_scanner_finds_what_it_looks_for():
    snippet = """
import pickle
from dill import loads
import torch, yaml, numpy as np
x = pickle.loads(b"")
eval("1 + 1"); exec("pass"); compile("1", "f", "eval"); __import__("os")
torch.load("w.bin"); yaml.load(s); np.load("a.npy", allow_pickle=True)
model.from_pretrained(p, trust_remote_code=True)
model.eval()  # a method of the same name is fine
torch.load("state.pt", weights_only=True)  # line 10: safe
torch.load("state.pt", weights_only=False)
"""
    found = unsafe_uses(snippet)
    for word in ("import pickle", "from dill", "pickle.loads", "eval(", "exec(", "compile(", "__import__(",
                 "torch.load", "yaml.load", "allow_pickle", "trust_remote_code=True"):
        assert any(word in f for f in found), (word, found)
    assert not any(":9:" in f or ":10:" in f for f in found)  # model.eval() is not the builtin; weights_only is safe
    assert any(":11:" in f for f in found)


def test_no_pickle_eval_or_remote_code_in_any_package():
    files = [p for pkg in SCANNED for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    found = [f for p in files for f in unsafe_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_reading_and_verifying_a_cache_never_unpickles(ranked_cache, monkeypatch, capsys):
    """At run time too: pickle's entry points are booby-trapped while a cache is opened, read, queried and
    verified (pyarrow >= 14.0.1 no longer unpickles extension types from file metadata; this would notice a
    regression, in pyarrow or here)."""
    def trap(*a, **k):
        raise AssertionError("something unpickled while reading a cache")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap)
    cache = logitstore.open(ranked_cache.path)
    assert len(list(cache)) == len(ranked_cache.refs)
    assert verify(ranked_cache.path) == []
    assert main(["sql", str(ranked_cache.path), "SELECT count(*) AS n FROM tokens", "--format", "json"]) == 0
    assert main(["info", str(ranked_cache.path)]) == 0


# ---------------------------------------------------------------- remote code


@pytest.fixture
def loads(monkeypatch):
    """Record the keyword arguments of every transformers Auto*.from_pretrained call, then stop the load."""
    import transformers

    calls = []

    def recorder(kind):
        def from_pretrained(*args, **kwargs):
            calls.append((kind, kwargs))
            raise OSError("stopped by the test after recording the call")
        return classmethod(lambda cls, *a, **k: from_pretrained(*a, **k))

    for kind in ("AutoTokenizer", "AutoModelForCausalLM", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, kind), "from_pretrained", recorder(kind))
    return calls


@pytest.mark.parametrize("flag", [False, True])
def test_teacher_loading_enables_remote_code_only_with_the_flag(tmp_path, loads, flag):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"text": "hello there"}\n')
    argv = ["build", str(teacher), str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "c"), "--top-k", "4", "-q"]
    assert main(argv + (["--trust-remote-code"] if flag else [])) == 2  # the load was stopped
    assert loads, "no from_pretrained call was made"
    assert all(kw.get("trust_remote_code") is flag for _, kw in loads), loads
    assert all("trust_remote_code" in kw for _, kw in loads)  # passed explicitly, not left to a default


@pytest.mark.parametrize("flag", [False, True])
def test_student_loading_enables_remote_code_only_with_the_flag(tmp_path, ranked_cache, loads, flag):
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    argv = ["score", str(ranked_cache.path), str(student), "-o", str(tmp_path / "s"), "-q"]
    assert main(argv + (["--trust-remote-code"] if flag else [])) == 2
    assert loads and all(kw.get("trust_remote_code") is flag for _, kw in loads), loads
