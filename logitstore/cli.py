"""The ``logitstore`` command line: the only place in the package that prints.

Subcommands available in this version: ``build``, ``demo``, ``diff``, ``info``, ``report``, ``score``, ``select``,
``sql``, ``train`` and ``verify``. Each exits 0 on
success, 1 when ``verify`` finds problems, and 2 with a one-line reason on bad
input (missing cache, unreadable manifest, unknown version).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from logitstore.errors import InvalidInputError, LogitstoreError


def format_table(columns, rows, *, digits: int = 4, indent: str = "") -> str:
    """Rows of values as aligned text columns (floats to ``digits`` places, None as NULL)."""
    def cell(v) -> str:
        return "NULL" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    return "\n".join(indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [list(columns), *cells])


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
    print(f"cache        {d['path']}  (format v{m.format_version}{'' if m.complete else ', build not finished'})")
    print(f"teacher      {m.teacher.get('id', '?')}  revision={m.teacher.get('revision', '?')}  dtype={m.teacher.get('dtype', '?')}")
    print(f"tokenizer    {m.tokenizer.get('name', '?')}  fingerprint={m.tokenizer.get('fingerprint', '?')}  vocab={m.vocab_size}")
    print(f"entries      {rule}; {d['entries_per_position'] or 0:.1f} per position on average")
    err = f"max abs logprob error {d['logprob_error']}"
    print(f"codec        values={m.codec['values']} ({err}), "
          f"ids={m.codec['ids']}, scalars={m.codec['scalars']}, zstd {m.codec['zstd_level']}")
    print(f"contents     {m.sequences:,} sequences, {m.positions:,} positions ({d['targets']:,} targets), "
          f"{len(m.shards)} shards, {_size(m.bytes)}"
          + (f", {d['bytes_per_position']:.1f} bytes/position" if m.positions else ""))
    print("exactness    " + ", ".join(f"{k}: {v}" for k, v in m.exactness.items()))
    if m.duplicates_skipped:
        print(f"duplicates   {m.duplicates_skipped} duplicate sequences skipped")
    if cache.selection is not None:
        sel = d["selection"]
        print(f"selection    {args.cache}: {sel['sequences']:,} sequences, {sel['positions']:,} positions"
              f"{', weighted' if sel['weighted'] else ''}; query: {sel['query']}")
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


def _backend_options(args: argparse.Namespace, rule) -> dict:
    """The chosen backend's options from the command line."""
    opts = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    if args.backend == "vllm":
        return {**opts, "dtype": "bf16" if args.dtype is None else args.dtype,
                "device": "cuda" if args.device is None else args.device, "max_logprobs": args.max_logprobs or rule.k,
                "tensor_parallel_size": args.tensor_parallel_size,
                "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len}
    return {**opts, "dtype": "fp32" if args.dtype is None else args.dtype,
            "device": "cpu" if args.device is None else args.device, "extract_mb": args.extract_mb}


def _build(args: argparse.Namespace) -> int:
    import logging

    from builders.data import Fields
    from builders.driver import BuildConfig, build
    from logitstore.codec import Codec
    from logitstore.rules import MassTopK, Sampled, TopK

    if args.mass is not None and args.sample is not None:
        raise InvalidInputError("--mass and --sample are two different rules; give at most one")
    if args.sample is not None:
        rule = Sampled(args.sample, args.top_k or 0)
    elif args.mass is not None:
        rule = MassTopK(args.mass, args.top_k or 64)
    else:
        if args.top_k is None:
            raise InvalidInputError("--top-k K is required (or --mass P / --sample DRAWS)")
        rule = TopK(args.top_k)
    codec = Codec(values=args.values, ids=args.ids, scalars=args.scalars, zstd_level=args.zstd_level,
                  **({"logprob_step": args.logprob_step} if args.logprob_step else {}))
    generation = None
    if args.generate is not None:
        from builders.generate import GenerationConfig

        generation = GenerationConfig(n=args.generate, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, verifier=args.verifier)
    elif args.verifier:
        raise InvalidInputError("--verifier judges generated responses: it needs --generate N")
    config = BuildConfig(
        rule=rule, codec=codec, backend=args.backend, generation=generation,
        backend_options=_backend_options(args, rule),
        fields=Fields(text=args.text_field, messages=args.messages_field, prompt=args.prompt_field,
                      response=args.response_field, answer=args.answer_field),
        max_length=args.max_length, on_long=args.on_long, on_bad=args.on_bad, token_budget=args.token_budget,
        window=args.window,
        cache_prompt=args.cache_prompt, shard_mb=args.shard_mb, row_group_positions=args.row_group_positions,
        seed=args.seed,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.ray is not None:
        from builders.ray_build import RayOptions, build_ray

        opts = RayOptions(address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
                          gpus_per_actor=args.ray_gpus_per_actor, cpus_per_actor=args.ray_cpus_per_actor)
        m = build_ray(args.teacher, args.data, args.output, config, opts, resume=args.resume,
                      progress=not args.quiet, argv=sys.argv[1:])
    else:
        m = build(args.teacher, args.data, args.output, config, resume=args.resume, progress=not args.quiet,
                  argv=sys.argv[1:])
    skipped = (m.build.get("skipped") or {}).get("counts") or {}
    print(f"{args.output}: {m.sequences:,} sequences, {m.positions:,} positions, {_size(m.bytes)}"
          + (f", {m.bytes / m.positions:.1f} bytes/position" if m.positions else ""))
    if skipped:
        print("skipped or changed: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if m.duplicates_skipped:
        print(f"duplicates: {m.duplicates_skipped} records with the same tokens as an earlier one were written once")
    return 0


def _sql(args: argparse.Namespace) -> int:
    import csv
    import datetime
    import decimal

    import duckdb

    from logitstore.query import connect

    try:
        rel = connect(args.cache).sql(args.query)
        if rel is None:  # a statement without a result (SET, CREATE ...)
            return 0
        if args.format == "table":
            rel.show(max_rows=args.max_rows, max_width=10_000)
            return 0
        cols, rows = rel.columns, rel.fetchall()
    except duckdb.Error as exc:
        raise InvalidInputError(f"query failed: {' '.join(str(exc).split())}") from None
    if args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
        return 0

    def plain(v):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, decimal.Decimal):
            return float(v)
        if isinstance(v, (datetime.date, datetime.datetime, datetime.time)):
            return v.isoformat()
        return v

    json.dump([{c: plain(v) for c, v in zip(cols, r)} for r in rows], sys.stdout, default=str)
    print()
    return 0


def _select(args: argparse.Namespace) -> int:
    from pathlib import Path

    from logitstore.errors import CacheExistsError
    from logitstore.selection import make_selection, materialize, save_selection

    out = Path(args.output)
    if out.exists() and (args.materialize or not args.force):
        raise CacheExistsError(f"{out} exists; choose another path"
                               + ("" if args.materialize else " or pass --force to replace the selection file"))
    sel = make_selection(args.cache, where=args.where, query=args.query, weight=args.weight,
                         fraction=args.fraction, seed=args.seed, limit=args.limit)
    if not args.materialize:
        save_selection(out, sel)
        print(f"{out}: {len(sel.seq_ids):,} sequences of {args.cache}"
              + (" with weights" if sel.weights is not None else ""))
        return 0
    if sel.weights is not None:
        raise InvalidInputError("--materialize writes a plain cache, which has no per-sequence weights; "
                                "drop --weight or keep the selection file")
    m = materialize(sel, out, provenance={"selected_from": str(Path(args.cache).resolve()), "query": sel.query,
                                          "sequences": len(sel.seq_ids)})
    print(f"{out}: a standalone cache of {m.sequences:,} sequences, {m.positions:,} positions, {_size(m.bytes)}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from logitstore.diff import diff

    m = diff(args.cache_a, args.cache_b, args.output, progress=not args.quiet)
    print(f"{args.output}: {m['sequences']:,} sequences, {m['positions']:,} positions compared"
          f" ({m['only_in_a']} only in A, {m['only_in_b']} only in B)")
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
    b = sub.add_parser(
        "build", help="batch teacher inference into a cache",
        description="Score DATA with TEACHER and write the sparse next-token distributions of every target "
                    "position to the cache CACHE. TEACHER: a local model directory, a hub id, or a .gguf file. "
                    "DATA: .jsonl (.jsonl.gz, .jsonl.zst), .json, .parquet, or a dataset saved with datasets' "
                    "save_to_disk, whose records have text, messages (chat; assistant turns are targets) or "
                    "prompt + response (response tokens are targets).")
    b.add_argument("teacher", metavar="TEACHER")
    b.add_argument("data", metavar="DATA")
    b.add_argument("-o", "--output", required=True, metavar="CACHE", help="cache directory to create (or resume)")
    r = b.add_argument_group("entries per position (one rule)")
    r.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (with --mass/--sample: the cap)")
    r.add_argument("--mass", type=float, metavar="P", help="keep the smallest prefix with mass >= P (cap: --top-k, default 64)")
    r.add_argument("--sample", type=int, metavar="DRAWS", help="keep the unique ids of DRAWS samples with their counts")
    b.add_argument("--resume", action="store_true", help="continue an interrupted build of CACHE (same teacher, data, rule)")
    b.add_argument("--max-length", type=int, metavar="N", help="longest sequence in tokens (default: no limit)")
    b.add_argument("--on-long", choices=["truncate", "skip"], default="truncate", help="records over --max-length (default: truncate)")
    b.add_argument("--on-bad", choices=["error", "skip"], default="error",
                   help="bad records: stop with an error naming file, line and field (default), or skip and count")
    b.add_argument("--cache-prompt", action="store_true", help="also cache non-target positions (loss_mask false)")
    t = b.add_argument_group("teacher")
    t.add_argument("--backend", default="transformers",
                   help="teacher backend: transformers (CPU or GPU, every field exact) or vllm (CUDA GPUs; the "
                        "entropy is stored as an upper bound, see FORMAT.md); default transformers")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="model dtype (default fp32; bf16 with --backend vllm)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu; cuda with --backend vllm)")
    t.add_argument("--token-budget", type=int, default=8192, help="padded tokens per teacher batch (default 8192)")
    t.add_argument("--window", type=int, default=4096, metavar="N",
                   help="records sorted by length together before batching (default 4096); with --ray, the records "
                        "of one block, the unit of work of an actor")
    t.add_argument("--extract-mb", type=int, default=96, help="memory for the LM head/softmax chunks, MiB (default 96)")
    t.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own Python code to run")
    t.add_argument("--seed", type=int, default=0, help="seed of --sample draws")
    v = b.add_argument_group("vLLM backend (--backend vllm; pip install 'logitstore[vllm]')")
    v.add_argument("--max-logprobs", type=int, metavar="K",
                   help="the engine's max_logprobs (default: the rule's k)")
    v.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="GPUs per model (default 1)")
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="share of GPU memory vLLM may take (default 0.9)")
    v.add_argument("--max-model-len", type=int, metavar="N", help="context length (default: the model's)")
    d = b.add_argument_group("distributed builds (Ray Data; pip install 'logitstore[ray]')")
    d.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="score with a pool of Ray actors, each with its own teacher, writing its own part of CACHE; "
                        "ADDRESS: omitted = a local Ray instance (or $RAY_ADDRESS), auto = the running cluster, "
                        "ray://HOST:10001 (write --ray=ADDRESS, or put --ray after TEACHER DATA). CACHE must be on a "
                        "filesystem every node sees at the same path; docs/scale.md")
    d.add_argument("--ray-actors", type=int, default=1, metavar="N", help="teacher replicas (default 1)")
    d.add_argument("--ray-gpus-per-actor", type=float, default=0, metavar="G",
                   help="GPUs per actor (default 0; with --backend vllm: its tensor-parallel size)")
    d.add_argument("--ray-cpus-per-actor", type=float, default=1, metavar="C", help="CPUs per actor (default 1)")
    g = b.add_argument_group("generation mode (sequence-level KD, correctness)")
    g.add_argument("--generate", type=int, metavar="N",
                   help="sample N responses per prompt (prompt field or chat) and cache them instead of the records")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response length limit (default 256)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1; 0 = greedy). The cache stores temperature-1 logprobs anyway")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    g.add_argument("--verifier", metavar="SPEC",
                   help="mark responses correct against the answer field: exact, last-number, regex:PATTERN, "
                        "or package.module:function")
    f = b.add_argument_group("record fields")
    f.add_argument("--text-field", default="text")
    f.add_argument("--messages-field", default="messages")
    f.add_argument("--prompt-field", default="prompt")
    f.add_argument("--response-field", default="response")
    f.add_argument("--answer-field", default="answer")
    s = b.add_argument_group("storage (FORMAT.md)")
    s.add_argument("--values", choices=["qdelta", "fp16", "fp32", "none"], default="qdelta",
                   help="entry logprobs: quantised deltas (default, max error 0.0195 nats), fp16, fp32 (lossless), "
                        "none (--sample only)")
    s.add_argument("--logprob-step", type=float, help="qdelta step in nats (default 5/128)")
    s.add_argument("--ids", choices=["ranked", "raw"], default="ranked", help="entry ids as ranked codes (default) or raw")
    s.add_argument("--scalars", choices=["fp32", "fp16"], default="fp32", help="label logprob/entropy/tail mass dtype")
    s.add_argument("--zstd-level", type=int, default=1, help="zstd level (default 1; 19 is ~1%% smaller, much slower)")
    s.add_argument("--shard-mb", type=float, default=256, help="shard size limit in MiB (default 256)")
    s.add_argument("--row-group-positions", type=int, default=65536,
                   help="positions per Parquet row group: the unit of reading and shuffling (default 65536)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)
    q = sub.add_parser(
        "sql", help="DuckDB SQL over the views sequences and tokens",
        description="Run a DuckDB query over the cache. Views: sequences (one row per sequence: seq_id, record, "
                    "sample, input_ids, n_tokens, n_positions, n_targets, mean_entropy, teacher_nll, token_accuracy, "
                    "correct) and tokens (one row per cached position: seq_id, pos, label, label_logprob, entropy, "
                    "tail_mass, loss_mask, topk_ids, topk_logprobs, sample_counts); tables manifest (key, value) and "
                    "exactness (field, exactness, meaning). "
                    "Macros: support_entropy(lps), top1_margin(lps), sparse_kl/sparse_js/sparse_tvd(ids_p, lps_p, "
                    "ids_q, lps_q).")
    q.add_argument("cache", metavar="CACHE")
    q.add_argument("query", metavar="QUERY", help='e.g. "SELECT seq_id, mean_entropy FROM sequences WHERE correct"')
    q.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output: a table (default), CSV, or JSON (an array of row objects)")
    q.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default 40)")
    q.set_defaults(func=_sql)
    se = sub.add_parser(
        "select", help="a named subset of sequences, without copying the shards",
        description="Write a selection file: the seq ids (and optional weights) a SQL predicate or query picks, "
                    "with the cache's fingerprint and the query. A selection is accepted wherever a cache is "
                    "(info, sql, train) and refused against any other cache.")
    se.add_argument("cache", metavar="CACHE")
    how = se.add_mutually_exclusive_group(required=True)
    how.add_argument("--where", metavar="PREDICATE", help='on the sequences view, e.g. "mean_entropy < 1.5 AND correct"')
    how.add_argument("--query", metavar="SQL", help="a full query returning seq_id (and optionally weight)")
    se.add_argument("-o", "--output", required=True, metavar="SELECTION", help="selection file to write (JSON)")
    se.add_argument("--weight", metavar="EXPR", help="per-sequence weight, a SQL expression over sequences")
    se.add_argument("--fraction", type=float, help="keep this fraction, chosen by a seeded hash of seq_id")
    se.add_argument("--seed", type=int, default=0, help="seed of --fraction (default 0)")
    se.add_argument("--limit", type=int, help="keep at most this many (in query order)")
    se.add_argument("--materialize", action="store_true", help="write a standalone cache at -o instead of a selection")
    se.add_argument("--force", action="store_true", help="replace an existing selection file (not a cache)")
    se.set_defaults(func=_select)
    df = sub.add_parser(
        "diff", help="compare two caches of the same data by different teachers",
        description="Match sequences by seq_id and write per-position and per-sequence KL (both ways), JS, TVD "
                    "and top-1 agreement to DIFF/positions.parquet and DIFF/sequences.parquet. Divergences are "
                    "over the ids both caches store plus one bucket for the rest of each one's mass: exact for "
                    "that pair, lower bounds of the full-vocabulary ones (as the SQL macros).")
    df.add_argument("cache_a", metavar="CACHE_A")
    df.add_argument("cache_b", metavar="CACHE_B")
    df.add_argument("-o", "--output", required=True, metavar="DIFF", help="directory to write")
    df.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    df.set_defaults(func=_diff)
    ver = sub.add_parser("verify", help="check every shard against the manifest and the spec",
                         description="Check checksums, sizes, schema, version, counts and every decoded value "
                                     "against the invariants of FORMAT.md. Exit 1 if anything is wrong.")
    ver.add_argument("cache", help="cache directory")
    ver.add_argument("--fast", action="store_true", help="checksums, schema and counts only; skip decoding values")
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=_verify)
    from builders.score import add_subparser as add_score
    from logitstore.report import add_subparser as add_report
    from logitstore.demo import add_subparser as add_demo
    from trainers.sweep import add_subparser as add_train

    add_demo(sub)
    add_report(sub)
    add_score(sub)
    add_train(sub)
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
