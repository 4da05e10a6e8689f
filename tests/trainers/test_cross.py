"""Cross-tokenizer students: ALM's and GOLD's losses against plain references, bits per byte against a direct
computation, end-to-end runs with a byte-level and a BPE student, and the refusals."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import logitstore
from tests.conftest import read_manifest, write_manifest
from tests.trainers.conftest import english_lines
from trainers.config import TrainConfig


def student_dir(path, tokenizer_dir, *, hidden=32, layers=1):
    """A config.json student next to the tokenizer files of ``tokenizer_dir``."""
    from transformers import AutoTokenizer, LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)
    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    LlamaConfig(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                tie_word_embeddings=True).to_json_file(str(path / "config.json"))
    return path / "config.json"


@pytest.fixture(scope="module")
def byte_student(tmp_path_factory):
    from tools.student_tokenizers import byte_tokenizer

    d = tmp_path_factory.mktemp("bytes")
    return student_dir(d / "student", byte_tokenizer(d / "tok"))


@pytest.fixture(scope="module")
def bpe_student(tmp_path_factory):
    from tools.student_tokenizers import bpe_tokenizer

    d = tmp_path_factory.mktemp("bpe")
    return student_dir(d / "student", bpe_tokenizer(d / "tok", english_lines(300), vocab_size=400))


def cfg(cache, student, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), student=str(student), output=str(out), max_steps=4, batch_size=4, max_length=48,
                lr=3e-3, quiet=True, log_every=1, cross_tokenizer="alm")
    base.update(kw)
    return TrainConfig(**base).validate()


def setup(cache, student_cfg, **kw):
    from trainers.cross import CrossTokenizer
    from trainers.data import StreamingLoader
    from trainers.losses import Objective
    from trainers.student import load_student

    c = cfg(cache, student_cfg, "unused", **kw)
    m = logitstore.open(cache).manifest
    student = load_student(c.student, manifest=m, seed=1, cache_tokenizer=False)
    cross = CrossTokenizer(c, m, student)
    batch = next(iter(StreamingLoader(str(cache), batch_size=3, max_length=48, shuffle=False)))
    return c, student, cross, batch, Objective(c.loss, tail="other", ce_weight=c.ce_weight)


def text_spans(tokenizer, ids):
    """Byte spans of the teacher's tokens, from the tokenizer's own offsets of the decoded text (English, ASCII)."""
    text = tokenizer.decode(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == list(ids)
    assert len(text.encode()) == len(text)
    return text, [b for _, b in enc["offset_mapping"]]


def reference_chunks(t_ends, s_ends, start):
    """Two-pointer walk (tokenkit's alignment): chunks where both cumulative byte lengths meet, after ``start``."""
    out, i, j = [], 0, 0
    ti = [k for k, e in enumerate(t_ends) if e > start]
    sj = [k for k, e in enumerate(s_ends) if e > start]
    while i < len(ti) and j < len(sj):
        ci, cj = [ti[i]], [sj[j]]
        while t_ends[ci[-1]] != s_ends[cj[-1]]:
            if t_ends[ci[-1]] < s_ends[cj[-1]]:
                i += 1
                ci.append(ti[i])
            else:
                j += 1
                cj.append(sj[j])
        out.append((ci, cj))
        i, j = i + 1, j + 1
    return out


def binary_kl(t, s, tau):
    a, b = t / tau - 1e-6, s / tau - 1e-6
    p, q = math.exp(a), math.exp(b)
    return tau * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))


def student_spans(tokenizer, text, start):
    """The student's tokens of ``text`` (context ``text[:start]`` and the rest encoded apart, as the trainer does)
    and their end offsets, from the tokenizer's own offset mapping (ASCII text: characters are bytes)."""
    ids, ends = [], []
    for a, b in ((0, start), (start, len(text))):
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"]
        ends += [a + e for _, e in enc["offset_mapping"]]
    return ids, ends


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_alm_loss_and_gradient_equal_a_plain_reference(text_cache, byte_student, bpe_student, embedded_tokenizer,
                                                      which):
    c, student, cross, batch, objective = setup(text_cache, byte_student if which == "byte" else bpe_student,
                                                ce_weight=0.3)
    sb = cross.prepare(batch)
    loss, m = cross.loss(student.hidden, student, sb, objective)
    loss.backward()
    got_grad = student.model.get_input_embeddings().weight.grad.clone()
    student.model.zero_grad()
    cache = logitstore.open(text_cache)
    kl_terms, ce_terms = [], []
    for sid in batch["seq_ids"]:
        seq = cache[sid]
        text, t_ends = text_spans(embedded_tokenizer, seq.input_ids)
        s_ids, s_ends = student_spans(cross.tokenizer, text, t_ends[0])
        ids = torch.tensor(s_ids)[None]
        lp = torch.log_softmax(student.model(input_ids=ids).logits[0].double(), -1)
        s_lp = [None] + [lp[u - 1, ids[0, u]] for u in range(1, ids.shape[1])]
        label_lp = dict(zip(seq.pos.tolist(), seq.label_logprob.tolist()))
        for ti, sj in reference_chunks(t_ends, s_ends, t_ends[0]):
            if 0 in sj:  # nothing predicts the student's first token
                continue
            t = sum(label_lp[k] for k in ti)
            s = sum(s_lp[u] for u in sj)
            a, b = t / 100 - 1e-6, s / 100 - 1e-6
            p = math.exp(a)
            kl_terms.append(100 * (p * (a - b) + (1 - p) * (math.log(1 - p) - torch.log(-torch.expm1(b)))))
            ce_terms.extend(-s_lp[u] for u in sj)
    ref = 0.7 * sum(kl_terms) / len(kl_terms) + 0.3 * sum(ce_terms) / len(ce_terms)
    assert m["chunks"] == len(kl_terms)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    ref.backward()
    ref_grad = student.model.get_input_embeddings().weight.grad
    torch.testing.assert_close(got_grad, ref_grad.float(), rtol=1e-3, atol=1e-6)
    assert binary_kl(-3.0, -3.0, 100) == pytest.approx(0, abs=1e-12) and binary_kl(-2.0, -5.0, 100) > 0


def test_gold_loss_equals_a_plain_reference(text_cache, byte_student, embedded_tokenizer):
    from trainers.align import byte_level_alphabet

    c, student, cross, batch, objective = setup(text_cache, byte_student, cross_tokenizer="gold")
    sb = cross.prepare(batch)
    loss, m = cross.loss(student.hidden, student, sb, objective)
    alphabet = byte_level_alphabet()  # checked on its own: test_align.test_token_bytes_spell_the_text

    specials = set(embedded_tokenizer.all_special_ids)

    def student_id(t):
        """The byte student's token spelling what teacher token t spells, or None."""
        name = embedded_tokenizer.convert_ids_to_tokens(int(t))
        if int(t) in specials:
            return cross.tokenizer.convert_tokens_to_ids(name) if name in cross.tokenizer.all_special_tokens else None
        b = bytes(alphabet[ch] for ch in name)
        return b[0] if len(b) == 1 else None

    cache = logitstore.open(text_cache)
    terms = []
    for sid in batch["seq_ids"]:
        seq = cache[sid]
        text, t_ends = text_spans(embedded_tokenizer, seq.input_ids)
        ids = torch.tensor(list(text.encode()))[None]
        with torch.no_grad():
            lp = torch.log_softmax(student.model(input_ids=ids).logits[0].double(), -1).numpy()
        row = {int(p): j for j, p in enumerate(seq.pos)}
        for ti, sj in reference_chunks(t_ends, list(range(1, len(text) + 1)), t_ends[0]):
            j, q = row[ti[0]], np.exp(lp[sj[0] - 1])
            n = seq.n_entries[j]
            tp = np.exp(seq.logprobs[j, :n].astype(np.float64))
            if len(ti) == 1 and len(sj) == 1:  # KL over the byte-matched entries and one bucket for the rest
                pm, qm = [], []
                for t, pt in zip(seq.ids[j, :n], tp):
                    u = student_id(t)
                    if u is not None:
                        pm.append(pt)
                        qm.append(q[u])
                pb, qb = np.array(pm + [1 - sum(pm)], float), np.array(qm + [1 - sum(qm)], float)
                pb /= pb.sum()
                terms.append(float(np.sum(np.where(pb > 0, pb * np.log(np.maximum(pb, 1e-300) / qb), 0))))
            else:  # ULD: sorted probabilities times the continuation's probability, top K and the rest
                t_rest = math.exp(sum(seq.label_logprob[row[k]] for k in ti[1:]))
                s_rest = math.exp(sum(lp[u - 1, ids[0, u]] for u in sj[1:]))
                qs = np.sort(q)[::-1][:16]
                pt_top = np.pad(tp, (0, 16 - n)) * t_rest
                terms.append(float(np.abs(pt_top - qs * s_rest).sum()
                                   + abs(seq.tail_mass[j] * t_rest - (1 - qs.sum()) * s_rest)))
    assert m["chunks"] == len(terms) and any(t > 0 for t in terms)
    assert float(loss.detach()) == pytest.approx(float(np.mean(terms)), rel=2e-4)


def test_bits_per_byte_equal_a_direct_computation(text_cache, byte_student, student_config, embedded_tokenizer):
    from logitstore.selection import Selection, cache_fingerprint
    from trainers.evaluation import evaluate
    from trainers.student import load_student

    cache = logitstore.open(text_cache)
    c, student, cross, _, _ = setup(text_cache, byte_student)
    some = [s.seq_id for s in list(cache)[:12]]  # a few sequences keep it quick
    src = Selection(cache=str(text_cache), cache_fingerprint=cache_fingerprint(cache.manifest), seq_ids=some)
    got = evaluate(student, src, c, torch.device("cpu"), cross)
    same = load_student(str(student_config), manifest=cache.manifest, seed=2)
    got_same = evaluate(same, src, c.replace(cross_tokenizer=""), torch.device("cpu"))
    assert got["eval_sequences"] == got_same["eval_sequences"] == len(some)
    bits = bits_same = bits_teacher = 0.0
    n_bytes = 0
    for seq in (cache[sid] for sid in some):
        text, t_ends = text_spans(embedded_tokenizer, seq.input_ids)
        region = len(text.encode()) - t_ends[0]  # every byte after the teacher's first token (never predicted)
        ids = torch.tensor(list(text.encode()))[None]
        with torch.no_grad():
            lp = torch.log_softmax(student.model(input_ids=ids).logits[0].double(), -1)
            bits -= float(sum(lp[u - 1, ids[0, u]] for u in range(t_ends[0], ids.shape[1]))) / math.log(2)
            tid = torch.tensor(seq.input_ids)[None]
            lq = torch.log_softmax(same.model(input_ids=tid).logits[0].double(), -1)
            bits_same -= float(sum(lq[p - 1, tid[0, p]] for p in range(1, tid.shape[1]))) / math.log(2)
        bits_teacher -= float(seq.label_logprob.astype(np.float64).sum()) / math.log(2)
        n_bytes += region
    assert got["eval_bytes"] == got_same["eval_bytes"] == n_bytes
    assert got["eval_bpb"] == pytest.approx(bits / n_bytes, rel=1e-5)
    assert got_same["eval_bpb"] == pytest.approx(bits_same / n_bytes, rel=1e-5)
    assert got["eval_teacher_bpb"] == pytest.approx(bits_teacher / n_bytes, rel=1e-6)
    assert got_same["eval_teacher_bpb"] == pytest.approx(bits_teacher / n_bytes, rel=1e-6)


@pytest.mark.parametrize("which,method", [("byte", "alm"), ("bpe", "gold")])  # bpe alm: the reference test
def test_cross_tokenizer_students_train_end_to_end(text_cache, byte_student, bpe_student, tmp_path, which, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.cli import main
    from trainers.evaluation import evaluate
    from trainers.student import load_student

    student = byte_student if which == "byte" else bpe_student
    c, fresh, cross, batch, objective = setup(text_cache, student, cross_tokenizer=method)
    held = cfg(text_cache, student, "x", cross_tokenizer=method, holdout=0.25, max_length=32)
    from trainers.sources import train_and_eval_sources

    _, eval_src = train_and_eval_sources(held, logitstore.open(text_cache))
    fresh0 = load_student(str(student), manifest=logitstore.open(text_cache).manifest, seed=0, cache_tokenizer=False)
    before = evaluate(fresh0, eval_src, held, torch.device("cpu"), cross)
    out = tmp_path / "run"
    steps = 16 if method == "alm" else 30  # ULD's L1 falls slowly
    argv = ["train", str(text_cache), "--student", str(student), "--cross-tokenizer", method, "--max-steps", str(steps),
            "--batch-size", "4", "--max-length", "32", "--lr", "1e-2", "--holdout", "0.25", "--quiet",
            "--log-every", "1", "-o", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["eval_bpb"]) and summary["eval_bytes"] == before["eval_bytes"] > 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kd" in r] == list(range(1, steps + 1))
    # the objective on the same batch, before and after: training lowers it
    trained = load_student(str(out), manifest=logitstore.open(text_cache).manifest, cache_tokenizer=False)
    sb = cross.prepare(batch)
    with torch.no_grad():
        kd0 = cross.loss(fresh0.hidden, fresh0, sb, objective)[1]["kd"]
        kd1 = cross.loss(trained.hidden, trained, sb, objective)[1]["kd"]
    assert kd1 < (0.9 if method == "alm" else 0.97) * kd0, (kd0, kd1)  # ULD's L1 falls slowly (measured 0.96)
    if method == "alm":  # what ALM minimises, on held-out text
        assert summary["eval_alm"] < before["eval_alm"]
    AutoModelForCausalLM.from_pretrained(out)
    assert len(AutoTokenizer.from_pretrained(out)) == len(fresh.tokenizer)


def test_student_tokenizer_flag_and_refusals(text_cache, byte_student, tiny_teacher, tmp_path, capsys):
    from tools.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(byte_student, bare / "config.json")
    base = ["train", str(text_cache), "--student", str(bare / "config.json"), "--cross-tokenizer", "alm",
            "--max-steps", "1", "--quiet"]
    assert main([*base, "-o", str(tmp_path / "a")]) == 2  # no tokenizer beside it: refused, never the teacher's
    assert "student's tokenizer" in capsys.readouterr().err
    assert main([*base, "--student-tokenizer", str(byte_student.parent), "-o", str(tmp_path / "b")]) == 0
    assert main([*base, "--pack", "--student-tokenizer", str(byte_student.parent), "-o", str(tmp_path / "c")]) == 2
    assert "--pack is not available" in capsys.readouterr().err
    moved = tmp_path / "moved"  # a cache whose tokenizer record names no local directory
    shutil.copytree(text_cache, moved)
    m = read_manifest(moved)
    m["tokenizer"]["name"] = "some-org/not-on-this-machine"
    write_manifest(moved, m)
    again = ["train", str(moved), "--student", str(byte_student), "--cross-tokenizer", "alm", "--max-steps", "1",
             "--quiet"]
    assert main([*again, "-o", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--teacher-tokenizer DIR" in err and "not-on-this-machine" in err
    assert main([*again, "--teacher-tokenizer", str(tiny_teacher), "-o", str(tmp_path / "e")]) == 0
    assert main([*again, "--teacher-tokenizer", str(byte_student.parent), "-o", str(tmp_path / "f")]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "f").exists() and not (tmp_path / "d").exists()
