"""Unions: several caches queried as one, each row labelled (the rounds of a distill run).

The answers of SQL over a union are compared with the reference sequences each member was written from
(tests/conftest.py), never with a query over the members themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from logitstore import TopK
from logitstore.errors import InvalidInputError
from logitstore.query import connect
from logitstore.union import Member, Union, is_union, load_union, save_union
from tests.conftest import make_sequences, write_cache
from tools.cli import main


@pytest.fixture()
def run_dir(tmp_path):
    """RUN/round-00r/cache for r = 1, 2 (different sizes and verdicts) and RUN/union.json; the references."""
    rng = np.random.default_rng(11)
    refs = {}
    for r, n in ((1, 5), (2, 8)):
        seqs = make_sequences(rng, n, vocab=60, rule=TopK(4), max_tokens=12, min_tokens=2)
        for i, s in enumerate(seqs):
            s.seq_id, s.correct = f"r{r}-{i}", bool(i % (r + 1) == 0)
        write_cache(tmp_path / f"round-{r:03d}" / "cache", seqs, vocab=60, rule=TopK(4))
        refs[r] = seqs
    save_union(tmp_path, Union(labels=["round"], members=[Member(cache=str(tmp_path / f"round-{r:03d}" / "cache"),
                                                                 labels={"round": r}) for r in (1, 2)]))
    return tmp_path, refs


def test_a_run_directory_is_queried_as_one_with_a_round_column(run_dir):
    path, refs = run_dir
    assert is_union(path) and is_union(path / "union.json")
    con = connect(path)
    got = con.sql("SELECT round, avg(correct::INT), count(*), sum(n_tokens) FROM sequences GROUP BY round "
                  "ORDER BY round").fetchall()
    want = [(r, np.mean([s.correct for s in seqs]), len(seqs), sum(s.input_ids.size for s in seqs))
            for r, seqs in sorted(refs.items())]
    assert [(r, pytest.approx(p), n, t) for r, p, n, t in want] == got
    tok = con.sql("SELECT round, seq_id, pos, label_logprob FROM tokens").fetchall()
    ref = {(r, s.seq_id, int(p)): lp for r, seqs in refs.items() for s in seqs
           for p, lp in zip(s.positions, s.label_logprob)}
    assert len(tok) == len(ref)
    for r, sid, pos, lp in tok:
        assert lp == pytest.approx(ref[(r, sid, pos)], abs=1e-6)
    members = con.sql("SELECT round, sequences, positions FROM members ORDER BY round").fetchall()
    assert members == [(r, len(s), sum(x.n for x in s)) for r, s in sorted(refs.items())]
    assert con.sql("SELECT DISTINCT round FROM manifest WHERE key = 'rule' ORDER BY 1").fetchall() == [(1,), (2,)]


def test_the_union_file_stores_paths_relative_to_its_directory(run_dir, tmp_path_factory):
    path, refs = run_dir
    d = json.loads((path / "union.json").read_text())
    assert [m["cache"] for m in d["members"]] == ["round-001/cache", "round-002/cache"]
    moved = tmp_path_factory.mktemp("moved") / "run"
    path.rename(moved)  # a run directory moves as a whole
    assert connect(moved).sql("SELECT count(*) FROM sequences").fetchall() == [(sum(len(s) for s in refs.values()),)]


def test_member_paths_relative_to_the_working_directory(run_dir, monkeypatch):
    """A union saved from relative paths (``distill -o RUN`` with RUN relative) names the same caches."""
    path, refs = run_dir
    monkeypatch.chdir(path.parent)
    save_union(path.name, Union(labels=["round"], members=[Member(cache=f"{path.name}/round-{r:03d}/cache",
                                                                  labels={"round": r}) for r in (1, 2)]))
    d = json.loads((path / "union.json").read_text())
    assert [m["cache"] for m in d["members"]] == ["round-001/cache", "round-002/cache"]
    assert connect(path.name).sql("SELECT count(*) FROM sequences").fetchall() == [(sum(map(len, refs.values())),)]


def test_verify_checks_every_member_and_single_cache_commands_name_them(run_dir, capsys):
    """`verify RUN` verifies each member (exit 1 if one is damaged); a command that takes one cache says so and
    names a member, in one line, writing nothing."""
    path, _ = run_dir
    assert main(["verify", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert all(f"round-00{r}/cache: OK" in out for r in (1, 2))
    shard = sorted((path / "round-002" / "cache" / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(path), "-q"]) == 1
    out = capsys.readouterr().out
    assert "round-001/cache: OK" in out and "round-002/cache: OK" not in out
    assert [ln for ln in out.splitlines() if "problem(s) found" in ln][0].split(":")[0].endswith("round-002/cache")
    assert main(["select", str(path), "--where", "true", "-o", str(path.parent / "s.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a union of caches" in err and "round-001" in err
    assert not (path.parent / "s.json").exists()


def test_logitstore_sql_on_a_run_directory(run_dir, capsys):
    path, refs = run_dir
    assert main(["sql", str(path), "SELECT round, count(*) AS n FROM sequences GROUP BY round ORDER BY round",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"round": r, "n": len(s)} for r, s in sorted(refs.items())]


@pytest.mark.parametrize("content,match", [
    ({"format": "logitstore-union", "version": 9, "labels": [], "members": []}, "version 9"),
    ({"format": "logitstore-union", "version": 1, "labels": ["round"], "members": [{"cache": "x"}]}, "members\\[0\\]"),
    ({"format": "logitstore-union", "version": 1, "labels": ["round"],
      "members": [{"cache": "x", "labels": {"other": 1}}]}, "members\\[0\\]"),
    ({"format": "logitstore-union", "version": 1, "labels": ["a b"], "members": []}, "list of column names"),
    ({"format": "logitstore-union", "version": 1, "labels": ["round"], "members": []}, "no member cache yet"),
])
def test_bad_union_files_are_refused_by_name(tmp_path, content, match):
    (tmp_path / "union.json").write_text(json.dumps(content))
    with pytest.raises(InvalidInputError, match=match):
        connect(tmp_path)
    assert main(["sql", str(tmp_path), "SELECT 1"]) == 2


def test_a_cache_directory_with_a_union_file_is_still_a_cache(run_dir):
    path, refs = run_dir
    cache = path / "round-001" / "cache"
    (cache / "union.json").write_text((path / "union.json").read_text())
    assert not is_union(cache)
    assert connect(cache).sql("SELECT count(*) FROM sequences").fetchall() == [(len(refs[1]),)]
    assert load_union(path).labels == ["round"]
