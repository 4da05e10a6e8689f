"""The ``logitstore`` command line: the only place in the package that prints.

Subcommands available in this version: ``info`` and ``verify``. Each exits 0 on
success, 1 when ``verify`` finds problems, and 2 with a one-line reason on bad
input (missing cache, unreadable manifest, unknown version).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from logitstore.errors import LogitstoreError


def _info(args: argparse.Namespace) -> int:
    from logitstore.reader import Cache

    cache = Cache(args.cache)
    m = cache.manifest
    d = {
        "path": str(cache.path),
        "format_version": m.format_version,
        "complete": m.complete,
        "teacher": m.teacher,
        "tokenizer": m.tokenizer,
        "vocab_size": m.vocab_size,
        "rule": m.rule,
        "codec": m.codec,
        "temperature": m.temperature,
        "exactness": m.exactness,
        "max_abs_logprob_error": None if m.codec["values"] == "none" else cache.codec.logprob_error_bound(),
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
    if args.json or args.format == "json":
        print(json.dumps(d, indent=1))
        return 0
    rule = ", ".join(f"{k}={v}" for k, v in m.rule.items())
    print(f"cache        {d['path']}  (format v{m.format_version}{'' if m.complete else ', build not finished'})")
    print(f"teacher      {m.teacher.get('id', '?')}  revision={m.teacher.get('revision', '?')}  dtype={m.teacher.get('dtype', '?')}")
    print(f"tokenizer    {m.tokenizer.get('name', '?')}  fingerprint={m.tokenizer.get('fingerprint', '?')}  vocab={m.vocab_size}")
    print(f"entries      {rule}; {d['entries_per_position'] or 0:.1f} per position on average")
    err = "logprobs not stored" if m.codec["values"] == "none" else f"max abs logprob error {d['max_abs_logprob_error']:.4g}"
    print(f"codec        values={m.codec['values']} ({err}), "
          f"ids={m.codec['ids']}, scalars={m.codec['scalars']}, zstd {m.codec['zstd_level']}")
    print(f"contents     {m.sequences:,} sequences, {m.positions:,} positions ({d['targets']:,} targets), "
          f"{len(m.shards)} shards, {_size(m.bytes)}"
          + (f", {d['bytes_per_position']:.1f} bytes/position" if m.positions else ""))
    print("exactness    " + ", ".join(f"{k}: {v}" for k, v in m.exactness.items()))
    if m.duplicates_skipped:
        print(f"duplicates   {m.duplicates_skipped} duplicate sequences skipped")
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    e = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** e:.1f} {'BKMGT'[e]}iB"


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from logitstore.errors import CacheNotFoundError
    from logitstore.format import MANIFEST_NAME
    from logitstore.verify import verify

    if not (Path(args.cache) / MANIFEST_NAME).is_file():
        raise CacheNotFoundError(f"{args.cache}: not a logitstore cache (no {MANIFEST_NAME})")

    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="verifying shards", unit="shard", file=sys.stderr)

    def progress(i: int, n: int) -> None:
        if bar is not None:
            bar.total = n
            bar.update(1)

    problems = verify(args.cache, deep=not args.fast, progress=progress)
    if bar is not None:
        bar.close()
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"{args.cache}: {len(problems)} problem(s) found")
        return 1
    print(f"{args.cache}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="logitstore",
        description="A sparse teacher-logit store for offline knowledge distillation.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="what a cache holds: teacher, tokenizer, k rule, sizes, field exactness",
                          description="Summarise a cache from its manifest (no shard is read).")
    info.add_argument("cache", help="cache directory")
    info.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    info.add_argument("--json", action="store_true", help="same as --format json")
    info.set_defaults(func=_info)
    ver = sub.add_parser("verify", help="check every shard against the manifest and the spec",
                         description="Check checksums, sizes, schema, version, counts and every decoded value "
                                     "against the invariants of FORMAT.md. Exit 1 if anything is wrong.")
    ver.add_argument("cache", help="cache directory")
    ver.add_argument("--fast", action="store_true", help="checksums, schema and counts only; skip decoding values")
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LogitstoreError as exc:
        print(f"logitstore {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
