"""Sweeps: several students from one cache in one command (``logitstore train --sweep FILE``).

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
checkpoint. ``run_sweep`` returns one row per run (its summary: held-out CE and KL to the teacher),
which the command line prints as a table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from logitstore.errors import InvalidInputError
from trainers.config import TrainConfig

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


def run_sweep(runs: list[tuple[str, TrainConfig]], *, skip_finished: bool = False,
              on_run: Callable[[str, TrainConfig, bool], None] | None = None) -> list[dict[str, Any]]:
    """Train ``runs`` one after another; one row per run (name, student, loss, cache and its summary).

    With ``skip_finished`` (a sweep resumed with ``--resume``), a run whose ``summary.json`` exists is not
    trained again, and a run that never started is started fresh. ``on_run(name, cfg, finished)`` is called
    before each run (the command line prints it)."""
    from trainers.loop import train

    rows = []
    for name, cfg in runs:
        done = Path(cfg.output) / "summary.json"
        finished = skip_finished and cfg.resume and done.exists()
        if on_run is not None:
            on_run(name, cfg, finished)
        if finished:
            summary = json.loads(done.read_text(encoding="utf-8"))
        else:
            if skip_finished and cfg.resume and not (Path(cfg.output) / "checkpoints").exists():
                cfg = cfg.replace(resume=False)  # a run of the sweep that has not started yet
            summary = train(cfg)
        rows.append({"run": name, "student": cfg.student, "loss": cfg.loss, "cache": cfg.cache, **summary})
    return rows
