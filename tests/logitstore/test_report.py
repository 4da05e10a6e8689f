"""``logitstore report``: one self-contained HTML file whose numbers equal numpy over the decoded cache.

The references are computed from ``logitstore.open(path)`` with numpy (per-position arrays and
per-sequence means over the loss mask), never from the SQL the report runs.
"""

from __future__ import annotations

import argparse
import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import logitstore
from logitstore import MassTopK, report
from logitstore.errors import CacheExistsError, CacheNotFoundError, InvalidInputError
from logitstore.report import write_report
from tests.conftest import BuiltCache, make_sequence, write_cache
from tools.cli.store import add_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: entropy, tail mass, mean entropy by position, teacher NLL, lengths
BASE_PLOTS = 5
#: + correctness counts and pass rate per prompt
VERDICT_PLOTS = BASE_PLOTS + 2
EVIL = "<script>alert('x')</script> & co"


class _Page(HTMLParser):
    """The parts of the page the tests read: tables by id (rows of cell texts), img srcs, element ids, hrefs."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.imgs: list[str] = []
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self._table = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"_{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def summary(self) -> dict[str, str]:
        return {k: v for k, v in self.tables["summary"]}

    def column(self, table: str, name: str) -> list[str]:
        head, *rows = self.tables[table]
        return [r[head.index(name)] for r in rows]


def _num(s: str) -> float:
    return float(s.replace(",", ""))


def _reference(path):
    """Numpy references from the decoded cache: per-position arrays and per-sequence target means."""
    seqs = list(logitstore.open(path))
    cat = lambda name: np.concatenate([getattr(s, name) for s in seqs]).astype(np.float64)  # noqa: E731
    mask = np.concatenate([s.loss_mask for s in seqs])
    per_seq = {}
    for s in seqs:
        m = s.loss_mask
        nll = -s.label_logprob[m].astype(np.float64).mean() if m.any() else None
        ent = s.entropy[m].astype(np.float64).mean() if m.any() else None
        per_seq[s.seq_id] = dict(nll=nll, entropy=ent, correct=s.correct, record=int(s.record))
    return dict(sequences=len(seqs), positions=int(mask.size), targets=int(mask.sum()),
                mean_entropy=cat("entropy").mean(), mean_tail=cat("tail_mass").mean(),
                target_nll=-cat("label_logprob")[mask].mean(), per_seq=per_seq)


def _top(per_seq: dict, key: str, n: int, *, descending: bool, where=lambda r: True) -> list[str]:
    rows = [(sid, r[key]) for sid, r in per_seq.items() if r[key] is not None and where(r)]
    rows.sort(key=lambda t: ((-t[1] if descending else t[1]), t[0]))
    return [sid for sid, _ in rows[:n]]


def _assert_self_contained(text: str, page: _Page, n_plots: int) -> None:
    for external in ('src="http', "src='http", "<link", "<script", "url(", "@import", "<iframe"):
        assert external not in text, external
    assert page.hrefs == []
    assert text.count('<img src="data:image/png;base64,') == n_plots == len(page.imgs)
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)


@pytest.fixture(scope="module")
def verdict_cache(tmp_path_factory) -> BuiltCache:
    """Generation-mode-like cache: 8 prompts x 4 samples with verdicts (some NULL), one wrong answer
    without targets (NULL NLL), and a teacher id that needs HTML escaping."""
    rng = np.random.default_rng(2024)
    vocab, rule = 400, MassTopK(0.9, 16)
    T, F, N = True, False, None
    verdicts = [[T, T, T, N], [F, F, F, F], [T, F, F, N], [N, N, N, N], [T, F, T, F], [F, N, F, T], [T, T, T, T],
                [F, T, N, F]]  # pass rates 1, 0, 1/3, none, 1/2, 1/3, 1, 1/3
    refs = [make_sequence(rng, vocab=vocab, n_tokens=int(rng.integers(3, 40)), rule=rule, seq_id=f"gen-{i:03d}",
                          record=i // 4, sample=i % 4, correct=verdicts[i // 4][i % 4], mask_prob=0.2)
            for i in range(32)]
    refs.append(make_sequence(rng, vocab=vocab, n_tokens=6, rule=rule, seq_id="gen-nomask", record=8,
                              correct=False, mask_prob=1.0))
    path = tmp_path_factory.mktemp("verdicts") / "cache"
    write_cache(path, refs, vocab=vocab, rule=rule, shard_bytes=8_000, row_group_positions=50,
                teacher={"id": EVIL, "revision": "rev-1", "dtype": "bf16"},
                tokenizer={"name": "tok", "fingerprint": "fp-abc123", "vocab_size": vocab})
    return BuiltCache(path, refs, vocab, rule, logitstore.Codec())


def test_report_with_verdicts_matches_numpy(verdict_cache, tmp_path):
    out = tmp_path / "report.html"
    assert write_report(verdict_cache.path, out, top=20) == out
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # one file, no temporary left over
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    _assert_self_contained(text, page, VERDICT_PLOTS)
    assert "correctness" in page.ids and "confident-wrong" in page.tables
    assert "sampled" not in text  # small cache: every position is plotted

    ref = _reference(verdict_cache.path)
    s = page.summary()
    assert _num(s["sequences"]) == ref["sequences"] == len(verdict_cache.refs)
    assert _num(s["positions"]) == ref["positions"] == sum(r.n for r in verdict_cache.refs)
    assert _num(s["targets"]) == ref["targets"]
    assert _num(s["mean entropy per position (nats)"]) == pytest.approx(ref["mean_entropy"], abs=6e-5)
    assert _num(s["mean tail mass per position"]) == pytest.approx(ref["mean_tail"], abs=6e-5)
    assert _num(s["teacher NLL per target position (nats)"]) == pytest.approx(ref["target_nll"], abs=6e-5)
    assert s["teacher"] == EVIL and s["teacher revision"] == "rev-1" and s["teacher dtype"] == "bf16"
    assert s["tokenizer fingerprint"] == "fp-abc123" and _num(s["vocab size"]) == verdict_cache.vocab
    assert s["max abs logprob error"].startswith(f"{5 / 256:.4g} nats")
    assert s["exactness: entropy"] == "exact" and s["exactness: topk_logprobs"] == "quantised"
    assert "<script>alert" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text

    per_seq = ref["per_seq"]
    wrong = _top(per_seq, "nll", 20, descending=False, where=lambda r: r["correct"] is False)
    assert 5 <= len(wrong) < 20 and "gen-nomask" not in wrong  # all wrong answers with targets
    assert page.column("confident-wrong", "seq_id") == wrong
    assert set(page.column("confident-wrong", "correct")) == {"False"}
    assert _num(page.column("confident-wrong", "teacher_nll")[0]) == pytest.approx(per_seq[wrong[0]]["nll"],
                                                                                   abs=6e-5)
    assert page.column("highest-entropy", "seq_id") == _top(per_seq, "entropy", 20, descending=True)
    assert page.column("lowest-nll", "seq_id") == _top(per_seq, "nll", 20, descending=False)
    for sid, nll in zip(page.column("lowest-nll", "seq_id"), page.column("lowest-nll", "teacher_nll")):
        assert _num(nll) == pytest.approx(per_seq[sid]["nll"], abs=6e-5)

    verdict = [r["correct"] for r in per_seq.values()]
    counts = f"{verdict.count(True)} correct, {verdict.count(False)} wrong, {verdict.count(None)} without a verdict"
    assert counts in text
    by_record: dict[int, list[bool]] = {}
    for r in per_seq.values():
        if r["correct"] is not None:
            by_record.setdefault(r["record"], []).append(r["correct"])
    rates = np.array([np.mean(v) for v in by_record.values()])
    assert rates.size == 8 and (rates == 0).sum() == 2 and (rates == 1).sum() == 2  # records 1 and 8; 0 and 6
    assert (f"{rates.size} prompts (sequences grouped by record); {int((rates == 0).sum())} never solved, "
            f"{int((rates == 1).sum())} always solved") in text


def test_report_without_verdicts_has_no_correctness_section(sampled_cache, tmp_path):
    out = tmp_path / "sampled.html"
    write_report(logitstore.open(sampled_cache.path), out)  # an open Cache works as well as a path
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    _assert_self_contained(text, page, BASE_PLOTS)
    assert "correctness" not in page.ids and "confident-wrong" not in page.tables
    assert "Correctness" not in text and "Pass rate" not in text
    ref = _reference(sampled_cache.path)
    s = page.summary()
    assert _num(s["sequences"]) == ref["sequences"] == len(sampled_cache.refs)
    assert _num(s["positions"]) == ref["positions"]
    assert s["rule"] == "rule=sample, draws=32, k=16"
    assert page.column("highest-entropy", "seq_id") == _top(ref["per_seq"], "entropy", 10, descending=True)


def test_big_caches_are_sampled_and_the_page_says_so(verdict_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_SAMPLED_POSITIONS", 40)
    out = tmp_path / "r.html"
    write_report(verdict_cache.path, out)
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    _assert_self_contained(text, page, VERDICT_PLOTS)
    ref = _reference(verdict_cache.path)
    m = re.search(r"sampled: ([\d,]+) of ([\d,]+) cached positions", text)
    assert m is not None
    n, total = _num(m.group(1)), _num(m.group(2))
    assert total == ref["positions"] > 40 and 0 < n < total and n <= 3 * 40
    alts = [a for a in re.findall(r'alt="([^"]*)"', text) if "(sampled)" in a]
    assert alts == ["Teacher entropy per position (sampled)", "Tail mass per position (sampled)"]
    # the summary means are still over every position
    assert _num(page.summary()["mean entropy per position (nats)"]) == pytest.approx(ref["mean_entropy"], abs=6e-5)


def test_subparser_runs_the_report(verdict_cache, tmp_path, capsys):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_report(sub)
    out = tmp_path / "cli.html"
    args = p.parse_args(["report", str(verdict_cache.path), "-o", str(out), "--top", "3"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    page = _Page(out.read_text(encoding="utf-8"))
    assert len(page.tables["highest-entropy"]) == 1 + 3 and len(page.tables["confident-wrong"]) == 1 + 3
    before = out.read_text(encoding="utf-8")
    assert args.func(args) == 0 and out.read_text(encoding="utf-8") == before  # an earlier report is replaced
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cli.html"]
    out.write_text("the user's notes")  # any other file is never overwritten
    with pytest.raises(CacheExistsError, match="not a logitstore report"):
        args.func(args)
    assert out.read_text() == "the user's notes"
    args = p.parse_args(["report", str(verdict_cache.path), "-o", str(out), "--top", "0"])
    with pytest.raises(InvalidInputError, match="--top 0"):
        args.func(args)


def test_bad_arguments_are_refused(verdict_cache, tmp_path):
    with pytest.raises(InvalidInputError, match="top=0"):
        write_report(verdict_cache.path, tmp_path / "r.html", top=0)
    with pytest.raises(InvalidInputError, match="does not exist"):
        write_report(verdict_cache.path, tmp_path / "no" / "r.html")
    with pytest.raises(InvalidInputError, match="is a directory"):
        write_report(verdict_cache.path, tmp_path)
    with pytest.raises(CacheNotFoundError):
        write_report(tmp_path / "missing", tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_empty_cache_gives_a_page_without_plots(tmp_path):
    with logitstore.CacheWriter(tmp_path / "empty", vocab_size=10, rule=logitstore.TopK(2)):
        pass
    out = tmp_path / "empty.html"
    write_report(tmp_path / "empty", out)
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    _assert_self_contained(text, page, 0)
    assert page.summary()["sequences"] == "0" and page.summary()["bytes/position"] == "n/a"
    assert text.count("no data in this cache") == BASE_PLOTS and "correctness" not in page.ids
