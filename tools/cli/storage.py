"""Flags of every subcommand that reads or writes a cache in an object store (``s3://``, ``gs://``).

``--cache-dir`` and ``--cache-limit`` set the local disk cache of remote shards (``logitstore.remote``) for this
process and the processes it starts; ``--no-lock`` lets a build write to a store without conditional creates.
"""

from __future__ import annotations

import argparse

#: the subcommands that take a CACHE (or write one) and so accept URLs
READERS = ("info", "verify", "sql", "select", "train", "diff", "report", "export", "merge", "score")
WRITERS = ("build",)


def add_storage_flags(p: argparse.ArgumentParser, *, writer: bool = False) -> None:
    g = p.add_argument_group("object stores", "CACHE may be s3://BUCKET/PREFIX or gs://BUCKET/PREFIX; endpoint and "
                                              "credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                                              "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (or the GCS equivalents)")
    g.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="local disk cache of remote shards (default $LOGITSTORE_CACHE_DIR or "
                        "~/.cache/logitstore/remote)")
    g.add_argument("--cache-limit", metavar="SIZE", default=None,
                   help="size limit of that disk cache, e.g. 50G (default $LOGITSTORE_CACHE_LIMIT or 20G); least "
                        "recently used shards are evicted, never one being read")
    if writer:
        g.add_argument("--no-lock", action="store_true",
                       help="write without the build lock, for a store that does not support conditional creates "
                            "(If-None-Match); only when no other build can write the same cache")


def add_to(sub) -> None:
    """Add the flags to the registered subcommands that handle caches."""
    for name in READERS + WRITERS:
        if name in sub.choices:
            add_storage_flags(sub.choices[name], writer=name in WRITERS)


def apply(args: argparse.Namespace) -> None:
    from logitstore import remote

    remote.configure(getattr(args, "cache_dir", None), getattr(args, "cache_limit", None))
