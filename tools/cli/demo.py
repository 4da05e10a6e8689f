"""The ``demo`` subcommand: the whole loop on the embedded teacher, offline (``tools.demo`` does the work)."""

from __future__ import annotations

import argparse


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole loop on the embedded teacher, offline (build, inspect, train)",
                       description="Build caches from the shipped dataset with the embedded SmolLM2-135M "
                                   "teacher, inspect them with SQL, select subsets and train students from one "
                                   "cache; about 9 minutes on 2 CPU cores, --quick about 2.")
    p.add_argument("-o", "--output", default="logitstore-demo", help="directory for everything (default "
                                                                       "./logitstore-demo); caches are reused")
    p.add_argument("--quick", action="store_true", help="less data and fewer steps (about 2 minutes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tools.demo import run as run_demo

    return run_demo(args)
