"""A model is identified by the content of its files (issue 14, item 1): the revision against a reference hash of the
bytes, a same-size rewrite with other values changes it, and the hash cache spares re-reading unchanged files."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from logitstore import identity


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITSTORE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "tokenizer.json").write_text("{}")
    (d / "README.md").write_text("not part of the model")
    (d / "metrics.jsonl").write_text("{}\n")  # a training run's file: not part of the model either
    return d


def reference_revision(d) -> str:
    """FORMAT.md/identity: sha256 over the sorted (name, sha256 of the bytes) pairs of the model's files."""
    h = hashlib.sha256()
    for name in sorted(("config.json", "model.safetensors", "tokenizer.json")):
        h.update(name.encode() + b"\0" + hashlib.sha256((d / name).read_bytes()).hexdigest().encode() + b"\n")
    return "sha256-" + h.hexdigest()[:16]


def test_the_revision_is_the_hash_of_the_files_contents(home, model):
    got = identity.model_revision(model)
    assert got["revision"] == reference_revision(model)
    assert got["hashed"] == "sha256 of the contents of config.json, model.safetensors, tokenizer.json"


def test_a_same_size_checkpoint_with_other_values_has_another_revision(home, model):
    before = identity.model_revision(model)["revision"]
    f = model / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[1000] ^= 0xFF  # one weight byte changed; the size, name and even the mtime stay
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    after = identity.model_revision(model)["revision"]
    assert after != before and after == reference_revision(model)


def test_an_unchanged_model_is_not_read_again(home, model, monkeypatch):
    calls = []
    real = identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda p: calls.append(p.name) or real(p))
    first = identity.model_revision(model)
    assert sorted(calls) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (home / identity.HASH_CACHE_NAME).is_file()
    calls.clear()
    assert identity.model_revision(model) == first and calls == []  # every file from the hash cache
    (model / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert identity.model_revision(model) != first and calls == ["config.json"]  # only the changed file again
    (home / identity.HASH_CACHE_NAME).write_text("[" * 100_000)  # a damaged hash cache is only a cache
    calls.clear()
    assert identity.model_revision(model)["revision"] == reference_revision(model) and len(calls) == 3
