"""The ``export`` subcommand: a cache (or a selection) as a dataset another trainer reads (``logitstore.export``)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tools.cli.text import size


def add_export(sub) -> None:
    from logitstore.export import LOGPROBS, TARGETS

    p = sub.add_parser(
        "export", help="the cache as a dataset other trainers read (axolotl's KD plugin)",
        description="Write CACHE (or a SELECTION of it) into DIR as a dataset of another trainer. --to axolotl: "
                    "pre-tokenized rows of input_ids, attention_mask, labels and, per token position t, the teacher's "
                    "entries for the next token (target_token_ids, target_logprobs, target_mask), as axolotl's "
                    "KD plugin (axolotl.integrations.kd) trains on; Parquet under DIR/data, loadable with "
                    "datasets.load_dataset(DIR). The field mapping is in logitstore/export.py. DIR is written "
                    "atomically; the command prints the axolotl config that trains from it.")
    p.add_argument("cache", metavar="CACHE", help="cache directory or selection file")
    p.add_argument("--to", required=True, metavar="TRAINER", help=f"target format: {', '.join(TARGETS)}")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory to write (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace DIR if it holds an earlier export (never any other directory)")
    p.add_argument("--logprobs", default="normalized", metavar="MODE",
                   help=f"{' or '.join(LOGPROBS)}: the teacher logprobs renormalised over each position's stored "
                        "entries, as axolotl expects (default), or the cache's full-vocabulary values")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="re-temper the normalized logprobs, log_softmax(lp / T) over the entries, as axolotl's "
                        "chat_template strategy does; set axolotl's kd_temperature to the same T (default 1)")
    p.add_argument("--drop-tail-draws", action="store_true",
                   help="a --tail-draws cache: export its exact top-k head only (axolotl has no field for draws; a "
                        "--sample D --systematic cache, the build default, exports the ids drawn with certainty, "
                        "every id of probability >= 1/D, without this flag)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="export an unfinished build (manifest complete: false): the sequences committed so far")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    from logitstore import remote
    from logitstore.export import MARKER
    from logitstore.export import export as export_cache

    out = Path(args.output)
    if remote.is_remote(args.output):  # written locally, then uploaded with its marker last
        remote.check_publish(args.output, marker=MARKER, force=args.force)  # before the work
        out = remote.cache_root() / "staging" / f"export-{os.getpid()}"
        shutil.rmtree(out, ignore_errors=True)
    try:
        info = export_cache(args.cache, out, to=args.to, force=args.force, logprobs=args.logprobs,
                            temperature=args.temperature, drop_tail_draws=args.drop_tail_draws,
                            allow_incomplete=args.allow_incomplete, progress=not args.quiet)
        total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        if remote.is_remote(args.output):
            remote.publish_directory(out, args.output, marker=MARKER, force=args.force)
    finally:
        if remote.is_remote(args.output):
            shutil.rmtree(out, ignore_errors=True)
    print(f"{args.output}: {info['rows']:,} rows, {info['tokens']:,} tokens ({info['targets']:,} targets), "
          f"{'up to ' if info['padded_entries'] else ''}{info['k']} entries per position, {len(info['files'])} Parquet "
          f"files, {size(total)}")
    if info["rule"].get("rule") == "sample":
        print(f"note: a sampled cache: exported per position the ids of probability >= 1/{info['rule']['draws']}, "
              "which its systematic draws hit with certainty (an exact top-m head); the other draws have no axolotl "
              "field", file=sys.stderr)
    if info["padded_entries"]:
        print(f"note: {info['padded_entries']:,} target entries are padding (positions with fewer than {info['k']} "
              "entries); the config below sets kd_normalize_topk: false", file=sys.stderr)
    print(f"\naxolotl config:\n{info['axolotl_config']}")
    return 0
