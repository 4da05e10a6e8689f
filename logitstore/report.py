"""``logitstore report``: one self-contained HTML page that shows what a cache holds.

``write_report(cache, out)`` writes a single HTML file (inline CSS, plots as base64 PNG data
URIs, no script and no link to anything outside the file) with

- the manifest summary: teacher, tokenizer, vocabulary, rule, codec and its logprob error bound,
  sequence/position/target counts, bytes per position, and the exactness of each field;
- histograms of the teacher entropy and the tail mass per cached position (a deterministic hash
  sample of about ``MAX_SAMPLED_POSITIONS`` positions on bigger caches; the page says so), of the
  teacher NLL per sequence and of the sequence lengths, and the mean entropy by position index up
  to the 99th percentile length (all positions);
- where the cache has correctness verdicts: the counts and the distribution of the per-prompt
  pass rate (sequences grouped by ``record``), and the most confident wrong answers;
- tables of the highest-entropy and the lowest-NLL sequences.

Every number comes from SQL through ``logitstore.query.connect``. Plots are drawn on
``matplotlib.figure.Figure`` objects with the Agg canvas attached explicitly, so the global
pyplot backend of the calling process (a notebook, say) is never switched. The page is written
to a temporary file and renamed over ``out``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from logitstore.codec import Codec
from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.manifest import atomic_write_bytes
from logitstore.query import connect
from logitstore.reader import Cache

logger = logging.getLogger(__name__)

#: Per-position histograms read at most about this many positions; bigger caches are sampled.
MAX_SAMPLED_POSITIONS = 1_000_000
#: Bars of a histogram.
BINS = 50
#: The columns of the sequence tables.
TABLE_COLUMNS = ("seq_id", "record", "sample", "n_tokens", "n_targets", "mean_entropy", "teacher_nll",
                 "token_accuracy", "correct")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; max-width: 40em; }
figcaption, p.note { font-size: 0.85em; color: #555; }
code { font-size: 0.95em; }
"""


_TITLE = "<title>logitstore report: "  # what makes a file a report of ours (the only files write_report replaces)


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return _TITLE.encode() in f.read(512)
    except OSError:
        return False


def write_report(cache: Cache | str | os.PathLike, out: str | os.PathLike, *, top: int = 10) -> Path:
    """Write the HTML report of ``cache`` (a path or an open ``Cache``) to ``out``; returns ``out`` as a Path.

    ``top`` is the number of rows of each sequence table.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InvalidInputError(f"top={top!r}: must be an integer >= 1 (the rows of each table)")
    out = Path(out)
    if out.is_dir():
        raise InvalidInputError(f"output {str(out)!r} is a directory; give the path of the HTML file to write")
    if not out.parent.is_dir():
        raise InvalidInputError(f"output {str(out)!r}: its directory {str(out.parent)!r} does not exist")
    if out.exists() and not _is_report(out):
        raise CacheExistsError(f"output {str(out)!r} exists and is not a logitstore report: it is never overwritten; "
                               "choose a new path (an earlier report is replaced)")
    t0 = time.perf_counter()
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    con = connect(cache)
    manifest = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM manifest").fetchall()}
    logger.info("report of %s: counting sequences and positions", cache.location)
    totals, by_pos = _totals(con)
    body = [f"<h1>logitstore report: <code>{_e(cache.location)}</code></h1>", _summary(manifest, totals)]

    body.append("<h2>Teacher distributions</h2>")
    logger.info("report: per-position histograms (%s positions)", f"{totals['positions']:,}")
    body += _position_histograms(con, totals["positions"])
    logger.info("report: mean entropy by position index")
    body.append(_entropy_by_position(con, by_pos))

    body.append("<h2>Sequences</h2>")
    logger.info("report: per-sequence histograms")
    body += _sequence_histograms(con)

    verdicts = con.execute("SELECT count(*) FILTER (WHERE correct), count(*) FILTER (WHERE NOT correct), "
                           "count(*) FILTER (WHERE correct IS NULL) FROM sequences").fetchone()
    if verdicts[0] + verdicts[1] > 0:
        logger.info("report: correctness (%d correct, %d wrong)", verdicts[0], verdicts[1])
        body.append('<h2 id="correctness">Correctness</h2>')
        body += _correctness(con, *verdicts)
        body.append(_table(con, "confident-wrong", f"Most confident wrong answers (top {top})",
                           "correct = false AND teacher_nll IS NOT NULL", "teacher_nll ASC", top,
                           "wrong answers the teacher found most likely (lowest NLL): confident mistakes, or a "
                           "verifier that is too strict"))

    body.append("<h2>Sequences worth a look</h2>")
    body.append(_table(con, "highest-entropy", f"Highest mean entropy (top {top})", "mean_entropy IS NOT NULL",
                       "mean_entropy DESC", top, "where the teacher is least sure; the most to learn from, or noise"))
    body.append(_table(con, "lowest-nll", f"Lowest teacher NLL (top {top})", "teacher_nll IS NOT NULL",
                       "teacher_nll ASC", top, "text the teacher predicts best: memorised or boilerplate?"))

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"{_TITLE}{_e(Path(cache.location).name)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    con.close()
    atomic_write_bytes(out, page.encode("utf-8"))
    logger.info("report: wrote %s (%d KiB) in %.1f s", out, len(page) // 1024, time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- numbers


def _totals(con) -> tuple[dict[str, Any], list[tuple]]:
    """Counts and means over all positions, and the same per position index, in one scan of ``tokens``
    (the view unpacks every list column whatever a query names, so each scan costs)."""
    n_seq, n_tok = con.execute("SELECT count(*), coalesce(sum(n_tokens), 0) FROM sequences").fetchone()
    rows = con.execute(
        "SELECT GROUPING(pos) AS is_total, pos, count(*), count(*) FILTER (WHERE loss_mask), avg(entropy), "
        "avg(tail_mass), -avg(label_logprob) FILTER (WHERE loss_mask) FROM tokens "
        "GROUP BY GROUPING SETS ((pos), ()) ORDER BY is_total DESC, pos").fetchall()
    total, by_pos = rows[0], rows[1:]
    return dict(sequences=n_seq, tokens=int(n_tok), positions=total[2], targets=total[3], mean_entropy=total[4],
                mean_tail_mass=total[5], target_nll=total[6]), by_pos


def _error_bound(codec: dict[str, Any]) -> str:
    return Codec.from_dict(codec).logprob_error_text()


def _summary(m: dict[str, Any], t: dict[str, Any]) -> str:
    teacher, tok, codec, mt = m.get("teacher") or {}, m.get("tokenizer") or {}, m["codec"], m.get("totals") or {}
    positions = t["positions"]
    rows = [
        ("format version", f"{m.get('format_version')}" + ("" if m.get("complete") else " (build not finished)")),
        ("teacher", teacher.get("id", "?")),
        ("teacher revision", teacher.get("revision", "?")),
        ("teacher dtype", teacher.get("dtype", "?")),
        ("tokenizer", tok.get("name", "?")),
        ("tokenizer fingerprint", tok.get("fingerprint", "?")),
        ("vocab size", _n(m.get("vocab_size"))),
        ("rule", ", ".join(f"{k}={v}" for k, v in m["rule"].items())),
        ("temperature", m.get("temperature")),
        ("codec", f"values={codec['values']}, ids={codec['ids']}, scalars={codec['scalars']}, "
                  f"zstd {codec.get('zstd_level')}"),
        ("max abs logprob error", _error_bound(codec)),
        ("sequences", _n(t["sequences"])),
        ("tokens", _n(t["tokens"])),
        ("positions", _n(positions)),
        ("targets", _n(t["targets"])),
        ("bytes", _n(mt.get("bytes", 0))),
        ("bytes/position", f"{mt['bytes'] / positions:.2f}" if positions and "bytes" in mt else "n/a"),
        ("entries/position", f"{mt['entries'] / positions:.2f}" if positions and "entries" in mt else "n/a"),
        ("mean entropy per position (nats)", _f(t["mean_entropy"])),
        ("mean tail mass per position", _f(t["mean_tail_mass"])),
        ("teacher NLL per target position (nats)", _f(t["target_nll"])),
    ]
    rows += [(f"exactness: {k}", v) for k, v in (m.get("exactness") or {}).items()]
    if m.get("duplicates_skipped"):
        rows.append(("duplicates skipped", _n(m["duplicates_skipped"])))
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table id="summary">{cells}</table>'


# ---------------------------------------------------------------- plots


def _position_histograms(con, positions: int) -> list[str]:
    stride = max(1, math.ceil(positions / MAX_SAMPLED_POSITIONS))
    where = "" if stride == 1 else f"WHERE hash(seq_id, pos) % {stride} = 0"
    cols = con.execute(f"SELECT entropy, tail_mass FROM tokens {where}").fetchnumpy()
    ent, tail = (_finite(cols[c]) for c in ("entropy", "tail_mass"))
    n = len(cols["entropy"])
    if stride == 1:
        note, tag = f"all {n:,} cached positions", ""
    else:
        note = (f"sampled: {n:,} of {positions:,} cached positions (those with hash(seq_id, pos) % {stride} = 0, "
                "deterministic)")
        tag = " (sampled)"
    logger.info("report: read %s positions for the histograms (%s)", f"{n:,}", note)
    return [
        _hist(ent, f"Teacher entropy per position{tag}", "entropy (nats)", "positions",
              f"Full-vocabulary teacher entropy, {note}; mean {_f(_mean(ent))} nats."),
        _hist(tail, f"Tail mass per position{tag}", "tail mass (probability outside the entries)", "positions",
              f"1 - sum of the stored entries' probabilities, {note}; mean {_f(_mean(tail))}."),
    ]


def _entropy_by_position(con, by_pos: list[tuple]) -> str:
    """``by_pos``: rows (is_total, pos, positions, targets, mean entropy, ...) of ``_totals``, ordered by pos."""
    p99 = con.execute("SELECT quantile_disc(n_tokens, 0.99) FROM sequences").fetchone()[0]
    rows = [(r[1], r[4], r[2]) for r in by_pos if p99 is not None and r[1] <= p99 and r[4] is not None]
    if not rows:
        return _no_data("Mean entropy by position index")
    pos, mean, count = (np.array(c, dtype=np.float64) for c in zip(*rows))
    fig, ax = _figure()
    ax.plot(pos, mean, color="#1f77b4", lw=1.2, marker="." if pos.size < 60 else None)
    ax.set(title="Mean teacher entropy by position index", xlabel="position index in the sequence (tokens)",
           ylabel="mean entropy (nats)")
    return _figure_html(fig, f"Average entropy of all cached positions at each index 1 ... {int(p99)} "
                             f"(the 99th percentile sequence length); {int(count.sum()):,} positions.")


def _sequence_histograms(con) -> list[str]:
    nll = _finite(con.execute("SELECT teacher_nll FROM sequences WHERE teacher_nll IS NOT NULL")
                  .fetchnumpy()["teacher_nll"])
    lengths = con.execute("SELECT n_tokens FROM sequences").fetchnumpy()["n_tokens"].astype(np.int64)
    out = [_hist(nll, "Teacher NLL per sequence", "mean NLL of the labels (nats/token)", "sequences",
                 f"{nll.size:,} sequences with targets; mean {_f(_mean(nll))} nats/token.")]
    bins: Any = BINS
    if lengths.size and lengths.max() - lengths.min() < BINS:
        bins = np.arange(lengths.min(), lengths.max() + 2) - 0.5
    out.append(_hist(lengths, "Sequence lengths", "n_tokens (tokens)", "sequences",
                     f"{lengths.size:,} sequences; median {_f(np.median(lengths) if lengths.size else None, 1)}, "
                     f"max {_n(int(lengths.max()) if lengths.size else None)} tokens.", bins=bins))
    return out


def _correctness(con, n_correct: int, n_wrong: int, n_none: int) -> list[str]:
    fig, ax = _figure()
    labels, counts = ["correct", "wrong", "no verdict"], [n_correct, n_wrong, n_none]
    bars = ax.bar(labels, counts, color=["#2ca02c", "#d62728", "#999999"])
    ax.bar_label(bars)
    ax.margins(y=0.12)
    ax.set(title="Correctness verdicts", xlabel="verdict", ylabel="sequences")
    out = [_figure_html(fig, f"{n_correct:,} correct, {n_wrong:,} wrong, {n_none:,} without a verdict; "
                             f"pass rate {_f(n_correct / (n_correct + n_wrong))} over the verified sequences.")]
    rates = con.execute("SELECT avg(correct::INTEGER) AS rate FROM sequences WHERE correct IS NOT NULL "
                        "GROUP BY record").fetchnumpy()["rate"].astype(np.float64)
    out.append(_hist(rates, "Pass rate per prompt", "pass rate (fraction of a prompt's verified samples correct)",
                     "prompts (records)",
                     f"{rates.size:,} prompts (sequences grouped by record); {int((rates == 0).sum()):,} never "
                     f"solved, {int((rates == 1).sum()):,} always solved.",
                     bins=np.linspace(0, 1, 12), range_=(0, 1)))
    return out


def _hist(values: np.ndarray, title: str, xlabel: str, ylabel: str, caption: str, *, bins: Any = BINS,
          range_: tuple[float, float] | None = None) -> str:
    from matplotlib.ticker import MaxNLocator

    if values.size == 0:
        return _no_data(title)
    fig, ax = _figure()
    ax.hist(values, bins=bins, range=range_, color="#1f77b4", edgecolor="white", linewidth=0.3)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _figure_html(fig, caption)


def _figure():  # matplotlib is imported here, on first use, so the CLI starts fast
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    return fig, ax


def _figure_html(fig, caption: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    title = fig.axes[0].get_title()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(title)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _no_data(title: str) -> str:
    return f'<p class="note">{_e(title)}: no data in this cache.</p>'


# ---------------------------------------------------------------- tables


def _table(con, table_id: str, title: str, where: str, order: str, top: int, why: str) -> str:
    cols = ", ".join(TABLE_COLUMNS)
    rows = con.execute(f"SELECT {cols} FROM sequences WHERE {where} ORDER BY {order}, seq_id LIMIT {int(top)}"
                       ).fetchall()
    head = f"<h3>{_e(title)}</h3><p class=\"note\">{_e(why)}; <code>{_e(f'WHERE {where} ORDER BY {order}')}</code></p>"
    if not rows:
        return head + '<p class="note">no such sequences.</p>'
    th = "".join(f"<th>{_e(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f'{head}<table id="{_e(table_id)}"><tr>{th}</tr>{body}</table>'


def _cell(v) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return f"<td>{_e('' if v is None else v)}</td>"
    return f'<td class="num">{_e(_f(v) if isinstance(v, float) else _n(v))}</td>'


# ---------------------------------------------------------------- formatting


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _n(v) -> str:
    return "n/a" if v is None else f"{int(v):,}"


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{float(v):.{digits}f}"


def _finite(a) -> np.ndarray:
    a = np.ma.filled(a.astype(np.float64), np.nan) if np.ma.isMaskedArray(a) else np.asarray(a, np.float64)
    return a[np.isfinite(a)]


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if a.size else None


# ---------------------------------------------------------------- command line
