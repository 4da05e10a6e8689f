"""Selections: select -> read gives exactly those sequences (and weights); wrong caches refused; materialize."""

import json
import shutil

import numpy as np
import pytest

import logitstore
from logitstore.query import connect
from logitstore.selection import SelectionMismatchError
from logitstore.verify import verify
from tests.conftest import make_sequences, write_cache
from tools.cli import main


def reference(cache_path):
    return {s.seq_id: s for s in logitstore.open(cache_path)}


def test_select_then_read_gives_exactly_the_predicate_and_weights(ranked_cache, tmp_path):
    ref = reference(ranked_cache.path)
    sel = tmp_path / "sel.json"
    cut = float(np.median([s.mean_entropy for s in ref.values() if s.mean_entropy is not None]))
    assert main(["select", str(ranked_cache.path), "--where", f"mean_entropy < {cut!r} AND n_positions > 3",
                 "--weight", "1.0 / (1 + teacher_nll)", "-o", str(sel)]) == 0
    want = {k for k, s in ref.items() if s.mean_entropy is not None and s.mean_entropy < cut and s.n_positions > 3}
    assert 0 < len(want) < len(ref)
    cache = logitstore.open(sel)
    assert {s.seq_id for s in cache} == want and len(cache) == len(want)
    assert cache.num_positions == sum(int(ref[k].n_positions) for k in want)
    for k, w in cache.weights.items():
        assert w == pytest.approx(1.0 / (1 + ref[k].teacher_nll), rel=1e-6)
    blocks = list(cache.iter_blocks())
    assert sum(len(b) for b in blocks) == len(want)
    assert set(cache.scalars(["seq_id"]).column(0).to_pylist()) == want
    other = next(k for k in ref if k not in want)
    assert other not in cache
    with pytest.raises(KeyError):
        cache[other]
    con = connect(sel)
    assert {r[0] for r in con.sql("SELECT DISTINCT seq_id FROM tokens").fetchall()} <= want
    assert con.execute("SELECT count(*) FROM sequences").fetchone()[0] == len(want)


def test_fraction_is_seeded_and_limit_keeps_query_order(ranked_cache, tmp_path):
    path = str(ranked_cache.path)
    picks = []
    for seed in (1, 1, 2):
        out = tmp_path / f"f{len(picks)}.json"
        assert main(["select", path, "--where", "true", "--fraction", "0.5", "--seed", str(seed), "-o", str(out)]) == 0
        picks.append(json.loads(out.read_text())["seq_ids"])
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert 0 < len(picks[0]) < len(reference(path))
    out = tmp_path / "top.json"
    assert main(["select", path, "--query", "SELECT seq_id FROM sequences ORDER BY teacher_nll DESC NULLS LAST",
                 "--limit", "3", "-o", str(out)]) == 0
    ref = reference(path)
    order = sorted((s for s in ref.values() if s.teacher_nll is not None), key=lambda s: -s.teacher_nll)
    assert json.loads(out.read_text())["seq_ids"] == [s.seq_id for s in order[:3]]


def test_a_selection_is_refused_against_another_cache_and_moves_with_its_cache(tmp_path):
    rng = np.random.default_rng(2)
    refs = make_sequences(rng, 6, vocab=90, rule=logitstore.TopK(4), max_tokens=10)
    write_cache(tmp_path / "a" / "cache", refs, vocab=90, rule=logitstore.TopK(4))
    sel = tmp_path / "a" / "sel.json"
    assert main(["select", str(tmp_path / "a" / "cache"), "--where", "true", "-o", str(sel)]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # cache and selection move together
    assert len(logitstore.open(tmp_path / "moved" / "sel.json")) == 6
    # another cache at the same path: refused, never silently misread
    shutil.rmtree(tmp_path / "a" / "cache")
    write_cache(tmp_path / "a" / "cache", refs[:5], vocab=90, rule=logitstore.TopK(4))
    with pytest.raises(SelectionMismatchError, match="another cache"):
        logitstore.open(sel)
    assert main(["info", str(sel)]) == 2


def test_materialize_writes_an_identical_standalone_cache(sampled_cache, tmp_path):
    out = tmp_path / "m"
    assert main(["select", str(sampled_cache.path), "--where", "n_positions >= 5", "--materialize",
                 "-o", str(out)]) == 0
    assert verify(out) == []
    src = reference(sampled_cache.path)
    got = reference(out)
    assert set(got) == {k for k, s in src.items() if s.n_positions >= 5}
    for k, s in got.items():
        r = src[k]
        for name in ("input_ids", "pos", "ids", "logprobs", "counts", "entropy", "label_logprob", "tail_mass"):
            np.testing.assert_array_equal(getattr(s, name), getattr(r, name), err_msg=name)
        assert (s.mean_entropy, s.teacher_nll, s.token_accuracy, s.correct) == \
               (r.mean_entropy, r.teacher_nll, r.token_accuracy, r.correct)


def test_select_errors(ranked_cache, tmp_path):
    path = str(ranked_cache.path)
    assert main(["select", path, "--where", "no_such_column > 1", "-o", str(tmp_path / "x.json")]) == 2
    assert main(["select", path, "--query", "SELECT 1 AS x", "-o", str(tmp_path / "x.json")]) == 2
    assert main(["select", path, "--where", "true", "--fraction", "1.5", "-o", str(tmp_path / "x.json")]) == 2
    assert main(["select", path, "--where", "true", "-o", str(tmp_path / "ok.json")]) == 0
    assert main(["select", path, "--where", "true", "-o", str(tmp_path / "ok.json")]) == 2  # exists


def test_a_selection_names_only_sequences_of_its_cache_and_limit_zero_is_empty(ranked_cache, tmp_path):
    path = str(ranked_cache.path)
    assert main(["select", path, "--query", "SELECT 'nope' AS seq_id", "-o", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()
    assert main(["select", path, "--where", "true", "--limit", "0", "-o", str(tmp_path / "zero.json")]) == 0
    assert json.loads((tmp_path / "zero.json").read_text())["seq_ids"] == []


def test_materialize_never_overwrites_and_records_where_it_came_from(ranked_cache, tmp_path):
    path = str(ranked_cache.path)
    out = tmp_path / "m"
    assert main(["select", path, "--where", "n_positions > 0", "--materialize", "-o", str(out)]) == 0
    build = logitstore.open(out).manifest.build
    assert build["selected_from"] == str(ranked_cache.path.resolve()) and "n_positions > 0" in build["query"]
    from pathlib import Path

    paths = [v for k, v in build.items() if k != "source_build" and isinstance(v, str) and v.startswith("/")]
    assert paths and all(Path(v).exists() for v in paths)  # no record of a deleted temporary file
    assert main(["select", path, "--where", "true", "--materialize", "--force", "-o", str(out)]) == 2
