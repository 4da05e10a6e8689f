"""``logitstore.verify``: silent on sound caches, and each kind of damage named with the file it is in;
the reader refuses damaged shards and unknown format versions instead of returning wrong data."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore import Codec, CorruptCacheError, FormatVersionError, MassTopK, Sampled, TopK
from logitstore.verify import Problem, verify
from tests.conftest import (
    CODECS,
    make_sequences,
    read_manifest,
    rewrite_shard,
    set_column,
    shard_files,
    write_cache,
    write_manifest,
)

SHARD1 = "shards/shard-000001.parquet"


@pytest.fixture
def cache(ranked_cache, tmp_path):
    """A private copy of the shared multi-shard cache, free to damage."""
    c = ranked_cache.copy_to(tmp_path / "c")
    assert len(shard_files(c.path)) >= 3
    return c


def _files(problems: list[Problem]) -> set[str]:
    return {p.file for p in problems}


# ---------------------------------------------------------------- sound caches


@pytest.mark.parametrize("codec_name", sorted(CODECS))
@pytest.mark.parametrize("rule", [TopK(6), MassTopK(0.7, 10), Sampled(24, 10)], ids=["topk", "mass", "sample"])
def test_fresh_caches_verify_clean(tmp_path, codec_name, rule):
    rng = np.random.default_rng(17)
    refs = make_sequences(rng, 8, vocab=500, rule=rule, max_tokens=20, mask_prob=0.2)
    write_cache(tmp_path / "c", refs, vocab=500, rule=rule, codec=CODECS[codec_name], shard_bytes=4000,
                row_group_positions=20)
    assert verify(tmp_path / "c") == []
    assert verify(tmp_path / "c", deep=False) == []


def test_shared_caches_verify_clean(ranked_cache, raw_fp32_cache, sampled_cache):
    for c in (ranked_cache, raw_fp32_cache, sampled_cache):
        assert verify(c.path) == []


def test_progress_callback(ranked_cache):
    calls = []
    verify(ranked_cache.path, progress=lambda i, n: calls.append((i, n)))
    n = len(shard_files(ranked_cache.path))
    assert calls == [(i, n) for i in range(n)]


def test_fp16_cache_at_the_documented_bound_verifies_clean(tmp_path):
    lp = -(4 + 0.99 * 2.0**-9)  # fp16 rounds it to -4.0: error 0.00193 <= 2^-11 * |lp| = 0.00195
    with logitstore.CacheWriter(tmp_path / "c", vocab_size=10, rule=TopK(1), codec=Codec(values="fp16")) as w:
        w.add(logitstore.SequenceRecord(input_ids=[0, 1], scored=logitstore.Scored(
            ids=[[1]], logprobs=[[lp]], label_logprob=[lp], entropy=[1.0], tail_mass=[1 - math.exp(lp)])))
    s = logitstore.open(tmp_path / "c")[logitstore.sequence_id(np.array([0, 1]))]
    assert abs(float(s.logprobs[0, 0]) - lp) <= 2.0**-11 * abs(lp)  # within FORMAT.md's bound
    assert verify(tmp_path / "c") == []


# ---------------------------------------------------------------- damaged shards


def test_flipped_byte_is_caught_and_named(cache):
    f = cache.path / SHARD1
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    for deep in (True, False):
        problems = verify(cache.path, deep=deep)
        assert _files(problems) == {SHARD1}
        assert "sha256" in problems[0].message
        assert str(problems[0]).startswith(SHARD1 + ": ")


def test_truncated_shard(cache):
    f = cache.path / SHARD1
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    problems = verify(cache.path)
    assert _files(problems) == {SHARD1}
    assert f"size {len(data) - 100} bytes" in problems[0].message and str(len(data)) in problems[0].message
    with pytest.raises(CorruptCacheError, match="shard-000001"):
        list(logitstore.open(cache.path))


def test_missing_shard(cache):
    (cache.path / SHARD1).unlink()
    problems = verify(cache.path)
    assert [(p.file, p.message) for p in problems] == [(SHARD1, "missing")]


@pytest.mark.parametrize("name,word", [("notes.txt", "stray"), (".shard-000009.parquet.tmp", "temporary"),
                                       ("shard-000099.parquet", "stray")])
def test_extra_file_in_shards(cache, name, word):
    (cache.path / "shards" / name).write_bytes(b"x" * 10)
    problems = verify(cache.path)
    assert [p.file for p in problems] == [f"shards/{name}"]
    assert word in problems[0].message


# ---------------------------------------------------------------- damaged manifest


@pytest.mark.parametrize("key,word", [("positions", "positions"), ("entries", "entries"), ("targets", "targets"),
                                      ("sequences", "sequences"), ("bytes", "size"), ("sha256", "sha256")])
def test_edited_manifest_counts(cache, key, word):
    m = read_manifest(cache.path)
    info = m["shards"][1]
    info[key] = "0" * 64 if key == "sha256" else info[key] + 1
    write_manifest(cache.path, m)
    problems = verify(cache.path)
    in_totals = key not in ("sha256", "bytes")  # the manifest's derived counts no longer add up either
    assert _files(problems) == ({SHARD1, "manifest.json"} if in_totals else {SHARD1})
    shard_problems = [p for p in problems if p.file == SHARD1]
    assert len(shard_problems) == 1 and word in shard_problems[0].message
    if key in ("positions", "entries", "targets"):
        assert "manifest says " + "/".join(str(info[k]) for k in ("positions", "entries", "targets")) \
            in shard_problems[0].message
    if in_totals:  # the reader refuses the edited manifest outright
        assert any("totals" in p.message for p in problems if p.file == "manifest.json")
        with pytest.raises(CorruptCacheError, match="totals"):
            logitstore.open(cache.path)


def test_truncated_manifest(cache):
    f = cache.path / "manifest.json"
    f.write_bytes(f.read_bytes()[:200])
    problems = verify(cache.path)
    assert [p.file for p in problems] == ["manifest.json"]
    assert "JSON" in problems[0].message
    with pytest.raises(CorruptCacheError):
        logitstore.open(cache.path)


@pytest.mark.parametrize("version,advice", [(0, "rebuild"), (99, "upgrade")])
def test_unknown_format_version_is_refused(cache, version, advice):
    m = read_manifest(cache.path)
    m["format_version"] = version
    write_manifest(cache.path, m)
    with pytest.raises(FormatVersionError, match=f"format_version {version}") as exc:
        logitstore.open(cache.path)
    assert advice in str(exc.value)
    problems = verify(cache.path)
    assert len(problems) == 1 and f"format_version {version}" in problems[0].message


@pytest.mark.parametrize("edit,word", [
    (lambda m: m.update(format="parquet"), "format"),
    (lambda m: m["shards"][0].update(file="../elsewhere.parquet"), "outside"),
    # paths that leave the cache directory, however spelled, and for the id map too
    (lambda m: m["shards"][0].update(file="/etc/passwd"), "outside"),
    (lambda m: m["shards"][1].update(file="shards/../../elsewhere.parquet"), "outside"),
    (lambda m: m["shards"][1].update(file="shards\\..\\..\\elsewhere.parquet"), "outside"),
    (lambda m: m["shards"][1].update(file="C:/elsewhere.parquet"), "outside"),
    (lambda m: m["id_map"].update(file="/etc/passwd"), "outside"),
    (lambda m: m["id_map"].update(file="../id_map.parquet"), "outside"),
    (lambda m: m.update(surprise=1), "unknown keys"),
    (lambda m: m.pop("vocab_size"), "missing keys"),
    (lambda m: m.pop("shards"), "missing keys"),  # would otherwise read as an empty cache
    # values of the wrong type or out of range, by name
    (lambda m: m.update(vocab_size=-1), "vocab_size"),
    (lambda m: m["shards"][0].update(sequences="3"), "sequences"),
    (lambda m: m["shards"][0].update(sha256=None), "sha256"),
    (lambda m: m["codec"].update(values="zip"), "codec"),
    (lambda m: m["rule"].update(k="many"), "rule"),
    (lambda m: m.update(shards={"a": 1}), "shard"),
    (lambda m: m.update(complete="yes"), "complete"),
    (lambda m: m["shards"][0].update(file="."), "outside"),  # once an IndexError in the path check
    (lambda m: m["shards"][0].update(file=""), "outside"),
    (lambda m: m.pop("totals"), "totals"),  # required from format version 2
])
def test_malformed_manifest(cache, edit, word):
    m = read_manifest(cache.path)
    edit(m)
    write_manifest(cache.path, m)
    with pytest.raises(CorruptCacheError, match=word):
        logitstore.open(cache.path)
    assert [p.file for p in verify(cache.path)] == ["manifest.json"]


# ---------------------------------------------------------------- hand edits: the manifest checksum


HAND_EDITS = {
    "totals deleted": lambda m: m.pop("totals"),
    "tokenizer.vocab_size changed": lambda m: m["tokenizer"].update(vocab_size=m["tokenizer"].get("vocab_size", 7) + 1),
    "teacher revision changed": lambda m: m["teacher"].update(revision="sha256-0000000000000000"),
    "complete set to false": lambda m: m.update(complete=False),
    "checksum deleted": lambda m: m.pop("checksum"),
}


@pytest.mark.parametrize("edit", list(HAND_EDITS.values()), ids=list(HAND_EDITS))
def test_a_hand_edited_manifest_is_refused_by_every_command(cache, edit, tmp_path, capsys):
    """A manifest edited by hand (its checksum no longer matches, or is gone) is refused by the reader, reported
    by verify, and every command exits 2 with one line naming the file, instead of describing a cache that is not
    what was built."""
    from tools.cli import main

    m = read_manifest(cache.path)
    edit(m)
    write_manifest(cache.path, m, sign=False)
    with pytest.raises(CorruptCacheError, match="edited or damaged"):
        logitstore.open(cache.path)
    problems = verify(cache.path)
    assert [p.file for p in problems] == ["manifest.json"] and "edited or damaged" in problems[0].message
    for argv in (["info", str(cache.path)], ["sql", str(cache.path), "SELECT count(*) FROM sequences"],
                 ["select", str(cache.path), "--where", "true", "-o", str(tmp_path / "s.json")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"logitstore {argv[0]}: ") and "manifest.json" in err, err
    assert main(["verify", "-q", str(cache.path)]) == 1
    assert "FAIL manifest.json" in capsys.readouterr().out
    assert not (tmp_path / "s.json").exists()


def _downgrade_to_version_1(path):
    """Rewrite a cache as logitstore 0.1 wrote it: shards that describe themselves as format version 1, a
    manifest of version 1 without a checksum."""
    m = read_manifest(path)
    for s in m["shards"]:
        f = path / s["file"]
        t = pq.read_table(f)
        meta = json.loads(t.schema.metadata[b"logitstore"])
        meta["format_version"] = 1
        t = t.replace_schema_metadata({b"logitstore": json.dumps(meta).encode()})
        pq.write_table(t, f, compression="zstd", use_dictionary=False, write_page_checksum=True)
        s["bytes"] = f.stat().st_size
        s["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    m["format_version"] = 1
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    write_manifest(path, m, sign=False)
    m.pop("checksum", None)
    (path / "manifest.json").write_text(json.dumps(m, indent=1))


def test_a_version_1_cache_stays_readable_and_is_not_resumed(cache):
    _downgrade_to_version_1(cache.path)
    assert "checksum" not in read_manifest(cache.path)
    got = {s.seq_id: s for s in logitstore.open(cache.path)}
    assert sorted(got) == sorted(r.seq_id for r in cache.refs)
    for r in cache.refs:
        np.testing.assert_array_equal(got[r.seq_id].input_ids, r.input_ids)
    assert verify(cache.path) == []
    with pytest.raises(FormatVersionError, match="format_version 1 cache and this logitstore writes version 2"):
        logitstore.CacheWriter(cache.path, vocab_size=cache.vocab, rule=cache.rule, codec=cache.codec,
                               resume=True).open()
    assert read_manifest(cache.path)["format_version"] == 1 and "checksum" not in read_manifest(cache.path)


def test_a_shard_entry_dropped_from_the_manifest(cache):
    """Without its entry a shard would silently vanish from the cache: the totals, derived from the shard list,
    no longer add up, so the reader refuses the manifest and verify names it (and the unlisted file)."""
    m = read_manifest(cache.path)
    del m["shards"][1]
    write_manifest(cache.path, m)
    with pytest.raises(CorruptCacheError, match="totals"):
        logitstore.open(cache.path)
    problems = verify(cache.path)
    # and the next shard, now listed at index 1, says it is shard 2
    assert _files(problems) == {"manifest.json", SHARD1, "shards/shard-000002.parquet"}
    assert any("totals" in p.message for p in problems) and any("stray" in p.message for p in problems)


def test_an_edited_codec_is_never_decoded_with_the_wrong_step(cache):
    """Each shard describes its own codec: a manifest whose logprob_step (consistently everywhere in it) was
    edited would decode every logprob wrongly; the reader compares and refuses."""
    m = read_manifest(cache.path)
    m["codec"]["logprob_step"] = 0.05
    write_manifest(cache.path, m)
    c = logitstore.open(cache.path)
    with pytest.raises(CorruptCacheError, match="self-description"):
        list(c)
    assert _files(verify(cache.path)) == {f"shards/shard-{i:06d}.parquet" for i in range(len(m["shards"]))}


def test_a_shard_of_the_right_size_in_the_wrong_place(cache):
    """Two shard entries swapped in the manifest (every count, size and checksum still right): each shard knows
    its index, so the manifest's order, the order of reading, is checked."""
    m = read_manifest(cache.path)
    m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]
    write_manifest(cache.path, m)
    with pytest.raises(CorruptCacheError, match="self-description"):
        list(logitstore.open(cache.path))


def test_id_map_damage(cache):
    f = cache.path / "id_map.parquet"
    t = pq.read_table(f)
    ids = t.column("token_id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]  # still a permutation, but not the one the codes were written with
    pq.write_table(set_column(t, "token_id", ids), f)
    with pytest.raises(CorruptCacheError, match="checksum"):
        logitstore.open(cache.path)
    assert [p.file for p in verify(cache.path)] == ["manifest.json"]


# ---------------------------------------------------------------- the reader on damaged bytes


def _overwrite_column_chunk(f, column: str, header: bool):
    """Overwrite the page header or the compressed page body of ``column`` in row group 0 with 0xFF."""
    md = pq.ParquetFile(f).metadata
    rg = md.row_group(0)
    cc = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == column)
    a = cc.data_page_offset
    a, z = (a, a + 8) if header else (a + 40, a + cc.total_compressed_size)
    data = bytearray(f.read_bytes())
    data[a:z] = b"\xff" * (z - a)
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("column", ["topk_logprob_deltas.list.element.list.element", "entropy.list.element",
                                    "topk_codes.list.element.list.element"])
@pytest.mark.parametrize("header", [True, False], ids=["page-header", "page-body"])
def test_reader_raises_corrupt_cache_error_on_damaged_pages(cache, column, header):
    f = cache.path / SHARD1
    _overwrite_column_chunk(f, column, header)
    c = logitstore.open(cache.path)
    with pytest.raises(CorruptCacheError, match="shard-000001"):
        list(c)
    first_in_shard1 = pq.read_table(f, columns=["seq_id"]).column(0)[0].as_py()
    with pytest.raises(CorruptCacheError):
        logitstore.open(cache.path)[first_in_shard1]
    assert _files(verify(cache.path)) == {SHARD1}


def test_reader_scalars_on_damaged_scalar_column(cache):
    _overwrite_column_chunk(cache.path / SHARD1, "seq_id", header=True)
    with pytest.raises(CorruptCacheError):
        logitstore.open(cache.path).scalars(["seq_id"])


def test_reader_on_damaged_footer_names(cache):
    f = cache.path / SHARD1
    data = bytearray(f.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    i = data.index(b"n_positions", start)  # a column name in the footer's schema
    data[i:i + 2] = b"\xff\xfe"
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError):
        list(logitstore.open(cache.path))


def test_position_beyond_the_tokens_of_the_last_row(cache):
    def edit(t):
        pos = t.column("pos").to_pylist()
        n_tok = t.column("n_tokens").to_pylist()
        last = max(i for i in range(len(pos)) if pos[i])
        pos[last][-1] = n_tok[last] + 3
        return set_column(t, "pos", pos)

    idx = next(i for i, f in enumerate(shard_files(cache.path))
               if pq.read_table(f, columns=["n_positions"]).column(0).to_pylist()[-1] > 0)
    # only the last row group of a shard ends at the end of its input_ids
    rewrite_shard(cache.path, idx, edit)
    problems = verify(cache.path)
    assert problems and "positions" in problems[0].message


# ---------------------------------------------------------------- values that break the spec (checksums fixed up)


def _first_row_with_positions(t, k=1):
    return next(i for i, n in enumerate(t.column("n_positions").to_pylist()) if n >= k)


def test_deep_check_mean_entropy(cache):
    def edit(t):
        me = t.column("mean_entropy").to_pylist()
        i = next(i for i, v in enumerate(me) if v is not None)
        me[i] += 0.5
        return set_column(t, "mean_entropy", me)

    rewrite_shard(cache.path, 1, edit)
    problems = verify(cache.path)
    assert _files(problems) == {SHARD1} and "mean_entropy" in problems[0].message
    assert verify(cache.path, deep=False) == []  # the fast mode checks checksums and counts only


def test_deep_check_n_positions(cache):
    def edit(t):
        n = t.column("n_positions").to_pylist()
        n[0] += 1
        return set_column(t, "n_positions", n)

    rewrite_shard(cache.path, 1, edit)
    problems = verify(cache.path)
    assert _files(problems) == {SHARD1} and "n_positions" in problems[0].message


@pytest.mark.parametrize("value,word", [(math.log(700) + 1, "entropy"), (-0.5, "entropy")])
def test_deep_check_entropy_range(cache, value, word):
    def edit(t):
        e = t.column("entropy").to_pylist()
        e[_first_row_with_positions(t)][0] = value
        return set_column(t, "entropy", e)

    rewrite_shard(cache.path, 0, edit)
    problems = verify(cache.path)
    assert _files(problems) == {"shards/shard-000000.parquet"}
    assert any(word in p.message for p in problems)


def test_deep_check_mass_plus_tail(cache):
    def edit(t):
        tm = t.column("tail_mass").to_pylist()
        i = _first_row_with_positions(t)
        tm[i][0] = 1.0 if tm[i][0] < 0.5 else 0.0
        return set_column(t, "tail_mass", tm)

    rewrite_shard(cache.path, 2, edit)
    problems = verify(cache.path)
    assert any("tail_mass" in p.message for p in problems)
    assert _files(problems) == {"shards/shard-000002.parquet"}


def test_deep_check_duplicate_and_unsorted_entries(raw_fp32_cache, tmp_path):
    c = raw_fp32_cache.copy_to(tmp_path / "dup")

    def dup(t):
        ids = t.column("topk_ids").to_pylist()
        ids[0][0][1] = ids[0][0][0]
        return set_column(t, "topk_ids", ids)

    rewrite_shard(c.path, 0, dup)
    assert any("same token id twice" in p.message for p in verify(c.path))

    c = raw_fp32_cache.copy_to(tmp_path / "unsorted")

    def swap(t):
        lp = t.column("topk_logprobs").to_pylist()
        lp[0][0][0], lp[0][0][1] = lp[0][0][1], lp[0][0][0] - 1.0
        return set_column(t, "topk_logprobs", lp)

    rewrite_shard(c.path, 0, swap)
    assert any("not sorted" in p.message for p in verify(c.path))


def test_deep_check_self_description(cache):
    def edit(t):
        meta = json.loads(t.schema.metadata[b"logitstore"])
        meta["codec"]["values"] = "fp32"
        return t.replace_schema_metadata({b"logitstore": json.dumps(meta).encode()})

    rewrite_shard(cache.path, 1, edit)
    problems = verify(cache.path)
    assert _files(problems) == {SHARD1} and "self-description" in problems[0].message


def test_deep_check_counts_zero(sampled_cache, tmp_path):
    c = sampled_cache.copy_to(tmp_path / "c")

    def edit(t):
        cnt = t.column("sample_counts").to_pylist()
        cnt[_first_row_with_positions(t)][0][0] = 0
        return set_column(t, "sample_counts", cnt)

    rewrite_shard(c.path, 0, edit)
    assert any("sample_counts" in p.message for p in verify(c.path))


def test_deep_check_counts_beyond_draws_at_one_position(sampled_cache, tmp_path):
    c = sampled_cache.copy_to(tmp_path / "c")
    draws = sampled_cache.rule.draws

    def edit(t):
        cnt = t.column("sample_counts").to_pylist()
        row = cnt[_first_row_with_positions(t)]
        row[0][0] += draws  # this position now sums to more than draws; the block total stays small
        return set_column(t, "sample_counts", cnt)

    rewrite_shard(c.path, 0, edit)
    assert any("sample_counts" in p.message for p in verify(c.path))


def test_counts_premise_of_the_per_position_test(sampled_cache):
    """The premise of the test above: in shard 0 of a sound sampled cache every position sums to at most
    draws, and the shard as a whole falls short of positions * draws by more than draws."""
    draws = sampled_cache.rule.draws
    t = pq.read_table(shard_files(sampled_cache.path)[0], columns=["sample_counts"])
    per_pos = [sum(c) for row in t.column(0).to_pylist() for c in row]
    assert per_pos and max(per_pos) <= draws
    assert len(per_pos) * draws - sum(per_pos) > draws


def test_reader_never_returns_wrong_data_after_a_flipped_byte(ranked_cache, tmp_path):
    """Every page carries a CRC32 that the reader checks: a single flipped byte anywhere in a shard either
    raises CorruptCacheError or leaves the decoded data identical (bytes that no value depends on)."""
    def decoded(path):
        return {s.seq_id: (s.ids, s.logprobs, s.entropy, s.label_logprob, s.tail_mass, s.input_ids, s.pos)
                for s in logitstore.open(path)}

    want = decoded(ranked_cache.path)
    shard = shard_files(ranked_cache.path)[0]
    size = shard.stat().st_size
    rng = np.random.default_rng(7)
    outcomes = {"error": 0, "same": 0}
    for i, offset in enumerate(rng.choice(size, 40, replace=False)):
        copy = ranked_cache.copy_to(tmp_path / f"c{i}")
        f = shard_files(copy.path)[0]
        data = bytearray(f.read_bytes())
        data[offset] ^= 0xFF
        f.write_bytes(bytes(data))
        try:
            got = decoded(copy.path)
        except CorruptCacheError:
            outcomes["error"] += 1
            continue
        assert got.keys() == want.keys()
        for k in want:
            for a, b in zip(got[k], want[k]):
                np.testing.assert_array_equal(a, b, err_msg=f"flip at byte {offset} changed {k}")
        outcomes["same"] += 1
    assert outcomes["error"] >= 30, outcomes  # most bytes of a shard are page data under a CRC
