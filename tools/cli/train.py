"""The trainers' subcommand: ``train`` (one student, or a sweep of students from one cache).

One flag per ``trainers.config.TrainConfig`` field, its help from the field's metadata, so the
command line, sweep files and the Python API fill the same dataclass. ``--sweep FILE`` trains
the runs of a sweep file (``trainers.sweep``) one after another; the end prints one table of
every run's held-out cross-entropy and KL to the teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from logitstore.errors import InvalidInputError
from tools.cli.text import format_table
from trainers.config import TrainConfig

TABLE_COLUMNS = ["run", "student", "loss", "cache", "steps", "eval_ce", "eval_kl", "eval_bpb", "seconds"]


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a student (or a sweep of students) from a cache or a selection",
        description="Train STUDENT (a model directory, or a config.json for a fresh one) on the teacher "
                    "distributions of CACHE (or a selection of it) with a sparse KD loss; writes OUT (loadable "
                    "with AutoModelForCausalLM.from_pretrained), checkpoints, metrics.jsonl and summary.json. "
                    "Runs under torchrun (python -m tools.cli train ...) for DDP. --sweep FILE trains several "
                    "students in one command.")
    add_config_arguments(p, positional_optional=True)
    p.add_argument("--sweep", metavar="FILE", help="a TOML/JSON file of runs (see trainers/sweep.py); "
                                                   "outputs go to OUT/<name>")
    p.set_defaults(func=train)


def add_config_arguments(p, *, positional_optional: bool = False, skip: tuple[str, ...] = (),
                         prefixed: tuple[str, ...] = ()) -> None:
    """One flag per ``TrainConfig`` field, its help from the field's metadata; none for the fields in ``skip``,
    and ``--train-NAME`` (dest ``train_NAME``) for those in ``prefixed`` (``distill``, whose build flags have the
    plain names). ``p`` is a parser or an argument group."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        help_ = f.metadata["help"]
        if f.metadata.get("positional"):
            p.add_argument(f.name, metavar="CACHE", nargs="?" if positional_optional else None, default="", help=help_)
            continue
        dest = f"train_{f.name}" if f.name in prefixed else f.name
        flag = "--" + dest.replace("_", "-")
        names, metavar = ([flag, "-o"], "OUT") if f.name == "output" else ([flag], f.name.upper())
        names += list(f.metadata.get("aliases", ()))
        if f.type in ("bool", bool):
            p.add_argument(*names, dest=dest, action="store_true", help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            shown = "" if f.default in ("", None) else f" (default {f.default})"
            p.add_argument(*names, dest=dest, type=typ, default=f.default, metavar=metavar, help=help_ + shown)


def config_from_args(args: argparse.Namespace, *, prefixed: tuple[str, ...] = (), **fixed) -> TrainConfig:
    """The ``TrainConfig`` of the flags (``prefixed`` as in ``add_config_arguments``), ``fixed`` fields given."""
    return TrainConfig(**{f.name: fixed[f.name] if f.name in fixed else
                          getattr(args, f"train_{f.name}" if f.name in prefixed else f.name)
                          for f in dataclasses.fields(TrainConfig)})


def train(args: argparse.Namespace) -> int:
    from trainers.sweep import load_sweep, run_sweep

    base = config_from_args(args)
    if args.sweep:
        if not base.output:
            raise InvalidInputError("--sweep needs -o OUT (runs go to OUT/<name>)")
        runs = load_sweep(args.sweep, base)
    else:
        runs = [(Path(base.output).name or "run", base.validate())]

    def announce(name: str, cfg: TrainConfig, finished: bool) -> None:
        if finished:
            print(f"train {name}: already finished ({Path(cfg.output) / 'summary.json'})", file=sys.stderr)
        elif args.sweep:
            print(f"train {name}: {cfg.student} with {cfg.loss} on {cfg.cache}", file=sys.stderr)

    rows = run_sweep(runs, skip_finished=bool(args.sweep), on_run=announce)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(TABLE_COLUMNS, [[r.get(c, "") for c in TABLE_COLUMNS] for r in rows]))
        print(f"\nmodels: {', '.join(r['output'] for r in rows)} (AutoModelForCausalLM.from_pretrained)")
    return 0
