"""SQL that does no more than the user asked (issue 14, item 6): ``select --where/--weight`` take one expression over
the views, ``select --query`` one SELECT, and ``logitstore sql`` reads only the cache and the paths given with
``--allow-path`` and writes no file. Each attack of the issue is run through the command line, in a working
directory where a file it would write is seen."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore.errors import InvalidInputError
from logitstore.sqlguard import check_expression
from tools.cli import main


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty working directory with a secret file next to it: what an attack would write or read."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private notes")
    return work, secret


def _tree(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*"))


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"logitstore {command}: "), err
    return err


def _reference_ids(ranked_cache, keep) -> list[str]:
    return sorted(r.seq_id for r in ranked_cache.refs if keep(r))


# ---------------------------------------------------------------- select: one expression


@pytest.mark.parametrize("flag,text,why", [
    ("--where", "1=1; COPY (SELECT 1) TO 'out.csv'", "does not parse as one expression"),
    ("--where", "true) UNION (SELECT 'x'", "more than one expression"),
    ("--where", "true ORDER BY 1", "does not parse"),
    ("--where", "seq_id IN (SELECT content FROM read_text('../secret.txt'))", "table function read_text"),
    ("--where", "true) OR (SELECT count(*) FROM read_csv('../secret.txt')) > 0 OR (true", "table function read_csv"),
    ("--weight", "1; ATTACH 'x.db'", "does not parse as one expression"),
    ("--weight", "1) FROM tokens WHERE (true", "more than one expression"),
])
def test_select_predicates_are_one_expression(ranked_cache, here, capsys, flag, text, why):
    work, _ = here
    argv = ["select", str(ranked_cache.path), "-o", "s.json"]
    argv += ["--where", text] if flag == "--where" else ["--where", "true", "--weight", text]
    assert main(argv) == 2
    err = _one_line_error(capsys, "select")
    assert flag in err and why in err, err
    assert _tree(work) == []  # no selection, no out.csv, no database


def test_select_query_is_one_select_and_reads_no_other_file(ranked_cache, here, capsys):
    work, secret = here
    cache = str(ranked_cache.path)
    assert main(["select", cache, "--query", "SELECT seq_id FROM sequences; COPY (SELECT 1) TO 'out.csv'",
                 "-o", "s.json"]) == 2
    assert "COPY statement" in _one_line_error(capsys, "select")
    assert main(["select", cache, "--query", f"SELECT content AS seq_id FROM read_text('{secret}')", "-o",
                 "s.json"]) == 2
    assert "Permission Error" in _one_line_error(capsys, "select")
    assert _tree(work) == []


def test_select_still_takes_expressions_and_subqueries_over_the_views(ranked_cache, here, capsys):
    cache = str(ranked_cache.path)
    where = "n_tokens > 10 AND seq_id IN (SELECT seq_id FROM tokens WHERE loss_mask) -- the usual kind"
    assert main(["select", cache, "--where", where, "--weight", "n_tokens / 2", "-o", "s.json"]) == 0
    sel = json.loads((here[0] / "s.json").read_text())
    want = _reference_ids(ranked_cache, lambda r: r.input_ids.size > 10 and bool(r.loss_mask.any()))
    assert sorted(sel["seq_ids"]) == want and want
    by_id = ranked_cache.by_id
    assert sel["weights"] == [by_id[s].input_ids.size / 2 for s in sel["seq_ids"]]


def test_select_query_joins_a_file_named_with_allow_path(ranked_cache, here, capsys, tmp_path):
    """A diff or score directory joined in --query (docs/recipes.md) is read when named with --allow-path."""
    d = tmp_path / "ab"
    d.mkdir()
    keep = sorted(r.seq_id for r in ranked_cache.refs)[::3]
    pq.write_table(pa.table({"seq_id": keep, "js": [0.01] * len(keep)}), d / "sequences.parquet")
    q = f"SELECT s.seq_id FROM sequences s JOIN read_parquet('{d}/sequences.parquet') x USING (seq_id) WHERE x.js < 0.1"
    assert main(["select", str(ranked_cache.path), "--query", q, "-o", "s.json"]) == 2
    assert "--allow-path" in _one_line_error(capsys, "select")
    assert main(["select", str(ranked_cache.path), "--query", q, "--allow-path", str(d), "-o", "s.json"]) == 0
    assert sorted(json.loads((here[0] / "s.json").read_text())["seq_ids"]) == keep


def test_check_expression_accepts_one_expression_only():
    assert check_expression("a < 1 AND (b OR c IN (SELECT x FROM sequences))", "--where")
    for bad in ("", "   ", "1) FROM sequences WHERE (true", "1 WHERE true", "(SELECT 1); SELECT 2",
                "1) UNION ALL (SELECT 2", "true) LIMIT (1"):
        with pytest.raises(InvalidInputError, match="--where"):
            check_expression(bad, "--where")


# ---------------------------------------------------------------- sql: reads the cache, writes nothing


@pytest.mark.parametrize("query,word", [
    ("SELECT 1; COPY (SELECT 1) TO 'out.csv'", "COPY statement"),
    ("COPY (SELECT * FROM sequences) TO '{cache}/shards/x.parquet'", "COPY statement"),
    ("ATTACH 'x.db'", "ATTACH statement"),
    ("ATTACH '{cache}/x.db'", "ATTACH statement"),
    ("EXPORT DATABASE '{cache}/export'", "EXPORT statement"),
    ("INSTALL httpfs", "LOAD statement"),
    ("PRAGMA import_database('{cache}')", "PRAGMA statement"),
    ("CALL checkpoint()", "CALL statement"),
])
def test_sql_refuses_statements_that_write_files(ranked_cache, here, capsys, tmp_path, query, word):
    work, _ = here
    cache = ranked_cache.copy_to(tmp_path / "c").path
    before = _tree(cache)
    assert main(["sql", str(cache), query.format(cache=cache)]) == 2
    assert word in _one_line_error(capsys, "sql")
    assert _tree(cache) == before and _tree(work) == []


def test_sql_reads_only_the_cache_and_the_allowed_paths(ranked_cache, here, capsys):
    work, secret = here
    cache = str(ranked_cache.path)
    q = f"SELECT content FROM read_text('{secret}')"
    assert main(["sql", cache, q]) == 2
    err = _one_line_error(capsys, "sql")
    assert "Permission Error" in err and "--allow-path" in err
    assert main(["sql", cache, "SET enable_external_access = true"]) == 2  # the configuration is locked
    assert "locked" in _one_line_error(capsys, "sql")
    assert main(["sql", cache, q, "--allow-path", str(secret), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"content": "the user's private notes"}]
    assert main(["sql", cache, q, "--allow-path", str(work / "missing")]) == 2
    assert "no such file or directory" in _one_line_error(capsys, "sql")


def test_sql_queries_and_joins_with_an_allowed_directory_still_work(ranked_cache, here, capsys, tmp_path):
    """The views, the manifest read by DuckDB itself (FORMAT.md's plain-SQL decoding starts so), variables, in-memory
    tables, and a join with a scores-like file in a directory named with --allow-path."""
    cache = str(ranked_cache.path)
    n_pos = sum(r.n for r in ranked_cache.refs)
    q = (f"SET VARIABLE c = '{cache}'; CREATE TABLE t AS SELECT count(*) AS n FROM tokens; "
         "SELECT (SELECT n FROM t) AS n, (SELECT vocab_size FROM read_json(getvariable('c') || '/manifest.json')) AS v")
    assert main(["sql", cache, q, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": n_pos, "v": ranked_cache.vocab}]
    scores = tmp_path / "scores"
    scores.mkdir()
    rows = [(r.seq_id, int(p)) for r in ranked_cache.refs for p in r.positions]
    pq.write_table(pa.table({"seq_id": [s for s, _ in rows], "pos": pa.array([p for _, p in rows], pa.int32()),
                             "x": [1.0] * len(rows)}), scores / "scores.parquet")
    join = (f"SELECT count(*) AS n, sum(s.x) AS x FROM tokens t JOIN read_parquet('{scores}/scores.parquet') s "
            "USING (seq_id, pos)")
    assert main(["sql", cache, join, "--format", "json"]) == 2
    assert "Permission Error" in _one_line_error(capsys, "sql")
    assert main(["sql", cache, join, "--allow-path", str(scores), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": n_pos, "x": float(n_pos)}]


def test_the_python_api_keeps_the_callers_own_access(ranked_cache, here):
    """``Cache.sql`` and ``query.connect`` are the caller's own DuckDB (confined only when asked)."""
    work, secret = here
    got = logitstore.open(ranked_cache.path).sql(f"SELECT content FROM read_text('{secret}')").fetchall()
    assert got == [("the user's private notes",)]
