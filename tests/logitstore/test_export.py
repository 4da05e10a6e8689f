"""logitstore.export (``logitstore export CACHE --to axolotl``): the rows against the cache, axolotl's loss on them,
the refusals and the atomic directory.

References: the float64/float32 arrays each cache was written from (``tests.conftest.RefSeq``), laid out
here row by row by the documented rule (row ``t`` holds the entries of ``pos = t + 1``); the rows read
back with ``datasets`` as axolotl loads them; axolotl's KD loss re-implemented from its source
(``src/axolotl/integrations/kd/kernels/liger.py`` and ``trainer.py`` at commit 067b021c8b87): hidden
state ``t`` against target row ``t``, labels shifted by one for the cross-entropy, forward KL over
``target_mask``, the student renormalised over the K columns (``kd_normalize_topk``), divided by the
label count; it must equal our trainer's ``--tail renormalize`` forward KL on the same sequences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import Codec, MassTopK, Sampled, TopK
from logitstore.errors import CacheExistsError, CacheLockedError, InvalidInputError
from logitstore.export import MARKER, PAD_LOGPROB, export
from logitstore.lock import LOCK_NAME
from logitstore.rules import TopKTail
from logitstore.selection import Selection, cache_fingerprint, save_selection
from tests.conftest import make_sequence, make_sequences, read_manifest, write_cache, write_manifest
from tools.cli import main

V = 300


def rows_of(out: Path) -> list[dict]:
    """The exported rows as axolotl loads a local directory (``datasets.load_dataset(path)``, split train)."""
    import datasets

    return list(datasets.load_dataset(str(out), split="train"))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def build(path, rule, codec, seed=0, count=14):
    rng = np.random.default_rng(seed)
    refs = make_sequences(rng, count, vocab=V, rule=rule, max_tokens=18, mask_prob=0.3)
    refs[2] = make_sequence(rng, vocab=V, n_tokens=16, rule=rule, seq_id="seq-0002", subset=True, record=2)
    refs[3] = make_sequence(rng, vocab=V, n_tokens=1, rule=rule, seq_id="seq-0003", record=3)
    write_cache(path, refs, vocab=V, rule=rule, codec=codec, shard_bytes=3000, row_group_positions=30)
    return {r.seq_id: r for r in refs}


def row_bound(codec: Codec, ref_row: np.ndarray, normalized: bool) -> float:
    """The max abs error of a row's exported logprobs: the codec's, twice over when renormalised (each logprob and
    the row's logsumexp carry it)."""
    if codec.values == "qdelta":
        e = codec.logprob_error_bound()
    elif codec.values == "fp16":
        e = 2.0**-11 * float(np.abs(ref_row).max())
    else:
        e = 0.0
    return (2 * e if normalized else e) + 1e-5


@pytest.mark.parametrize("rule", [TopK(8), MassTopK(0.9, 12)], ids=["topk", "mass"])
@pytest.mark.parametrize("codec", [Codec(), Codec(values="fp32", ids="raw"), Codec(values="fp16")],
                         ids=["qdelta-ranked", "fp32-raw", "fp16"])
def test_rows_match_the_cache_field_by_field(tmp_path, rule, codec):
    refs = build(tmp_path / "c", rule, codec)
    k = rule.k
    storage = [s.seq_id for s in logitstore.open(tmp_path / "c")]
    for mode, temp in (("raw", 1.0), ("normalized", 1.0), ("normalized", 2.0)):
        out = tmp_path / f"e-{mode}-{temp}"
        info = export(tmp_path / "c", out, logprobs=mode, temperature=temp)
        rows = rows_of(out)
        assert (out / "seq_ids.txt").read_text().split() == storage and len(rows) == len(storage) == info["rows"]
        assert json.loads((out / MARKER).read_text()) == info and info["k"] == k
        targets = padded = 0
        for sid, row in zip(storage, rows):
            ref = refs[sid]
            T = ref.input_ids.size
            assert row["input_ids"] == ref.input_ids.tolist() and row["attention_mask"] == [1] * T
            where = {int(p): i for i, p in enumerate(ref.positions)}
            labels = [int(ref.input_ids[t]) if t in where and ref.loss_mask[where[t]] else -100 for t in range(T)]
            assert row["labels"] == labels
            assert [len(x) for x in row["target_token_ids"]] == [k] * T
            for t in range(T):
                ids, lps, mask = (np.array(row[f][t]) for f in ("target_token_ids", "target_logprobs", "target_mask"))
                i = where.get(t + 1)
                if i is None:  # nothing predicted here: all padding
                    assert (ids == 0).all() and (lps == np.float32(PAD_LOGPROB)).all() and (mask == 0).all()
                    continue
                n = int(ref.n_entries[i])
                np.testing.assert_array_equal(ids[:n], ref.ids[i, :n])
                assert (ids[n:] == 0).all() and (lps[n:] == np.float32(PAD_LOGPROB)).all() and (mask[n:] == 0).all()
                assert (mask[:n] == int(ref.loss_mask[i])).all()
                want = ref.logprobs[i, :n].astype(np.float64)
                if mode == "normalized":
                    want = log_softmax(want / temp)
                err = np.abs(lps[:n] - want).max()
                assert err <= row_bound(codec, ref.logprobs[i, :n], mode == "normalized"), (sid, t, err)
                targets += int(ref.loss_mask[i])
                padded += (k - n) * int(ref.loss_mask[i])
        assert info["targets"] == targets and info["padded_entries"] == padded
        assert (padded > 0) == isinstance(rule, MassTopK)
        assert info["tokens"] == sum(r.input_ids.size for r in refs.values())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_axolotl_loss_on_the_export_equals_our_renormalized_forward_kl(tmp_path, temperature):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.hf import CacheDataset, DistillationLoss

    build(tmp_path / "c", TopK(8), Codec(values="fp32", ids="raw"))
    export(tmp_path / "c", tmp_path / "e", temperature=temperature)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    kd_alpha, ce_alpha = 0.9, 0.1
    kd_sum = ce_sum = 0.0
    items = 0
    with torch.no_grad():
        for row in rows_of(tmp_path / "e"):  # axolotl: one sequence, hidden states and targets unshifted
            ids = torch.tensor(row["input_ids"])[None]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            logits = F.linear(hidden, model.lm_head.weight).double()
            s = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(row["target_token_ids"]))
            s = s - torch.logsumexp(s, -1, keepdim=True)  # kd_normalize_topk
            t = torch.tensor(row["target_logprobs"], dtype=torch.float64)
            valid = torch.tensor(row["target_mask"]).bool()
            kd_sum += float((t[valid].exp() * (t[valid] - s[valid])).sum()) * temperature ** 2
            labels = torch.tensor(row["labels"])
            ce_sum += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
            items += int((labels != -100).sum())
    axolotl = (kd_alpha * kd_sum + ce_alpha * ce_sum) / items
    ds = CacheDataset(tmp_path / "c")
    batch = ds.collator()([ds[i] for i in range(len(ds))])
    ours, _ = DistillationLoss(tmp_path / "c", loss="forward_kl", tail="renormalize", ce_weight=ce_alpha,
                               temperature=temperature)(model, batch)
    assert items == int(batch["target_mask"].sum()) > 50
    assert float(ours.detach()) == pytest.approx(axolotl, rel=1e-5)


def test_tail_draws_are_dropped_only_when_asked(tmp_path):
    from tests.logitstore.test_tail_rule import build as build_tail

    refs = build_tail(tmp_path / "c", TopKTail(5, 12), Codec(values="fp32", ids="raw"))
    with pytest.raises(InvalidInputError, match="pass --drop-tail-draws"):
        export(tmp_path / "c", tmp_path / "e")
    info = export(tmp_path / "c", tmp_path / "e", drop_tail_draws=True, logprobs="raw")
    assert info["tail_draws_dropped"] and info["k"] == 5
    for sid, row in zip((tmp_path / "e" / "seq_ids.txt").read_text().split(), rows_of(tmp_path / "e")):
        tok, lp, _ = refs[sid]
        head = np.argsort(-lp, 1, kind="stable")[:, :5]  # the exact top-5 of the full reference distribution
        np.testing.assert_array_equal(np.array(row["target_token_ids"][:-1]), head)
        np.testing.assert_allclose(np.array(row["target_logprobs"][:-1]), np.take_along_axis(lp, head, 1), atol=1e-6)


@pytest.mark.parametrize("rule", [Sampled(12, systematic=True), Sampled(12, 0, 2.0, True)], ids=["T1", "T2"])
def test_a_systematic_sampled_cache_exports_the_ids_it_draws_with_certainty(tmp_path, rule):
    """The build default's kind of cache: each position exports the ids whose proposal probability is at least 1/D
    (drawn whatever the offset), most likely first: from the full reference distribution, every id of p >= 1/D at
    T = 1, the exact top-m. With independent draws (none certain) the export is refused."""
    from tests.logitstore.test_tail_rule import build as build_tail

    refs = build_tail(tmp_path / "c", rule, Codec(values="fp32", ids="raw"))
    info = export(tmp_path / "c", tmp_path / "e", logprobs="raw")
    assert info["tail_draws_dropped"] and info["k"] == 12
    heads = 0
    for sid, row in zip((tmp_path / "e" / "seq_ids.txt").read_text().split(), rows_of(tmp_path / "e")):
        tok, lp, _ = refs[sid]
        q = np.stack([log_softmax(x / rule.proposal_temperature) for x in lp])
        for t in range(len(tok) - 1):
            want = [x for x in np.argsort(-lp[t], kind="stable") if q[t, x] + np.log(rule.draws) >= 0]
            m = len(want)
            heads += m
            assert row["target_token_ids"][t][:m] == want and row["target_mask"][t][m:] == [0] * (12 - m)
            np.testing.assert_allclose(row["target_logprobs"][t][:m], lp[t, want], atol=1e-6)
            if rule.proposal_temperature == 1:
                assert want == list(np.argsort(-lp[t], kind="stable")[:m]) and 1 <= m <= rule.draws
    assert heads > 0
    independent = tmp_path / "i"
    build_tail(independent, Sampled(12), Codec())
    for flag in (False, True):
        with pytest.raises(InvalidInputError, match="no id is drawn with certainty"):
            export(independent, tmp_path / "x", drop_tail_draws=flag)
    assert not (tmp_path / "x").exists()


def test_refusals_and_force(tmp_path, capsys):
    build(tmp_path / "c", TopK(4), Codec())
    out = tmp_path / "e"

    def cli(*args):
        code = main(["export", *map(str, args), "-q"])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, stdout, _ = cli(tmp_path / "c", "--to", "axolotl", "-o", out)
    assert code == 0 and "axolotl.integrations.kd.KDPlugin" in stdout and f"path: {out.resolve()}" in stdout
    first = (out / MARKER).read_text()
    refused = {
        "exists; pass --force": [tmp_path / "c", "--to", "axolotl", "-o", out],
        "--to 'trl': choose from axolotl": [tmp_path / "c", "--to", "trl", "-o", tmp_path / "x"],
        "--temperature 0.0: must be a number > 0": [tmp_path / "c", "--to", "axolotl", "-o", tmp_path / "x",
                                                    "--temperature", "0"],
        "with --logprobs raw": [tmp_path / "c", "--to", "axolotl", "-o", tmp_path / "x", "--logprobs", "raw",
                                "--temperature", "2"],
        "--logprobs 'exp': choose from normalized, raw": [tmp_path / "c", "--to", "axolotl", "-o", tmp_path / "x",
                                                           "--logprobs", "exp"],
    }
    sampled = make_sequences(np.random.default_rng(1), 4, vocab=V, rule=Sampled(16, 8), max_tokens=10)
    write_cache(tmp_path / "s", sampled, vocab=V, rule=Sampled(16, 8))
    write_cache(tmp_path / "n", sampled, vocab=V, rule=Sampled(16, 8), codec=Codec(values="none"))
    refused["holds sampled entries"] = [tmp_path / "s", "--to", "axolotl", "-o", tmp_path / "x"]
    refused["stores no logprobs (built with --values none)"] = [tmp_path / "n", "--to", "axolotl", "-o", tmp_path / "x"]
    m = logitstore.open(tmp_path / "c").manifest
    ids = [s.seq_id for s in logitstore.open(tmp_path / "c")]
    save_selection(tmp_path / "w.json", Selection(cache=str(tmp_path / "c"), cache_fingerprint=cache_fingerprint(m),
                                                  seq_ids=ids[:3], weights=[1.0, 2.0, 3.0]))
    refused["per-sequence weights"] = [tmp_path / "w.json", "--to", "axolotl", "-o", tmp_path / "x"]
    refused[str(tmp_path / "nope")] = [tmp_path / "nope", "--to", "axolotl", "-o", tmp_path / "x"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused["is not a logitstore export (no logitstore_export.json of ours"] = [tmp_path / "c", "--to", "axolotl", "-o",
                                                                          other, "--force"]
    for message, args in refused.items():
        code, stdout, stderr = cli(*args)
        assert code == 2 and message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr, message
    assert not (tmp_path / "x").exists() and (other / "notes.txt").read_text() == "keep me"
    assert (out / MARKER).read_text() == first  # the refused second export left the first alone
    code, _, _ = cli(tmp_path / "c", "--to", "axolotl", "-o", out, "--force", "--logprobs", "raw")
    assert code == 0 and json.loads((out / MARKER).read_text())["logprobs"] == "raw"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    save_selection(tmp_path / "u.json", Selection(cache=str(tmp_path / "c"), cache_fingerprint=cache_fingerprint(m),
                                                  seq_ids=[ids[5], ids[1]]))
    code, _, _ = cli(tmp_path / "u.json", "--to", "axolotl", "-o", tmp_path / "sel")
    rows = rows_of(tmp_path / "sel")
    assert code == 0 and (tmp_path / "sel" / "seq_ids.txt").read_text().split() == [ids[1], ids[5]]
    want = {s.seq_id: s.input_ids.tolist() for s in logitstore.open(tmp_path / "c")}
    assert [r["input_ids"] for r in rows] == [want[ids[1]], want[ids[5]]]


def test_help_names_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--to TRAINER" in text and "target_token_ids" in text and "--force" in text


def test_a_failed_export_leaves_nothing_and_the_previous_export_intact(tmp_path, monkeypatch):
    import logitstore.export as ex

    build(tmp_path / "c", TopK(4), Codec())
    export(tmp_path / "c", tmp_path / "e")
    before = {p.relative_to(tmp_path / "e"): p.read_bytes() for p in (tmp_path / "e").rglob("*") if p.is_file()}
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **kw)

    real = ex.axolotl_rows
    monkeypatch.setattr(ex, "axolotl_rows", failing)
    for target, force in ((tmp_path / "new", False), (tmp_path / "e", True)):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            export(tmp_path / "c", target, force=force, logprobs="raw")
        assert not (tmp_path / f".{target.name}.export-tmp").exists()
    assert not (tmp_path / "new").exists()
    assert {p.relative_to(tmp_path / "e"): p.read_bytes() for p in (tmp_path / "e").rglob("*") if p.is_file()} \
        == before


def test_temporary_directory_of_a_crashed_export_is_taken_over_a_live_one_refused(tmp_path):
    from logitstore.lock import _proc_start

    build(tmp_path / "c", TopK(4), Codec())
    tmp = tmp_path / ".e.export-tmp"
    tmp.mkdir()
    (tmp / "data").mkdir()
    (tmp / "data" / "part-00000.parquet").write_bytes(b"half")
    record = {"pid": os.getpid(), "host": os.uname().nodename, "started": "2020-01-01T00:00:00+00:00",
              "command": "logitstore export", "proc_start": _proc_start(os.getpid())}
    (tmp / LOCK_NAME).write_text(json.dumps(record))  # a live holder (this very process)
    with pytest.raises(CacheLockedError, match="another export is writing it"):
        export(tmp_path / "c", tmp_path / "e")
    record["proc_start"] = "another-boot:1"  # the holder is gone: a crashed export
    (tmp / LOCK_NAME).write_text(json.dumps(record))
    info = export(tmp_path / "c", tmp_path / "e")
    assert info["rows"] == 14 and not tmp.exists() and not (tmp_path / "e" / LOCK_NAME).exists()
    assert sorted(f"data/{p.name}" for p in (tmp_path / "e" / "data").iterdir()) == info["files"]  # no "half"
    stranger = tmp_path / ".e2.export-tmp"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("?")  # not an export's: no lock
    with pytest.raises(CacheExistsError, match="not a temporary directory of an export"):
        export(tmp_path / "c", tmp_path / "e2")
    assert (stranger / "notes.txt").exists() and not (tmp_path / "e2").exists()


def test_force_replaces_only_an_export_of_ours(tmp_path):
    """``logitstore.ownership``'s rule for exports: --force replaces a directory only when its marker is ours and it
    holds nothing an export does not write; nothing foreign is ever deleted."""
    build(tmp_path / "c", TopK(4), Codec())
    out = tmp_path / "e"
    export(tmp_path / "c", out)
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    (out / "notes.txt").write_text("mine")  # a user's file in an export
    (out / "data" / "extra.parquet").write_bytes(b"mine too")
    before = files(out)
    with pytest.raises(CacheExistsError, match=r"also holds data/extra.parquet, notes.txt.*move those out"):
        export(tmp_path / "c", out, force=True, logprobs="raw")
    assert files(out) == before
    (out / "notes.txt").unlink()
    (out / "data" / "extra.parquet").unlink()
    assert export(tmp_path / "c", out, force=True, logprobs="raw")["logprobs"] == "raw"
    other = tmp_path / "other"  # another tool's logitstore_export.json
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CacheExistsError, match="is not a logitstore export"):
        export(tmp_path / "c", other, force=True)
    assert sorted(p.name for p in other.iterdir()) == [MARKER]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheExistsError, match="is a file"):
        export(tmp_path / "c", tmp_path / "file", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheExistsError, match="exists; pass --force"):
        export(tmp_path / "c", empty)
    assert export(tmp_path / "c", empty, force=True)["rows"] == 14  # an empty directory holds nothing to lose
    stale = tmp_path / ".e.export-old"  # not an export's leftover: refused, kept
    stale.mkdir()
    (stale / "notes.txt").write_text("?")
    with pytest.raises(CacheExistsError, match="is not an earlier export"):
        export(tmp_path / "c", out, force=True)
    assert (stale / "notes.txt").exists() and not (tmp_path / ".e.export-tmp").exists()
    assert json.loads((out / MARKER).read_text())["logprobs"] == "raw"  # the earlier export untouched
    tmp = tmp_path / ".e2.export-tmp"  # a crashed export's lock, and a user's file beside its files
    tmp.mkdir()
    (tmp / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                             "started": "2020-01-01T00:00:00+00:00", "command": "logitstore export",
                                             "proc_start": "another-boot:1"}))
    (tmp / "notes.txt").write_text("?")
    with pytest.raises(CacheExistsError, match="notes.txt, which no export writes"):
        export(tmp_path / "c", tmp_path / "e2")
    assert (tmp / "notes.txt").exists() and not (tmp_path / "e2").exists()


def test_an_unfinished_build_is_refused_unless_asked(tmp_path, capsys):
    build(tmp_path / "c", TopK(4), Codec())
    m = read_manifest(tmp_path / "c")
    m["complete"] = False  # as a build still running (or killed) leaves it
    write_manifest(tmp_path / "c", m)
    assert main(["export", str(tmp_path / "c"), "--to", "axolotl", "-o", str(tmp_path / "e"), "-q"]) == 2
    assert "unfinished build" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert main(["export", str(tmp_path / "c"), "--to", "axolotl", "-o", str(tmp_path / "e"), "-q",
                 "--allow-incomplete"]) == 0
    assert json.loads((tmp_path / "e" / MARKER).read_text())["source"]["complete"] is False
