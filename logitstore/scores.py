"""The scores directory of ``logitstore score``: a student's per-position view of a cache, keyed by (seq_id, pos).

``SCORES/scores.parquet`` has one row per cached position with the columns of ``SCHEMA``
(student label logprob, entropy and top-1, and divergences to the teacher over its stored
support plus one other bucket); ``SCORES/scores.json`` names the student and the cache
(by its shard checksums) and holds the summary. ``builders.score`` writes it; the trainer's
token selection (``--keep-by score:COLUMN``) reads it with ``load_scores``; SQL joins it
with the ``tokens`` view on ``(seq_id, pos)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitstore.errors import InvalidInputError

SCORES_FILE = "scores.parquet"
INFO_FILE = "scores.json"
KEYS = ("seq_id", "pos")
SCHEMA = pa.schema([
    ("seq_id", pa.string()),
    ("pos", pa.int32()),
    ("student_label_logprob", pa.float32()),
    ("student_entropy", pa.float32()),
    ("student_top1", pa.int32()),
    ("kl_teacher_student", pa.float32()),
    ("kl_student_teacher", pa.float32()),
    ("tvd", pa.float32()),
])


def load_scores(path, columns, keep: np.ndarray) -> tuple[dict, list[str]]:
    """``seq_id -> (pos [n] int64, values [n, C] float32)`` of the score ``columns`` (all when empty) for the seq
    ids in ``keep``, and the column names; ``path`` is a SCORES directory or its ``scores.parquet``."""
    p = Path(path)
    f = p / SCORES_FILE if p.is_dir() else p
    if not f.is_file():
        raise InvalidInputError(f"scores={str(path)!r}: no {SCORES_FILE} there; give the directory written by "
                                "`logitstore score`")
    have = [c for c in pq.read_schema(f).names if c not in KEYS]
    names = list(columns) or have
    bad = [c for c in names if c not in have]
    if bad:
        raise InvalidInputError(f"score_columns {bad} are not in {f}; available: {have}")
    t = pq.read_table(f, columns=[*KEYS, *names])
    t = t.filter(pc.is_in(t.column("seq_id"), value_set=pa.array(keep.tolist(), pa.string())))
    t = t.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
    sid = t.column("seq_id").to_numpy(zero_copy_only=False)
    pos = t.column("pos").to_numpy().astype(np.int64)
    vals = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in names], 1) \
        if len(t) else np.zeros((0, len(names)), np.float32)
    cut = np.r_[0, np.flatnonzero(sid[1:] != sid[:-1]) + 1, sid.size] if sid.size else np.zeros(1, np.int64)
    return {sid[a]: (pos[a:b], vals[a:b]) for a, b in zip(cut[:-1], cut[1:])}, names
