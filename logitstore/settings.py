"""Settings recorded by an older logitstore, compared with today's on resume.

A run or a build records its settings (a manifest's ``build`` record, a distill run's ``run.json``) and a
resume compares them with the new command's. Each setting added since is given a default that keeps the
behaviour before it, so a section recorded without it was made at that default: ``fill_defaults`` fills
such gaps from the dataclasses' declared defaults before the comparison. A value other than the default
still differs, since the run was not made with it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any


class Defaults(dict):
    """The declared defaults of a dataclass's fields (a dict of JSON values), and in ``nested`` those of each field that
    holds a dataclass itself (``X`` or ``X | None``), so a sub-setting added since is filled at any depth."""

    def __init__(self, values: dict[str, Any], nested: dict[str, Defaults] | None = None):
        super().__init__(values)
        self.nested = dict(nested or {})


def declared_defaults(cls: type) -> Defaults:
    """The declared defaults of a dataclass's fields, as JSON values (fields without one are left out; a default
    that JSON cannot hold becomes ``None``, so it never matches a recorded value by accident); a ``default_factory``
    counts as the value it makes. Fields typed by a dataclass get their own defaults in ``.nested``."""
    hints = typing.get_type_hints(cls)
    found, nested = {}, {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            found[f.name] = dataclasses.asdict(made) if dataclasses.is_dataclass(made) else made
        inner = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(t)]
        if len(inner) == 1:
            nested[f.name] = declared_defaults(inner[0])
    return Defaults(json.loads(json.dumps(found, default=lambda _: None)), nested)


def fill_defaults(have: dict[str, Any], want: dict[str, Any], defaults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``have`` with, in each section ``name`` of ``defaults`` that both ``have`` and ``want`` hold as dicts, the
    keys ``want`` has and ``have`` lacks set to their declared defaults; at any depth, for the sections' dataclass
    fields (``Defaults.nested``)."""
    out = dict(have)
    for name, known in defaults.items():
        old, new = have.get(name), want.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            out[name] = _fill(old, new, known)
    return out


def _fill(old: dict[str, Any], new: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    out = {**{k: known[k] for k in new if k not in old and k in known}, **old}
    for k, sub in getattr(known, "nested", {}).items():
        if isinstance(out.get(k), dict) and isinstance(new.get(k), dict):
            out[k] = _fill(out[k], new[k], sub)
    return out
