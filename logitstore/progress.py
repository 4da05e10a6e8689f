"""Progress bars for long work, in one place: builders, the diff, student scoring and verify use this.

A bar goes to stderr and only when stderr is a terminal (tqdm's ``disable=None``), so logs
and pipes stay clean; ``enabled=False`` (a ``--quiet`` flag) gives ``None``. Callers treat
``None`` as "no bar", which keeps them free of tqdm when it is off.
"""

from __future__ import annotations

import sys


def progress_bar(enabled: bool, *, desc: str, unit: str = "pos", total: int | None = None):
    """A tqdm bar, or None when ``enabled`` is false. Position counts are shown with SI prefixes."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "pos", file=sys.stderr, dynamic_ncols=True,
                disable=None)  # None: off when stderr is not a terminal
