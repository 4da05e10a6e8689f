"""Never lose or mix a user's data (issue 14): each class through the real command line, with the tiny teacher.

- a resume with the teacher's weights replaced at the same path by a same-size checkpoint of other values;
- ``build`` into a directory that holds a user's files, a file, another tool's ``manifest.json``; a foreign file
  inside a cache of ours;
- ``select --force`` onto anything but a selection file;
- a record longer than the teacher's context length.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import logitstore
from tests.conftest import read_manifest
from tools.cli import main

WORDS = "teacher student cache token logit entropy shard manifest parquet query".split()


def _data(path, n: int = 40, long: int | None = None):
    rng = np.random.default_rng(3)
    lines = [{"text": " ".join(rng.choice(WORDS, int(rng.integers(5, 20))))} for _ in range(n)]
    if long:
        lines.append({"text": " ".join(WORDS[i % len(WORDS)] for i in range(long))})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _tree(path):
    return sorted((p.relative_to(path).as_posix(), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def _err_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("logitstore ")]
    assert len(lines) == 1 and lines[0].startswith(f"logitstore {command}: ") and "Traceback" not in err, err
    return lines[0]


def _build(teacher, data, out, *extra) -> int:
    return main(["build", str(teacher), str(data), "--top-k", "8", "-o", str(out), "-q", "--shard-mb", "0.005",
                 "--row-group-positions", "60",
                 *extra])


# ---------------------------------------------------------------- item 1: a resume never mixes two teachers


def _replace_weights_same_size(model_dir):
    """The same file name and size, other values: every floating tensor negated (what the issue's probe did with
    another checkpoint of the same shapes)."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    size = f.stat().st_size
    tensors = load_file(f)
    save_file({k: -v if v.is_floating_point() else v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    assert f.stat().st_size == size


def test_a_resume_with_the_teachers_weights_replaced_is_refused(tiny_teacher, tmp_path, capsys, monkeypatch):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    data, cache = _data(tmp_path / "data.jsonl"), tmp_path / "cache"
    real_add, added = logitstore.CacheWriter.add, []

    def crash_after_25(self, rec):  # the build dies part way, with shards committed
        if len(added) == 25:
            raise RuntimeError("killed")
        added.append(1)
        return real_add(self, rec)

    monkeypatch.setattr(logitstore.CacheWriter, "add", crash_after_25)
    with pytest.raises(RuntimeError, match="killed"):
        _build(teacher, data, cache)
    monkeypatch.setattr(logitstore.CacheWriter, "add", real_add)
    before = read_manifest(cache)
    assert before["shards"] and not before["complete"]
    old_revision = before["teacher"]["revision"]
    _replace_weights_same_size(teacher)
    assert _build(teacher, data, cache, "--resume") == 2
    err = _err_line(capsys, "build")
    assert "teacher revision" in err and old_revision in err and "mix two teachers" in err
    assert read_manifest(cache) == before  # nothing of the other teacher was written
    # with the teacher it was started with, the same resume completes it
    shutil.copy2(tiny_teacher / "model.safetensors", teacher / "model.safetensors")
    assert _build(teacher, data, cache, "--resume") == 0
    done = read_manifest(cache)
    assert done["complete"] and done["teacher"]["revision"] == old_revision and done["totals"]["sequences"] == 40


# ---------------------------------------------------------------- item 2: build never deletes a user's files


def test_build_refuses_a_directory_of_a_users_files(tiny_teacher, tmp_path, capsys):
    data = _data(tmp_path / "data.jsonl", 4)
    d = tmp_path / "d"
    (d / "shards").mkdir(parents=True)
    (d / "shards" / "my_results.parquet").write_bytes(b"the user's results")
    before = _tree(d)
    for extra in ((), ("--resume",)):
        assert _build(tiny_teacher, data, d, *extra) == 2
        err = _err_line(capsys, "build")
        assert "not a logitstore cache" in err and "shards" in err
        assert _tree(d) == before
    other = tmp_path / "webapp"  # another tool's manifest.json
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"name": "my app", "icons": []}))
    assert _build(tiny_teacher, data, other, "--resume") == 2
    assert "not a logitstore manifest" in _err_line(capsys, "build")
    assert json.loads((other / "manifest.json").read_text()) == {"name": "my app", "icons": []}
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert _build(tiny_teacher, data, f) == 2
    assert "is a file, not a directory" in _err_line(capsys, "build")
    assert f.read_text() == "keep me"


def test_a_foreign_file_in_a_cache_survives_a_resume_and_verify_names_it(tiny_teacher, tmp_path, capsys):
    data, cache = _data(tmp_path / "data.jsonl", 12), tmp_path / "cache"
    assert _build(tiny_teacher, data, cache) == 0
    foreign = cache / "shards" / "notes.txt"
    foreign.write_text("the user's notes")
    ours = cache / "shards" / ".shard-000099.parquet.tmp"  # an interrupted write of ours: deleted on resume
    ours.write_bytes(b"partial")
    assert _build(tiny_teacher, data, cache, "--resume") == 0
    assert foreign.read_text() == "the user's notes" and not ours.exists()
    capsys.readouterr()
    assert main(["verify", "-q", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "FAIL shards/notes.txt: stray file, not listed in the manifest" in out and "1 problem(s)" in out


# ---------------------------------------------------------------- item 4: select --force replaces only a selection


def test_select_force_replaces_only_a_selection_file(ranked_cache, tmp_path, capsys):
    c = ranked_cache.copy_to(tmp_path / "c").path
    before = _tree(c)
    elsewhere = tmp_path / "data.jsonl"
    elsewhere.write_text('{"text": "mine"}\n')
    targets = [c / "manifest.json", c / "shards" / "shard-000000.parquet", c / "id_map.parquet", c, elsewhere]
    for target in targets:
        assert main(["select", str(c), "--where", "true", "--force", "-o", str(target)]) == 2, target
        err = _err_line(capsys, "select")
        assert "replaces only a selection file" in err, err
    assert _tree(c) == before and elsewhere.read_text() == '{"text": "mine"}\n'
    sel = tmp_path / "s.json"
    assert main(["select", str(c), "--where", "n_tokens > 30", "-o", str(sel)]) == 0
    assert main(["select", str(c), "--where", "n_tokens > 10", "-o", str(sel)]) == 2  # without --force
    assert main(["select", str(c), "--where", "n_tokens > 10", "--force", "-o", str(sel)]) == 0
    want = sorted(r.seq_id for r in ranked_cache.refs if r.input_ids.size > 10)
    assert sorted(json.loads(sel.read_text())["seq_ids"]) == want


# ---------------------------------------------------------------- item 7: the teacher's context length


def test_the_teachers_context_length_limits_every_sequence(tiny_teacher, embedded_tokenizer, tmp_path, capsys):
    """The tiny teacher has 512 positions; a record of 800 tokens is cut to 512 (or skipped), and the manifest and
    the summary say which limit applied."""
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(800))
    want = embedded_tokenizer(long_text)["input_ids"]
    assert len(want) > 512
    data = _data(tmp_path / "data.jsonl", 3, long=800)
    capsys.readouterr()
    assert _build(tiny_teacher, data, tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "length limit: 512 tokens, the teacher's context length (no --max-length given)" in out
    assert "truncated 1" in out
    lim = read_manifest(tmp_path / "a")["build"]["length_limit"]
    assert lim == {"max_length": None, "teacher_max_positions": 512, "applied": 512, "by": "teacher",
                   "on_long": "truncate"}
    got = {s.record: s.input_ids for s in logitstore.open(tmp_path / "a")}
    np.testing.assert_array_equal(got[3], np.asarray(want[:512]))
    assert max(len(v) for v in got.values()) == 512
    assert _build(tiny_teacher, data, tmp_path / "b", "--max-length", "1000", "--on-long", "skip") == 0
    assert "length limit: 512 tokens, the teacher's context length (below --max-length 1000)" in \
        capsys.readouterr().out
    m = read_manifest(tmp_path / "b")
    assert m["build"]["skipped"]["counts"] == {"too_long": 1} and m["totals"]["sequences"] == 3
    assert _build(tiny_teacher, data, tmp_path / "c", "--max-length", "100") == 0
    assert "length limit" not in capsys.readouterr().out
    assert read_manifest(tmp_path / "c")["build"]["length_limit"]["by"] == "--max-length"
    assert max(len(s.input_ids) for s in logitstore.open(tmp_path / "c")) == 100
