"""JSON that a user can edit, read without surprises: every way a document fails to decode is one error.

``json.loads`` raises ``JSONDecodeError`` on bad syntax, but ``RecursionError`` on a document nested
too deeply (100,000 ``[``), ``ValueError`` on an integer of more than 4,300 digits, and
``UnicodeDecodeError`` on bytes that are not UTF-8. Manifests, selections, lock files, sweep files
and the metadata of saved datasets are all such documents; ``loads`` and ``read_json`` turn each of
these failures into the one error class the caller names (``CorruptCacheError`` for a manifest,
``InvalidInputError`` for a selection), with a message that says which file and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from logitstore.errors import LogitstoreError


def decode_problem(exc: BaseException) -> str:
    """What is wrong with a document ``json.loads`` refused with ``exc``, in words."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return " ".join(str(exc).split()).split(";")[0]  # an integer past the digit limit, ...


def loads(data: str | bytes, where: str, error: type[LogitstoreError]) -> Any:
    """``json.loads(data)``, or ``error("WHERE: not valid JSON (why)")``."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (RecursionError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{where}: not valid JSON ({decode_problem(exc)})") from None


def read_json(path: str | os.PathLike, error: type[LogitstoreError], *, what: str = "") -> Any:
    """The JSON document in the file ``path``; ``error`` when it cannot be read or decoded (a directory, a
    missing file, bad syntax, too deep, a huge integer). ``what`` names the file's role in the message."""
    p = Path(path)
    where = f"{what} {p}" if what else str(p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror or exc})") from None
    return loads(data, where, error)
