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
from typing import Any


def declared_defaults(cls: type) -> dict[str, Any]:
    """The declared defaults of a dataclass's fields, as JSON values (fields without one are left out; a default
    that JSON cannot hold becomes ``None``, so it never matches a recorded value by accident)."""
    found = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return json.loads(json.dumps(found, default=lambda _: None))


def fill_defaults(have: dict[str, Any], want: dict[str, Any], defaults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``have`` with, in each section ``name`` of ``defaults`` that both ``have`` and ``want`` hold as dicts, the
    keys ``want`` has and ``have`` lacks set to their declared defaults."""
    out = dict(have)
    for name, known in defaults.items():
        old, new = have.get(name), want.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            out[name] = {**{k: known[k] for k in new if k not in old and k in known}, **old}
    return out
