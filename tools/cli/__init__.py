"""The ``logitstore`` command: the top layer, the only code that imports the store, the builders and the trainers.

Subcommands: ``build``, ``score`` (``tools.cli.build``); ``info``, ``verify``, ``sql``, ``select``,
``diff``, ``merge``, ``report`` (``tools.cli.store``); ``train`` (``tools.cli.train``); ``distill``
(``tools.cli.distill``, running ``tools.distill``); ``export`` (``tools.cli.export``); ``demo``
(``tools.cli.demo``, running ``tools.demo``). Each exits 0 on success, 1 when ``verify`` finds problems, and 2 with a
one-line reason on bad input (``logitstore COMMAND: reason``). Libraries below log; only this
layer prints.
"""

from __future__ import annotations

import argparse
import sys

from logitstore.errors import LogitstoreError
from tools.cli import build, demo, distill, export, storage, store, train

#: the subcommands in the order ``--help`` lists them
REGISTER = (build.add_build, store.add_info, store.add_verify, store.add_sql, store.add_select, train.add_train,
            distill.add_distill, build.add_score, store.add_diff, store.add_merge, store.add_report, export.add_export,
            demo.add_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logitstore",
                                description="A sparse teacher-logit store for offline knowledge distillation.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    storage.add_to(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        storage.apply(args)
        return args.func(args)
    except LogitstoreError as exc:
        print(f"logitstore {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; the writers keep only what they committed
        resumable = args.command in ("build", "train", "distill")
        print(f"logitstore {args.command}: interrupted" + ("; what was committed is kept, and the same command with "
                                                          "--resume continues it" if resumable else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
