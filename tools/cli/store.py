"""The store's subcommands: ``info``, ``verify``, ``sql``, ``select``, ``diff``, ``merge`` and ``report``.

Each ``add_*`` registers one subcommand's arguments; its handler calls the store's public
API (``logitstore``) and prints. Heavy modules (DuckDB, matplotlib) are imported by the
handlers, so ``logitstore --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from logitstore import remote
from logitstore.errors import CacheExistsError, CacheNotFoundError, InvalidInputError, LogitstoreError
from tools.cli.text import format_table, size

# ---------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="what a cache holds: teacher, tokenizer, k rule, sizes, field exactness",
                       description="Summarise a cache (or a selection of one) from its manifest (no shard is read); "
                                   "for a union (a distill RUN), one line per member cache.")
    p.add_argument("cache", metavar="CACHE", help="cache directory, selection file, or union (a distill RUN)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--allow-missing", action="store_true",
                   help="a selection whose seq ids are not all in its cache: use those that are (default: refuse)")
    p.set_defaults(func=info)


def _union_info(args: argparse.Namespace) -> int:
    from logitstore.reader import Cache
    from logitstore.union import load_union, union_file

    file = union_file(args.cache)
    u = load_union(file)
    rows = []
    for m in u.members:
        c = Cache(m.cache if Path(m.cache).is_absolute() else file.parent / m.cache)
        rows.append({**m.labels, "cache": str(c.path), "complete": c.manifest.complete, "sequences": len(c),
                     "positions": c.manifest.positions, "teacher": c.manifest.teacher.get("id"),
                     "policy": (c.manifest.build.get("policy") or {}).get("id")})
    if args.json or args.format == "json":
        print(json.dumps({"union": str(file), "labels": u.labels, "members": rows}, indent=1))
        return 0
    print(f"union        {file}: {len(rows)} member caches, labels {', '.join(u.labels)}")
    cols = [*u.labels, "sequences", "positions", "complete", "cache"]
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    return 0


def info(args: argparse.Namespace) -> int:
    from logitstore.reader import Cache
    from logitstore.union import is_union

    if is_union(args.cache):
        return _union_info(args)
    cache = Cache(args.cache, allow_missing=args.allow_missing)
    m = cache.manifest
    d = {
        "path": cache.location,
        "format_version": m.format_version,
        "complete": m.complete,
        "teacher": m.teacher,
        "tokenizer": m.tokenizer,
        "vocab_size": m.vocab_size,
        "rule": m.rule,
        "codec": m.codec,
        "temperature": m.temperature,
        "exactness": m.exactness,
        "max_abs_logprob_error": cache.codec.logprob_error_bound() if m.codec["values"] in ("qdelta", "fp32") else None,
        "logprob_error": cache.codec.logprob_error_text(),
        "shards": len(m.shards),
        "sequences": m.sequences,
        "positions": m.positions,
        "targets": sum(s.targets for s in m.shards),
        "entries": m.entries,
        "bytes": m.bytes,
        "bytes_per_position": m.bytes / m.positions if m.positions else None,
        "entries_per_position": m.entries / m.positions if m.positions else None,
        "duplicates_skipped": m.duplicates_skipped,
        "build": m.build,
    }
    if cache.selection is not None:
        d["selection"] = {"file": args.cache, "cache": str(cache.path), "sequences": len(cache),
                          "positions": cache.num_positions, "query": cache.selection.query,
                          "weighted": cache.selection.weights is not None}
    if args.json or args.format == "json":
        print(json.dumps(d, indent=1))
        return 0
    rule = ", ".join(f"{k}={v}" for k, v in m.rule.items())
    t = m.teacher
    print(f"cache        {d['path']}  (format v{m.format_version}{'' if m.complete else ', build not finished'})")
    print(f"teacher      {t.get('id', '?')}  revision={t.get('revision', '?')}  dtype={t.get('dtype', '?')}")
    print(f"tokenizer    {m.tokenizer.get('name', '?')}  fingerprint={m.tokenizer.get('fingerprint', '?')}  "
          f"vocab={m.vocab_size}")
    print(f"entries      {rule}; {d['entries_per_position'] or 0:.1f} per position on average")
    print(f"codec        values={m.codec['values']} (max abs logprob error {d['logprob_error']}), "
          f"ids={m.codec['ids']}, scalars={m.codec['scalars']}, zstd {m.codec['zstd_level']}")
    print(f"contents     {m.sequences:,} sequences, {m.positions:,} positions ({d['targets']:,} targets), "
          f"{len(m.shards)} shards, {size(m.bytes)}"
          + (f", {d['bytes_per_position']:.1f} bytes/position" if m.positions else ""))
    print("exactness    " + ", ".join(f"{k}: {v}" for k, v in m.exactness.items()))
    if m.duplicates_skipped:
        print(f"duplicates   {m.duplicates_skipped} duplicate sequences skipped")
    if cache.selection is not None:
        sel = d["selection"]
        print(f"selection    {args.cache}: {sel['sequences']:,} sequences, {sel['positions']:,} positions"
              f"{', weighted' if sel['weighted'] else ''}; query: {sel['query']}")
    return 0


# ---------------------------------------------------------------- verify


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every shard against the manifest and the spec",
                       description="Check checksums, sizes, schema, version, counts and every decoded value "
                                   "against the invariants of FORMAT.md. Exit 1 if anything is wrong. A union of "
                                   "caches (a distill run directory) has each of its caches checked.")
    p.add_argument("cache", metavar="CACHE", help="cache directory (or a distill run directory)")
    p.add_argument("--fast", action="store_true", help="checksums, schema and counts only; skip decoding values")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    """Verify a cache, or every member of a union of caches (a distill run): exit 1 if any has a problem."""
    from logitstore.union import is_union, member_paths

    if not remote.is_remote(args.cache) and is_union(args.cache):
        return max(_verify_one(str(p), args.fast, args.quiet) for p in member_paths(args.cache)[1:])
    return _verify_one(args.cache, args.fast, args.quiet)


def _verify_one(cache: str, fast: bool, quiet: bool) -> int:
    from logitstore.format import MANIFEST_NAME
    from logitstore.manifest import load_manifest, not_a_cache
    from logitstore.progress import progress_bar
    from logitstore.verify import verify as verify_cache

    if not remote.is_remote(cache) and not (Path(cache) / MANIFEST_NAME).is_file():
        raise CacheNotFoundError(not_a_cache(cache))
    bar = progress_bar(not quiet, desc="verifying shards", unit="shard")

    def progress(i: int, n: int) -> None:
        if bar is not None:
            bar.total = n
            bar.update(1)

    problems = verify_cache(cache, deep=not fast, progress=progress)
    if bar is not None:
        bar.close()
    for p in problems:
        print(f"FAIL {p}")
    unfinished = ""
    try:
        m = load_manifest(remote.Mirror(cache).dir if remote.is_remote(cache) else cache)
        if not m.complete:
            unfinished = (f"; the build is not finished (complete: false in its manifest: still running or "
                          f"interrupted): its {m.sequences:,} committed sequences were checked, `logitstore build ... "
                          "--resume` continues it")
    except LogitstoreError:  # a damaged manifest: its problem is in the list above
        pass
    if problems:
        print(f"{cache}: {len(problems)} problem(s) found{unfinished}")
        return 1
    print(f"{cache}: OK{unfinished}")
    return 0


# ---------------------------------------------------------------- sql


def add_sql(sub) -> None:
    p = sub.add_parser(
        "sql", help="DuckDB SQL over the views sequences and tokens",
        description="Run a DuckDB query over the cache. Views: sequences (one row per sequence: seq_id, record, "
                    "sample, input_ids, n_tokens, n_positions, n_targets, mean_entropy, teacher_nll, token_accuracy, "
                    "correct) and tokens (one row per cached position: seq_id, pos, label, label_logprob, entropy, "
                    "tail_mass, loss_mask, topk_ids, topk_logprobs, sample_counts, tail_ids, tail_logprobs, "
                    "tail_counts, proposal_log_norm, policy_logprob, policy_entropy); tables manifest (key, value) and "
                    "exactness (field, exactness, meaning). "
                    "Macros: support_entropy(lps), top1_margin(lps), sparse_kl/sparse_js/sparse_tvd(ids_p, lps_p, "
                    "ids_q, lps_q). On a union (a union.json, or a logitstore distill RUN directory) the views hold "
                    "every member cache with its labels first (round), and the table members lists them. "
                    "What a query may do: read the cache (a union's member caches), and the files and directories "
                    "named with --allow-path (nothing else: DuckDB's file, network and extension access is off); "
                    "statements SELECT (WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE), EXPLAIN, SET VARIABLE, and CREATE / "
                    "INSERT / UPDATE / DELETE / DROP / ALTER of in-memory tables, views and macros. It never writes a "
                    "file: COPY, EXPORT, ATTACH, INSTALL, LOAD, PRAGMA and CALL are refused (write results with "
                    "--format csv or json and a shell redirect).")
    p.add_argument("cache", metavar="CACHE", help="cache directory, selection file, or union (a distill RUN)")
    p.add_argument("query", metavar="QUERY", help='e.g. "SELECT seq_id, mean_entropy FROM sequences WHERE correct"')
    p.add_argument("--allow-path", action="append", default=[], metavar="PATH",
                   help="a file or directory the query may read besides the cache, e.g. a `logitstore score` "
                        "directory to join (repeatable)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output: a table (default), CSV, or JSON (an array of row objects)")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default 40)")
    p.add_argument("--allow-missing", action="store_true",
                   help="a selection whose seq ids are not all in its cache: use those that are (default: refuse)")
    p.set_defaults(func=sql)


def _plain(v):
    """A DuckDB value as plain JSON: NaN/inf as null, decimals as floats, dates as ISO text."""
    import datetime
    import decimal

    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (datetime.date, datetime.datetime, datetime.time)):
        return v.isoformat()
    return v


def sql(args: argparse.Namespace) -> int:
    import csv

    import duckdb

    from logitstore.query import connect
    from logitstore.reader import Cache
    from logitstore.sqlguard import SQL_STATEMENTS, allow_paths, check_statements
    from logitstore.union import is_union

    check_statements(args.query, SQL_STATEMENTS, "QUERY")
    source = args.cache if is_union(args.cache) else Cache(args.cache, allow_missing=args.allow_missing)
    con = connect(source, confine_to=allow_paths(args.allow_path))
    try:
        rel = con.sql(args.query)
        if rel is None:  # a statement without a result (SET, CREATE ...)
            return 0
        if args.format == "table":
            rel.show(max_rows=args.max_rows, max_width=10_000)
            return 0
        cols, rows = rel.columns, rel.fetchall()
    except duckdb.PermissionException as exc:
        raise InvalidInputError(f"query refused: {' '.join(str(exc).split())} (a query reads only the cache and the "
                                "paths given with --allow-path)") from None
    except duckdb.Error as exc:
        raise InvalidInputError(f"query failed: {' '.join(str(exc).split())}") from None
    if args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
        return 0
    json.dump([{c: _plain(v) for c, v in zip(cols, r)} for r in rows], sys.stdout, default=str)
    print()
    return 0


# ---------------------------------------------------------------- select


def add_select(sub) -> None:
    p = sub.add_parser(
        "select", help="a named subset of sequences, without copying the shards",
        description="Write a selection file: the seq ids (and optional weights) a SQL predicate or query picks, "
                    "with the cache's fingerprint and the query. A selection is accepted wherever a cache is "
                    "(info, sql, train) and refused against any other cache.")
    p.add_argument("cache", metavar="CACHE", help="cache directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--where", metavar="PREDICATE",
                     help='on the sequences view, e.g. "mean_entropy < 1.5 AND correct"')
    how.add_argument("--query", metavar="SQL", help="a full query returning seq_id (and optionally weight)")
    p.add_argument("-o", "--output", required=True, metavar="SELECTION", help="selection file to write (JSON)")
    p.add_argument("--weight", metavar="EXPR", help="per-sequence weight, a SQL expression over sequences")
    p.add_argument("--fraction", type=float, help="keep this fraction, chosen by a seeded hash of seq_id")
    p.add_argument("--seed", type=int, default=0, help="seed of --fraction (default 0)")
    p.add_argument("--limit", type=int, help="keep at most this many (in query order)")
    p.add_argument("--materialize", action="store_true", help="write a standalone cache at -o instead of a selection")
    p.add_argument("--force", action="store_true",
                   help="replace an existing selection file (only a selection file: never a cache, a directory or any "
                        "other file)")
    p.add_argument("--allow-path", action="append", default=[], metavar="PATH",
                   help="a file or directory a --query may read besides the cache, e.g. a diff or score directory "
                        "to join (repeatable); --where and --weight are expressions over the views and read no file")
    p.set_defaults(func=select)


def _where(cache: str) -> str:
    """A cache's lasting name: its URL, or its absolute path."""
    return cache if remote.is_remote(cache) else str(Path(cache).resolve())


def select(args: argparse.Namespace) -> int:
    from logitstore.selection import is_our_selection, save_selection
    from logitstore.sqlguard import allow_paths
    from logitstore.subset import make_selection, materialize

    if remote.is_remote(args.output) and not args.materialize:
        raise InvalidInputError(f"-o {args.output}: a selection file is written locally (it may name a remote cache); "
                                "--materialize writes a cache into an object store")
    out = args.output if remote.is_remote(args.output) else Path(args.output)
    if not isinstance(out, str) and out.exists() and (args.materialize or not args.force):
        raise CacheExistsError(f"{out} exists; choose another path"
                               + ("" if args.materialize else " or pass --force to replace the selection file"))
    if not isinstance(out, str) and out.exists() and not is_our_selection(out):
        what = "a directory" if out.is_dir() else "not a selection file"
        raise CacheExistsError(f"-o {out} is {what}: --force replaces only a selection file written by logitstore "
                               "select, never a cache, a shard, a manifest or any other file; choose another path")
    sel = make_selection(args.cache, where=args.where, query=args.query, weight=args.weight,
                         fraction=args.fraction, seed=args.seed, limit=args.limit,
                         allow_paths=tuple(allow_paths(args.allow_path)))
    if not args.materialize:
        save_selection(out, sel)
        print(f"{out}: {len(sel.seq_ids):,} sequences of {args.cache}"
              + (" with weights" if sel.weights is not None else ""))
        return 0
    if sel.weights is not None:
        raise InvalidInputError("--materialize writes a plain cache, which has no per-sequence weights; "
                                "drop --weight or keep the selection file")
    m = materialize(sel, out, provenance={"selected_from": _where(args.cache), "query": sel.query,
                                          "sequences": len(sel.seq_ids)})
    print(f"{out}: a standalone cache of {m.sequences:,} sequences, {m.positions:,} positions, {size(m.bytes)}")
    return 0


# ---------------------------------------------------------------- diff


def add_diff(sub) -> None:
    p = sub.add_parser(
        "diff", help="compare two caches of the same data by different teachers",
        description="Match sequences by seq_id and write per-position and per-sequence KL (both ways), JS, TVD "
                    "and top-1 agreement to DIFF/positions.parquet and DIFF/sequences.parquet. Divergences are "
                    "over the ids both caches store plus one bucket for the rest of each one's mass: exact for "
                    "that pair, lower bounds of the full-vocabulary ones (as the SQL macros).")
    p.add_argument("cache_a", metavar="CACHE_A")
    p.add_argument("cache_b", metavar="CACHE_B")
    p.add_argument("-o", "--output", required=True, metavar="DIFF", help="directory to write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=diff)


def diff(args: argparse.Namespace) -> int:
    from logitstore.diff import diff as diff_caches

    m = diff_caches(args.cache_a, args.cache_b, args.output, progress=not args.quiet)
    print(f"{args.output}: {m['sequences']:,} sequences, {m['positions']:,} positions compared"
          f" ({m['only_in_a']} only in A, {m['only_in_b']} only in B)")
    return 0


# ---------------------------------------------------------------- merge


def add_merge(sub) -> None:
    p = sub.add_parser(
        "merge", help="one cache from several teachers' caches of the same data and tokenizer",
        description="Line sequences up by seq_id and write a cache whose entries describe the weighted mixture of "
                    "the teachers (union of their supports, each one's tail mass kept as mass, re-cut to the target "
                    "rule; label logprobs exact, entropy an upper bound: see `logitstore info MERGED`), or route "
                    "each sequence to the teachers whose answer the verifier accepted (--how correct). The result "
                    "is a normal cache (verify, sql, select, train). Inputs: top-k, mass and --tail-draws caches "
                    "(their exact head), and --sample D --systematic ones, the build default (the ids their draws "
                    "hit with certainty, probability >= 1/D).")
    p.add_argument("caches", metavar="CACHE", nargs="+", help="two or more caches (or selections)")
    p.add_argument("-o", "--output", required=True, metavar="MERGED", help="the new cache directory")
    p.add_argument("--weights", metavar="W1,W2,...", help="one positive weight per cache (default: equal); "
                                                          "normalised over the teachers of each sequence")
    p.add_argument("--how", choices=["mean", "agreement", "correct"], default="mean",
                   help="mean: the mixture; agreement: the mixture, not trained on (loss_mask false) where the "
                        "teachers' top-1 tokens differ; correct: per sequence, the teachers whose answer the "
                        "verifier accepted (others dropped) (default: mean)")
    p.add_argument("--missing", choices=["keep", "drop"], default="keep",
                   help="sequences held by only some caches: keep them with the teachers that have them, or drop "
                        "them (counted in the manifest either way; default: keep)")
    p.add_argument("--top-k", type=int, metavar="K", help="entries per position of the merged cache (default: "
                                                          "the largest k of the inputs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=merge)


def merge(args: argparse.Namespace) -> int:
    from logitstore.merge import merge as merge_caches

    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise InvalidInputError(f"--weights {args.weights!r}: give comma-separated numbers, e.g. 2,1") from None
    m = merge_caches(args.caches, args.output, weights=weights, how=args.how, missing=args.missing,
                     top_k=args.top_k, progress=not args.quiet)
    print(f"{args.output}: {m['sequences']:,} sequences ({m['in_all']} in every cache, {m['partial_kept']} in some "
          f"kept, {m['partial_dropped']} dropped, {m['not_correct']} with no accepted answer); rule {m['rule']}")
    return 0


# ---------------------------------------------------------------- report


def add_report(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of a cache: summary, plots, telling rows",
                       description="Write one HTML file (plots embedded, no external files) with the manifest "
                                   "summary, histograms of teacher entropy, tail mass, NLL and lengths, the mean "
                                   "entropy by position, correctness when the cache has verdicts, and tables of "
                                   "the most confident wrong, highest-entropy and lowest-NLL sequences.")
    p.add_argument("cache", metavar="CACHE", help="cache directory or selection file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="HTML file to write (e.g. report.html)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="rows of each table (default 10)")
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> int:
    from logitstore.report import write_report

    if args.top < 1:
        raise InvalidInputError(f"--top {args.top}: must be >= 1 (the rows of each table)")
    print(f"wrote {write_report(args.cache, args.output, top=args.top)}")
    return 0
