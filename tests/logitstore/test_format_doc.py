"""FORMAT.md and logitstore/format.py describe the same format."""

import itertools
import re
from pathlib import Path

import pyarrow as pa

from logitstore import format as F
from logitstore.codec import DEFAULT_LOGPROB_STEP

DOC = (Path(__file__).resolve().parents[2] / "FORMAT.md").read_text()


def short(t: pa.DataType) -> str:
    """Arrow type as FORMAT.md writes it: list<int32>, list<list<halffloat>>, ..."""
    if pa.types.is_list(t):
        return f"list<{short(t.value_type)}>"
    return str(t)


def doc_columns() -> dict[str, set[str]]:
    cols: dict[str, set[str]] = {}
    for line in DOC.splitlines():
        m = re.match(r"\| `(\w+)` \| (.+?) \| .+ \|$", line)
        if m and "`" in m.group(2):
            cols[m.group(1)] = set(re.findall(r"`([^`]+)`", m.group(2)))
    return cols


def test_version_is_documented():
    assert f"Format version: **{F.FORMAT_VERSION}**" in DOC
    assert re.search(rf"^- \*\*{F.FORMAT_VERSION}\*\* ", DOC, re.M), "changelog entry for the current version"
    assert F.FORMAT_VERSION in F.READABLE_VERSIONS


def test_every_schema_variant_is_documented_with_its_types():
    documented = doc_columns()
    seen: dict[str, set[str]] = {}
    for rule, values, ids, scalars, tempered, policy in itertools.product(F.RULES, F.VALUE_CODECS, F.ID_CODECS,
                                                                           F.SCALAR_DTYPES, (False, True),
                                                                           (False, True)):
        if (values == "none" and (rule != "sample" or tempered)) or (tempered and rule not in F.SAMPLING_RULES):
            continue
        schema = F.shard_schema(rule=rule, value_codec=values, id_codec=ids, scalar_dtype=scalars, tempered=tempered,
                                policy=policy)
        for field in schema:
            seen.setdefault(field.name, set()).add(short(field.type))
    assert set(seen) == set(documented), "columns in code vs FORMAT.md"
    for name, types in seen.items():
        assert types == documented[name], f"{name}: code has {types}, FORMAT.md says {documented[name]}"


def test_column_order_and_meanings_come_from_one_table():
    names = [n for n, *_ in F.SEQUENCE_COLUMNS + F.POSITION_COLUMNS]
    doc_order = [n for n in doc_columns() if n in names]
    assert doc_order == names


def test_codecs_rules_and_files_are_documented():
    for word in F.RULES + F.VALUE_CODECS + F.ID_CODECS + F.SCALAR_DTYPES:
        assert f"`{word}`" in DOC or f'"{word}"' in DOC, word
    for name in (F.MANIFEST_NAME, F.ID_MAP_NAME, F.SHARD_PATTERN.format(index=0)):
        assert name in DOC, name
    assert str(DEFAULT_LOGPROB_STEP) in DOC and str(DEFAULT_LOGPROB_STEP / 2) in DOC
