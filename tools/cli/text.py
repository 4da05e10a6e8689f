"""Text the command line prints: aligned tables and byte sizes (the only place that formats them)."""

from __future__ import annotations

import math


def format_table(columns, rows, *, digits: int = 4, indent: str = "") -> str:
    """Rows of values as aligned text columns (floats to ``digits`` places, None as NULL)."""
    def cell(v) -> str:
        return "NULL" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    return "\n".join(indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [list(columns), *cells])


def size(n: int) -> str:
    """``n`` bytes in binary units: 512 B, 1.5 KiB, 2.0 GiB."""
    if n < 1024:
        return f"{n} B"
    e = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** e:.1f} {'BKMGT'[e]}iB"
