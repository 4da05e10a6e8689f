"""``logitstore train``: one student, or a sweep of students from one cache in one command.

A sweep file (TOML or JSON) lists runs; each is a set of ``TrainConfig`` options
(the command-line flags with ``_`` for ``-``) over shared defaults::

    [defaults]                 # override the command line's values
    max_steps = 200
    holdout = 0.1

    [[runs]]
    name = "small-fkl"         # trained into OUT/small-fkl
    student = "configs/small.json"
    loss = "forward_kl"

    [[runs]]
    name = "tiny-jsd-correct"
    student = "configs/tiny.json"
    loss = "jsd"
    cache = "correct.selection.json"   # a selection of the same cache

Runs train one after another into ``OUT/<name>``; with ``--resume`` a finished run
(``summary.json`` present) is skipped and an interrupted one continues from its last
checkpoint. The end prints one table: each run's held-out CE and KL to the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from logitstore.errors import InvalidInputError
from trainers.config import TrainConfig, add_arguments, from_args

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_sweep(path: str | Path, base: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) per run of the sweep file, each validated; outputs are ``base.output/<name>``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            d = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise InvalidInputError(f"--sweep {p}: TOML sweep files need Python 3.11 or later; write it as "
                                        ".json instead") from None
            d = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"--sweep {p}: cannot read ({exc})") from exc
    if not isinstance(d, dict) or not isinstance(d.get("runs"), list) or not d["runs"]:
        raise InvalidInputError(f"--sweep {p}: needs a non-empty 'runs' list (and optionally 'defaults')")
    defaults = d.get("defaults", {})
    out, seen, runs = Path(base.output), set(), []
    for i, run in enumerate(d["runs"]):
        if not isinstance(run, dict):
            raise InvalidInputError(f"--sweep {p}: run {i} is not a table of options")
        run = dict(run)
        name = str(run.pop("name", f"run{i}"))
        if not _NAME.match(name) or name in seen:
            raise InvalidInputError(f"--sweep {p}: run {i} name {name!r} must be unique, of letters, digits, . _ -")
        seen.add(name)
        if "output" in run:
            raise InvalidInputError(f"--sweep {p}: run {name} sets 'output'; runs go to -o OUT/<name>")
        merged = {**base.to_dict(), **defaults, **run, "output": str(out / name)}
        cfg = TrainConfig.from_dict(merged, where=f"--sweep {p} run {name}")
        runs.append((name, cfg.validate()))
    return runs


def add_subparser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a student (or a sweep of students) from a cache or a selection",
        description="Train STUDENT (a model directory, or a config.json for a fresh one) on the teacher "
                    "distributions of CACHE (or a selection of it) with a sparse KD loss; writes OUT (loadable "
                    "with AutoModelForCausalLM.from_pretrained), checkpoints, metrics.jsonl and summary.json. "
                    "Runs under torchrun for DDP. --sweep FILE trains several students in one command.")
    add_arguments(p, positional_optional=True)
    p.add_argument("--sweep", metavar="FILE", help="a TOML/JSON file of runs (see trainers/sweep.py); "
                                                   "outputs go to OUT/<name>")
    p.set_defaults(func=run)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from logitstore.cli import format_table

    cols = ["run", "student", "loss", "cache", "steps", "eval_ce", "eval_kl", "seconds"]
    print(format_table(cols, [[r.get(c, "") for c in cols] for r in rows]))


def run(args: argparse.Namespace) -> int:
    from trainers.loop import train

    base = from_args(args)
    if args.sweep:
        if not base.output:
            raise InvalidInputError("--sweep needs -o OUT (runs go to OUT/<name>)")
        runs = load_sweep(args.sweep, base)
    else:
        runs = [(Path(base.output).name or "run", base.validate())]
    rows = []
    for name, cfg in runs:
        done = Path(cfg.output) / "summary.json"
        if args.sweep and cfg.resume and done.exists():
            summary = json.loads(done.read_text())
            print(f"train {name}: already finished ({done})", file=sys.stderr)
        else:
            if args.sweep:
                print(f"train {name}: {cfg.student} with {cfg.loss} on {cfg.cache}", file=sys.stderr)
            if args.sweep and cfg.resume and not (Path(cfg.output) / "checkpoints").exists():
                cfg = cfg.replace(resume=False)  # a run of the sweep that has not started yet
            summary = train(cfg)
        rows.append({"run": name, "student": cfg.student, "loss": cfg.loss, "cache": cfg.cache, **summary})
    if int(os.environ.get("RANK", "0")) == 0:
        _print_table(rows)
        print(f"\nmodels: {', '.join(r['output'] for r in rows)} (AutoModelForCausalLM.from_pretrained)")
    return 0
