"""Fuzzing the reader and ``verify`` with damaged caches: only documented errors, no crash, no hang, and never
a wrong value.

Hypothesis mutates the files of a small sound cache (bit flips, byte overwrites, truncation, insertion,
deletion, whole-file garbage; shards, the id map and the manifest's bytes) and edits the manifest's JSON
(any value replaced by any JSON value, or a key dropped). Every read path (iteration, random access, the
scalar columns) must then either raise a ``LogitstoreError`` or return exactly what the sound cache returns;
``verify`` must never raise, and must name a damaged shard or id map. A hard per-example time limit turns a
hang into a failure. (Round trips of the codec itself are property-tested in ``test_codec.py``; the soak
script ``tools/soak.py`` runs the same checks under atheris for longer.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitstore
from logitstore import Codec, MassTopK
from logitstore.errors import LogitstoreError
from logitstore.verify import verify
from tests.conftest import make_sequences, write_cache, write_manifest
from tools.soak import sequence_values  # the one "every decoded value of a sequence" of the soak and the fuzz tests

EXAMPLE_LIMIT_S = 20  # per example; a sound read of this cache takes ~20 ms
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``Hang`` in this (the main) thread after ``seconds``: a read that never returns fails the example."""
    def alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_everything(path) -> dict:
    """Every value the reader hands out, through each access path; a path that fails gives its error."""
    out: dict = {}
    try:
        cache = logitstore.open(path)
    except LogitstoreError as exc:
        return {"open": exc}
    try:
        out["iter"] = {s.seq_id: sequence_values(s) for s in cache}
    except LogitstoreError as exc:
        out["iter"] = exc
    try:
        out["scalars"] = cache.scalars().to_pylist()
    except LogitstoreError as exc:
        out["scalars"] = exc
    try:
        out["lookup"] = {sid: sequence_values(cache[sid]) for sid in sorted(cache.index)[::3]}
    except LogitstoreError as exc:
        out["lookup"] = exc
    return out


class Fuzzed:
    """A sound cache, the files of a work copy to damage, and what the sound cache reads as."""

    def __init__(self, root):
        rng = np.random.default_rng(77)
        refs = make_sequences(rng, 10, vocab=300, rule=MassTopK(0.9, 12), max_tokens=24, mask_prob=0.2)
        self.sound = root / "sound"
        write_cache(self.sound, refs, vocab=300, rule=MassTopK(0.9, 12), codec=Codec(), shard_bytes=2500,
                    row_group_positions=40)
        self.files = {p.relative_to(self.sound).as_posix(): p.read_bytes()
                      for p in sorted(self.sound.rglob("*")) if p.is_file()}
        assert sum(f.startswith("shards/") for f in self.files) >= 2 and "id_map.parquet" in self.files
        self.work = root / "work"
        shutil.copytree(self.sound, self.work)
        self.want = read_everything(self.sound)
        assert all(not isinstance(v, Exception) for v in self.want.values()) and len(self.want["iter"]) == 10

    def restore(self) -> None:
        for name, data in self.files.items():
            p = self.work / name
            if not p.is_file() or p.read_bytes() != data:
                p.write_bytes(data)

    def check(self, damaged: str | None) -> str:
        """Read the work copy; return "error" or "same" (a wrong value fails the test)."""
        with time_limit(EXAMPLE_LIMIT_S):
            got = read_everything(self.work)
            problems = verify(self.work)  # never raises
        outcome = "same"
        for key, value in got.items():
            if isinstance(value, Exception):
                outcome = "error"
            else:
                assert value == self.want[key], f"{key} returned values that differ from the sound cache"
        if damaged is not None:  # a changed shard or id map is always reported, by name
            assert any(damaged in p.file or damaged in p.message for p in problems), problems
        return outcome


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    return Fuzzed(tmp_path_factory.mktemp("fuzz"))


# ---------------------------------------------------------------- byte-level damage

FRACTION = st.floats(0, 1, exclude_max=True)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), FRACTION, st.integers(0, 7)),
    st.tuples(st.just("set"), FRACTION, st.integers(0, 255)),
    st.tuples(st.just("overwrite"), FRACTION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), FRACTION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), FRACTION, st.integers(1, 64)),
    st.tuples(st.just("truncate"), FRACTION),
    st.tuples(st.just("garbage"), st.binary(max_size=2048)),  # a whole random file
)


def mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for m in mutations:
        op, at = m[0], int(m[1] * len(b)) if len(m) > 1 and isinstance(m[1], float) else 0
        if op == "garbage":
            b = bytearray(m[1])
        elif not b:
            continue
        elif op == "flip":
            b[at] ^= 1 << m[2]
        elif op == "set":
            b[at] = m[2]
        elif op == "overwrite":
            b[at:at + len(m[2])] = m[2]
        elif op == "insert":
            b[at:at] = m[2]
        elif op == "delete":
            del b[at:at + m[2]]
        elif op == "truncate":
            del b[at:]
    return bytes(b)


TARGETS = ["shards/shard-000000.parquet", "shards/shard-000001.parquet", "id_map.parquet", "manifest.json"]


@settings(max_examples=160, **SETTINGS)
@given(target=st.sampled_from(TARGETS), mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_damaged_files_raise_or_read_exactly(fuzzed, target, mutations):
    fuzzed.restore()
    data = mutate(fuzzed.files[target], mutations)
    (fuzzed.work / target).write_bytes(data)
    damaged = None if target == "manifest.json" or data == fuzzed.files[target] else target
    outcome = fuzzed.check(damaged)
    if damaged and target.startswith("shards/") and len(data) != len(fuzzed.files[target]):
        assert outcome == "error"  # a shard of another size is refused by the reader itself


def test_footer_bit_flips(fuzzed):
    """A seeded sample of bit flips in a shard's footer, which no checksum covers (the soak script flips every
    bit of it): each is refused or changes nothing that is read."""
    name = "shards/shard-000001.parquet"
    orig = fuzzed.files[name]
    start = len(orig) - 8 - int.from_bytes(orig[-8:-4], "little")
    rng = np.random.default_rng(5)
    outcomes = {"error": 0, "same": 0}
    for at, bit in zip(rng.choice(np.arange(start, len(orig)), 250, replace=False), rng.integers(0, 8, 250)):
        fuzzed.restore()
        data = bytearray(orig)
        data[at] ^= 1 << int(bit)
        (fuzzed.work / name).write_bytes(bytes(data))
        outcomes[fuzzed.check(name)] += 1
    assert outcomes["error"] > outcomes["same"] > 0, outcomes  # most flips refused; the rest change nothing read


# ---------------------------------------------------------------- edited manifests

JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["../x.parquet", "/etc/passwd", "shards/shard-000000.parquet",
                                               "qdelta", "fp32", "topk", "mass", "sample"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every key path into a JSON document."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@settings(max_examples=120, **SETTINGS)
@given(which=st.integers(0, 10**6), value=JSON_VALUE, drop=st.booleans(), sign=st.booleans())
def test_edited_manifests_raise_or_read_exactly(fuzzed, which, value, drop, sign):
    """An edit by hand (``sign`` false: the checksum no longer matches) or a consistent rewrite (``sign``: the
    checksum recomputed, so the reader's own checks of every value are what stand between it and a wrong read)."""
    fuzzed.restore()
    doc = json.loads(fuzzed.files["manifest.json"])
    paths = _paths(doc)[1:]
    path = paths[which % len(paths)]
    edited = copy.deepcopy(doc)
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    write_manifest(fuzzed.work, edited, sign=sign)
    fuzzed.check(None)
