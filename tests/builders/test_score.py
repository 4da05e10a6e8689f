"""logitstore score: student scores per cached position against plain full-vocabulary references.

The tiny teacher scores its own cache (divergences vanish, label logprobs and entropies
equal the cached ones); a second tiny student with a padded head is checked against
numpy computed from ``reference_logprobs`` and the cached teacher entries; students with
another tokenizer or a smaller head are refused; the output joins the ``tokens`` view.
"""

import argparse
import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import logitstore
from builders import score as S
from builders.score import score_cache
from logitstore.errors import CacheExistsError, CacheNotFoundError, InvalidInputError, LogitstoreError
from logitstore.query import connect
from tests.builders.conftest import reference_logprobs
from tests.conftest import FP32_ATOL, assert_top1_within_ties
from tools.cli import main
from tools.cli.build import add_score

WORDS = "the student reads a cached teacher distribution and learns which token comes next in the text".split()
FLOOR = 1e-12


def _write_data(path, n=6, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(5, 40))))}) + "\n")
        f.write(json.dumps({"prompt": "Q: what is cached?", "response": " A: sparse logits."}) + "\n")


def _build(teacher, tmp_path_factory, name, extra):
    root = tmp_path_factory.mktemp(name)
    data = root / "d.jsonl"
    _write_data(data)
    cache = root / "cache"
    assert main(["build", str(teacher), str(data), "-o", str(cache), "--top-k", "8", "-q", *extra]) == 0
    return cache


@pytest.fixture(scope="module")
def cache(tiny_teacher, tmp_path_factory):
    return _build(tiny_teacher, tmp_path_factory, "score-fp32", ["--values", "fp32"])


def _tiny_llama(path, tokenizer_dir, *, vocab, hidden, seed, head_scale):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def padded_student(tiny_teacher, tmp_path_factory):
    """Another random Llama with the same tokenizer and a head padded to 49152 + 64 rows."""
    return _tiny_llama(tmp_path_factory.mktemp("student") / "s", tiny_teacher, vocab=49152 + 64, hidden=32, seed=1,
                       head_scale=20)


def _rows(scores_dir):
    return pq.read_table(scores_dir / "scores.parquet").to_pydict()


def _by_seq(rows):
    out = {}
    for i, sid in enumerate(rows["seq_id"]):
        out.setdefault(sid, []).append(i)
    return {sid: np.array(ix) for sid, ix in out.items()}


def _parser():
    p = argparse.ArgumentParser(prog="logitstore")
    add_score(p.add_subparsers(dest="command", required=True))
    return p


def test_teacher_as_its_own_student(tiny_teacher, cache, tmp_path, capsys):
    out = tmp_path / "scores"
    args = _parser().parse_args(["score", str(cache), str(tiny_teacher), "-o", str(out), "-q"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(str(out))
    rows = _rows(out)
    seqs = list(logitstore.open(cache))
    # one row per cached position, in the cache's storage order
    assert list(zip(rows["seq_id"], rows["pos"])) == [(s.seq_id, int(p)) for s in seqs for p in s.pos]
    assert any(s.pos.size and s.pos[0] > 1 for s in seqs)  # the prompt/response record: a subset of positions
    ix = _by_seq(rows)
    for s in seqs:
        r = ix[s.seq_id]
        col = lambda name, r=r: np.array(rows[name], dtype=np.float64)[r]  # noqa: E731
        np.testing.assert_allclose(col("student_label_logprob"), s.label_logprob, atol=1e-4)
        np.testing.assert_allclose(col("student_entropy"), s.entropy, atol=1e-4)
        assert_top1_within_ties(np.array(rows["student_top1"])[r], s.ids, s.logprobs)  # top-k is sorted
        assert np.abs(col("kl_teacher_student")).max() < 1e-5
        assert np.abs(col("kl_student_teacher")).max() < 1e-5
        assert col("tvd").max() < 1e-4
    info = json.loads((out / "scores.json").read_text())
    m = json.loads((cache / "manifest.json").read_text())
    assert info["rows"] == sum(s.pos.size for s in seqs) == len(rows["pos"])
    assert info["cache"]["fingerprint"] == [hashlib.sha256((cache / sh["file"]).read_bytes()).hexdigest()
                                            for sh in m["shards"]]
    assert info["student"]["id"] == str(tiny_teacher.resolve()) and info["student"]["dtype"] == "fp32"
    assert info["student"]["revision"] and info["created_at"]
    labels = np.concatenate([s.labels for s in seqs])
    assert info["summary"]["student_nll"] == pytest.approx(-np.concatenate([s.label_logprob for s in seqs]).mean(),
                                                           abs=1e-5)
    assert info["summary"]["student_accuracy"] == pytest.approx(
        (np.concatenate([s.ids[:, 0] for s in seqs]) == labels).mean())
    assert [p.name for p in tmp_path.iterdir()] == ["scores"]  # no temporary directory left behind


def test_other_student_matches_the_numpy_reference(padded_student, cache, tmp_path):
    # a tiny chunk budget (2 rows per head chunk) and small batches exercise both loops
    out = score_cache(cache, str(padded_student), tmp_path / "scores", extract_mb=1, token_budget=64, progress=False)
    schema = pq.read_schema(out / "scores.parquet")
    assert [(f.name, f.type) for f in schema] == [
        ("seq_id", pa.string()), ("pos", pa.int32()), ("student_label_logprob", pa.float32()),
        ("student_entropy", pa.float32()), ("student_top1", pa.int32()), ("kl_teacher_student", pa.float32()),
        ("kl_student_teacher", pa.float32()), ("tvd", pa.float32())]
    assert pq.ParquetFile(out / "scores.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    rows = _rows(out)
    ix = _by_seq(rows)
    kls = []
    for s in logitstore.open(cache):
        ref = reference_logprobs(padded_student, s.input_ids)[s.pos - 1]  # [N, 49216] float64
        assert ref.shape[1] == 49152 + 64
        n = np.arange(len(s.pos))
        valid = np.arange(s.ids.shape[1])[None, :] < s.n_entries[:, None]
        q_s = np.where(valid, np.exp(ref[n[:, None], np.where(valid, s.ids, 0)]), 0.0)
        q = np.concatenate([q_s, 1.0 - q_s.sum(1, keepdims=True)], 1)
        p = np.concatenate([np.where(valid, np.exp(s.logprobs.astype(np.float64)), 0.0),
                            s.tail_mass.astype(np.float64)[:, None]], 1)
        lp, lq = np.log(np.maximum(p, FLOOR)), np.log(np.maximum(q, FLOOR))
        want = {
            "student_label_logprob": ref[n, s.labels],
            "student_entropy": -(np.exp(ref) * ref).sum(1),
            "kl_teacher_student": (p * (lp - lq)).sum(1),
            "kl_student_teacher": (q * (lq - lp)).sum(1),
            "tvd": 0.5 * np.abs(p - q).sum(1),
        }
        r = ix[s.seq_id]
        np.testing.assert_array_equal(np.array(rows["pos"])[r], s.pos)
        order = np.argsort(-ref, 1)[:, :2]
        assert_top1_within_ties(np.array(rows["student_top1"])[r], order, np.take_along_axis(ref, order, 1))
        for name, w in want.items():
            np.testing.assert_allclose(np.array(rows[name], np.float64)[r], w, rtol=1e-4, atol=1e-5, err_msg=name)
        kls.append(want["kl_teacher_student"])
    kls = np.concatenate(kls)
    assert kls.min() > 0 and kls.mean() > 0.1  # a different student: the divergences are not trivially zero


def test_cache_without_logprobs_gets_null_divergences(tiny_teacher, tmp_path_factory, tmp_path):
    cache = _build(tiny_teacher, tmp_path_factory, "score-none", ["--sample", "16", "--values", "none"])
    out = score_cache(cache, str(tiny_teacher), tmp_path / "scores", progress=False)
    t = pq.read_table(out / "scores.parquet")
    n = sum(s.pos.size for s in logitstore.open(cache))
    assert t.num_rows == n > 0
    for name in ("kl_teacher_student", "kl_student_teacher", "tvd"):
        assert t.column(name).null_count == n
    lab = np.concatenate([s.label_logprob for s in logitstore.open(cache)])
    np.testing.assert_allclose(t.column("student_label_logprob").to_numpy(), lab, atol=1e-4)
    assert json.loads((out / "scores.json").read_text())["summary"]["kl_teacher_student"] is None


def test_duckdb_join_with_tokens(tiny_teacher, cache, tmp_path):
    out = score_cache(cache, str(tiny_teacher), tmp_path / "scores", progress=False)
    con = connect(cache)
    src = f"read_parquet('{out / 'scores.parquet'}')"
    n_tokens = con.execute("SELECT count(*) FROM tokens").fetchone()[0]
    n_joined, n_missing = con.execute(f"SELECT count(*), count(*) FILTER (WHERE s.pos IS NULL) FROM tokens t "
                                  f"LEFT JOIN {src} s USING (seq_id, pos)").fetchone()
    assert n_tokens == n_joined == con.execute(f"SELECT count(*) FROM {src}").fetchone()[0] > 0 and n_missing == 0
    rows = con.execute(f"SELECT t.label, t.label_logprob, s.student_label_logprob, t.topk_ids, t.topk_logprobs, "
                       f"s.student_top1 FROM tokens t JOIN {src} s USING (seq_id, pos)").fetchall()
    assert len(rows) == n_tokens
    for _label, t_lp, s_lp, t_ids, t_lps, s_top in rows:  # the teacher scored itself: the joined rows agree
        assert abs(t_lp - s_lp) < 1e-4
        assert_top1_within_ties([s_top], [t_ids], [t_lps], tol=2 * FP32_ATOL + 0.04)  # qdelta-quantised logprobs


def test_refuses_a_student_with_another_tokenizer(tiny_teacher, cache, tmp_path):
    from transformers import AutoTokenizer

    student = tmp_path / "other-tok"
    shutil.copytree(tiny_teacher, student)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.pad_token = "<|endoftext|>"  # another special-token map: the same size, another fingerprint
    tok.save_pretrained(student)
    want = json.loads((cache / "manifest.json").read_text())["tokenizer"]["fingerprint"]
    with pytest.raises(InvalidInputError, match=f"tokenizer fingerprint .*{want}") as err:
        score_cache(cache, str(student), tmp_path / "scores", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "scores").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other-tok"]


def test_refuses_a_student_whose_head_is_smaller(tiny_teacher, cache, tmp_path):
    student = _tiny_llama(tmp_path / "small", tiny_teacher, vocab=49000, hidden=32, seed=2, head_scale=1)
    # its own tokenizer (49152 tokens) does not fit it either, which is found first, as the model loads
    with pytest.raises(LogitstoreError, match="49152 tokens, its embedding and LM head only 49000 rows"):
        score_cache(cache, str(student), tmp_path / "scores", progress=False)
    assert not (tmp_path / "scores").exists()


def test_output_rules(tiny_teacher, cache, tmp_path, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(CacheExistsError, match="not an empty directory"):
        score_cache(cache, str(tiny_teacher), full, progress=False)
    assert (full / "keep.txt").read_text() == "x"
    with pytest.raises(CacheNotFoundError):
        score_cache(tmp_path / "no-cache", str(tiny_teacher), tmp_path / "s0", progress=False)
    with pytest.raises(InvalidInputError, match="--token-budget 1"):
        score_cache(cache, str(tiny_teacher), tmp_path / "s0", token_budget=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (score_cache(cache, str(tiny_teacher), empty, progress=False) / "scores.parquet").is_file()

    calls = []

    def fail_second(*a, **k):  # a crash in the middle of the run leaves neither SCORES nor a temporary directory
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    real = S._score_batch
    monkeypatch.setattr(S, "_score_batch", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        score_cache(cache, str(tiny_teacher), tmp_path / "crashed", token_budget=32, progress=False)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]
