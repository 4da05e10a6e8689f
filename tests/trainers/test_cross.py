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


# the other pairs: the reference tests above
@pytest.mark.parametrize("which,method", [("byte", "alm"), ("bpe", "gold"), ("bpe", "nextbyte")])
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


def reference_groups(chunks, p_after, threshold):
    """ALM's merge_by_space_prob on the two-pointer chunks: a group closes after a chunk whose teacher space
    probability after it (``p_after(last teacher token)``, None where not cached) reaches ``threshold``, at the last
    chunk, and before a gap in the teacher's tokens."""
    out, cur = [], None
    for n, (ti, sj) in enumerate(chunks):
        cur = (ti, sj) if cur is None else (cur[0] + ti, cur[1] + sj)
        p = p_after(ti[-1])
        last = n == len(chunks) - 1 or chunks[n + 1][0][0] != ti[-1] + 1
        if last or (p is not None and p >= threshold):
            out.append(cur)
            cur = None
    return out


@pytest.mark.parametrize("which,mode", [("byte", "merge_by_space_prob+append_space"), ("bpe", "append_space"),
                                        ("bpe", "merge_by_space_prob")])
def test_alm_modes_equal_a_plain_reference(text_cache, byte_student, bpe_student, embedded_tokenizer, which, mode):
    """tokenkit's debiasing (append_space) and chunk merging (merge_by_space_prob), restated from its definitions:
    a space token is one whose token string starts with 'Ġ' (teacher) or whose decoded text starts with ' '
    (student); the teacher's space probability sums the cached entries at the position after the chunk."""
    threshold = 0.6  # the tiny teacher gives space-initial tokens much of its mass
    c, student, cross, batch, objective = setup(text_cache, byte_student if which == "byte" else bpe_student,
                                                alm_mode=mode, alm_space_threshold=threshold)
    sb = cross.prepare(batch)
    loss, m = cross.loss(student.hidden, student, sb, objective)
    loss.backward()
    got_grad = student.model.get_input_embeddings().weight.grad.clone()
    student.model.zero_grad()
    t_space = {i for i, t in enumerate(embedded_tokenizer.convert_ids_to_tokens(list(range(len(embedded_tokenizer)))))
               if t.startswith("Ġ")}
    tok = cross.tokenizer
    s_space = [i for i in range(len(tok)) if i not in tok.all_special_ids and tok.decode([i]).startswith(" ")]
    assert t_space and s_space
    cache = logitstore.open(text_cache)
    terms, n_minimal, n_spaced = [], 0, 0
    for sid in batch["seq_ids"]:
        seq = cache[sid]
        text, t_ends = text_spans(embedded_tokenizer, seq.input_ids)
        s_ids, s_ends = student_spans(tok, text, t_ends[0])
        ids = torch.tensor(s_ids)[None]
        lp = torch.log_softmax(student.model(input_ids=ids).logits[0].double(), -1)
        label_lp = dict(zip(seq.pos.tolist(), seq.label_logprob.tolist()))
        row = {int(p): j for j, p in enumerate(seq.pos)}

        def p_after(k, seq=seq, row=row):  # the teacher's cached entries predicting token k + 1
            j = row.get(k + 1)
            if j is None:
                return None
            n = seq.n_entries[j]
            return float(sum(math.exp(lp_) for t, lp_ in zip(seq.ids[j, :n], seq.logprobs[j, :n].astype(np.float64))
                             if int(t) in t_space))

        chunks = [(ti, sj) for ti, sj in reference_chunks(t_ends, s_ends, t_ends[0]) if 0 not in sj]
        n_minimal += len(chunks)
        groups = reference_groups(chunks, p_after, threshold) if "merge" in mode else chunks
        for ti, sj in groups:
            t = sum(label_lp[k] for k in ti)
            s = sum(lp[u - 1, ids[0, u]] for u in sj)
            p = p_after(ti[-1])
            if "append" in mode and p is not None:
                n_spaced += 1
                t += math.log(min(max(p, 1e-6), 1.0))  # the codec's rounding can sum past 1
                s = s + torch.logsumexp(lp[sj[-1], s_space], 0)
            a, b = t / 100 - 1e-6, s / 100 - 1e-6
            q = math.exp(a)
            terms.append(100 * (q * (a - b) + (1 - q) * (math.log(1 - q) - torch.log(-torch.expm1(b)))))
    ref = sum(terms) / len(terms)
    assert m["chunks"] == len(terms)
    if "merge" in mode:
        assert 0 < len(terms) < n_minimal  # the threshold merges some chunks, not all
    if "append" in mode:
        assert 0 < n_spaced and int(sb["chunk_space"].sum()) == n_spaced
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    ref.backward()
    torch.testing.assert_close(got_grad, student.model.get_input_embeddings().weight.grad.float(), rtol=1e-3,
                               atol=1e-6)


def test_merge_chunks_on_a_hand_made_alignment():
    from trainers.align import Alignment, chunk_ends, merge_chunks

    # teacher tokens 0..7: 0 context, chunks 0:[1], 1:[2,3], 2:[4], (5 context), 3:[6], 4 a special token's [7]
    al = Alignment(student_ids=np.arange(9), chunk_of_teacher=np.array([-1, 0, 1, 1, 2, -1, 3, 4]),
                   chunk_of_student=np.array([-1, -1, 0, 1, 1, 2, -1, 3, 4]), chunk_bytes=np.array([3, 5, 2, 4, 0]))
    first, last, s_last = chunk_ends(al)
    assert first.tolist() == [1, 2, 4, 6, 7] and last.tolist() == [1, 3, 4, 6, 7] and s_last.tolist() == [2, 4, 5, 7, 8]
    m = merge_chunks(al, np.zeros(5, bool))  # no word end: 0-2 join; the context gap and the special token split
    assert m.chunk_of_teacher.tolist() == [-1, 0, 0, 0, 0, -1, 1, 2]
    assert m.chunk_of_student.tolist() == [-1, -1, 0, 0, 0, 0, -1, 1, 2] and m.chunk_bytes.tolist() == [10, 4, 0]
    m = merge_chunks(al, np.array([True, False, False, False, False]))
    assert m.chunk_bytes.tolist() == [3, 7, 4, 0] and m.chunk_of_teacher.tolist() == [-1, 0, 1, 1, 1, -1, 2, 3]


def test_gradmag_balances_the_two_gradients(text_cache, bpe_student):
    """GradMag: the KD and CE terms weighted by their gradients' norms w.r.t. the final hidden states. The two terms
    alone (checked against plain references above) are ``--ce-weight 0`` and ``1``; their norms are taken here."""
    lam = 0.3
    c, student, cross, batch, objective = setup(text_cache, bpe_student, ce_weight=lam, gradmag=True)
    sb = cross.prepare(batch)
    loss, m = cross.loss(student.hidden, student, sb, objective)
    loss.backward()
    got = student.model.get_input_embeddings().weight.grad.clone()
    student.model.zero_grad()
    h = student.hidden(sb).detach().requires_grad_()
    alone = (c.replace(ce_weight=0.0, gradmag=False), c.replace(ce_weight=1.0, gradmag=False))
    norms = []
    for cc in alone:
        cross.cfg = cc
        norms.append(float(torch.autograd.grad(cross.loss(lambda _: h, student, sb, objective)[0], h)[0].norm()))
    w = ((1 - lam) / norms[0], lam / norms[1])
    assert m["gradmag_kd"] == pytest.approx(w[0] / sum(w), rel=1e-5)
    total = 0.0
    for cc, wi in zip(alone, w):
        cross.cfg = cc
        total = total + wi * cross.loss(student.hidden, student, sb, objective)[0] / sum(w)
    assert float(loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    total.backward()
    torch.testing.assert_close(got, student.model.get_input_embeddings().weight.grad, rtol=1e-4, atol=1e-7)
    assert w[0] / sum(w) != pytest.approx(1 - lam, rel=1e-3)  # the balancing moved the weights off lambda


def test_alm_mode_and_gradmag_refusals(text_cache, byte_student, tmp_path):
    from trainers.config import TrainConfig

    base = dict(cache=str(text_cache), student=str(byte_student), output=str(tmp_path / "o"), max_steps=1)
    for kw, words in [(dict(alm_mode="append_space"), "--alm-mode goes with --cross-tokenizer"),
                      (dict(gradmag=True, ce_weight=0.5), "--gradmag goes with --cross-tokenizer"),
                      (dict(cross_tokenizer="alm", alm_mode="append"), "choose from plain, append_space"),
                      (dict(cross_tokenizer="gold", alm_mode="append_space"), "goes with --cross-tokenizer alm"),
                      (dict(cross_tokenizer="alm", alm_mode="merge_by_space_prob", alm_space_threshold=1.0),
                       "--alm-space-threshold 1.0: must be in (0, 1)"),
                      (dict(cross_tokenizer="alm", gradmag=True), "--ce-weight 0.0: --gradmag balances KD and CE"),
                      (dict(cross_tokenizer="alm", gradmag=True, ce_weight=0.5, loss="ce"), "--loss ce has no KD"),
                      (dict(cross_tokenizer="nextbyte", gradmag=True, ce_weight=0.5), "goes with --cross-tokenizer alm "
                                                                                      "or gold")]:
        with pytest.raises(logitstore.errors.InvalidInputError, match=None) as e:
            TrainConfig(**base, **kw).validate()
        assert words in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    import dataclasses

    from trainers.cross import CrossTokenizer
    from trainers.student import load_student

    c = cfg(text_cache, byte_student, tmp_path / "o", alm_mode="append_space")
    m = logitstore.open(text_cache).manifest
    student = load_student(c.student, manifest=m, seed=1, cache_tokenizer=False)
    other = dataclasses.replace(m, codec={**m.codec, "values": "none"})  # no stored values: no space probability
    with pytest.raises(logitstore.errors.InvalidInputError, match="needs the entries' logprobs"):
        CrossTokenizer(c, other, student)
    c = cfg(text_cache, byte_student, tmp_path / "o", cross_tokenizer="nextbyte")
    with pytest.raises(logitstore.errors.InvalidInputError, match="needs the entries' logprobs.*use alm"):
        CrossTokenizer(c, other, student)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def sampled_text_cache(tmp_path_factory, tiny_teacher):
    """The lines of ``text_cache`` in a cache of 16 systematic draws (the default rule's kind): its entries are the
    drawn ids with their exact logprobs, ``tail_mass`` the exact mass outside them."""
    from builders.config import BuildConfig
    from builders.driver import build
    from logitstore import Sampled

    d = tmp_path_factory.mktemp("sampledcache")
    data = d / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_lines(48)))
    build(str(tiny_teacher), data, d / "cache", BuildConfig(rule=Sampled(16, systematic=True), max_length=48),
          progress=False)
    return d / "cache"


@pytest.mark.parametrize("which,at,cache", [("byte", "chunks", "text_cache"), ("bpe", "chunks", "text_cache"),
                                            ("byte", "tokens", "text_cache"), ("bpe", "tokens", "text_cache"),
                                            ("byte", "chunks", "sampled_text_cache")])
def test_nextbyte_loss_equals_a_plain_reference(request, byte_student, bpe_student, embedded_tokenizer, which, at,
                                                cache):
    """Next-byte KD: at each chunk start, (1 - lambda) times the forward KL between the teacher's and the student's
    next-byte distributions in 256 + 1 buckets plus lambda times the CE, and the CE at every other token; each
    next-byte distribution taken one token back (from the distribution that predicted the token before the chunk:
    that token, then the first byte of the next, or a longer token that extends it), restated here from the
    tokenizers' own token strings, the batch's entries and the student's full distributions. The random teacher's
    entries rarely extend the token they follow, so the batch gets one such entry per position.
    With ``--nextbyte-at tokens`` every other student token of a chunk is a site too: at a byte offset inside
    teacher token v, the teacher's side is its distribution before v given v's bytes so far (w): the tokens
    extending w by their next byte, and w as a whole token followed by the first byte of the distribution after v."""
    from trainers.align import byte_level_alphabet

    lam = 0.25
    text_cache = request.getfixturevalue(cache)
    c, student, cross, batch, objective = setup(text_cache, byte_student if which == "byte" else bpe_student,
                                                cross_tokenizer="nextbyte", ce_weight=lam, nextbyte_at=at)
    assert logitstore.open(text_cache).manifest.rule["rule"] == ("sample" if cache.startswith("sampled") else "topk")
    alphabet = byte_level_alphabet()

    def spelled(tokenizer):
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return [b"" if i in special else bytes(alphabet[ch] for ch in t) for i, t in enumerate(names)]

    t_text, s_text = spelled(embedded_tokenizer), spelled(cross.tokenizer)
    longer = {}  # a teacher token strictly extending each prefix
    for i, t in enumerate(t_text):
        for n in range(1, len(t)):
            longer.setdefault(t[:n], i)
    B, T = batch["input_ids"].shape
    for b in range(B):
        for p in range(1, T):  # layout p - 1 predicts token p: its last entry becomes an extension of token p
            if batch["target_mask"][b, p - 1] and t_text[int(batch["input_ids"][b, p])] in longer:
                batch["topk_ids"][b, p - 1, -1] = longer[t_text[int(batch["input_ids"][b, p])]]
                batch["topk_logprobs"][b, p - 1, -1] = math.log(0.05)
                batch["topk_valid"][b, p - 1, -1] = True
    sb = cross.prepare(batch)
    loss, m = cross.loss(student.hidden, student, sb, objective)
    loss.backward()
    got_grad = student.model.get_input_embeddings().weight.grad.clone()
    student.model.zero_grad()

    def one_back(p_i, v, p_v, dist, texts, tail=0.0, exact=None):
        """(p_v p_i + ext) / (p_v + sum(ext)), ext the mass of the tokens u extending v by their next byte: dist[u]
        where given (or ``exact[u]``), else an even share of ``tail`` among the tokens outside ``dist``."""
        ext = torch.zeros(257, dtype=torch.float64)
        if (id(texts), v) not in longer_of:
            longer_of[id(texts), v] = [(u, tu[len(v)]) for u, tu in enumerate(texts)
                                       if v and len(tu) > len(v) and tu.startswith(v)]
        for u, nxt in longer_of[id(texts), v]:
            ext[nxt] += dist[u] if u in dist else (exact or {}).get(u, tail / (len(texts) - len(dist)))
        return (p_v * p_i + ext) / (p_v + ext.sum()), float(ext.sum().detach())

    longer_of = {}

    t_bucket = [t[0] if t else 256 for t in t_text]
    vocab_count = torch.bincount(torch.tensor(t_bucket), minlength=257).double()
    s_bucket = torch.tensor([t[0] if t else 256 for t in s_text])
    kls, ces, ext_mass = [], [], [0.0, 0.0]
    for b in range(B):
        L = int(batch["attention_mask"][b].sum())
        t_ids = batch["input_ids"][b, :L].tolist()
        text, t_ends = text_spans(embedded_tokenizer, t_ids)
        s_ids, s_ends = student_spans(cross.tokenizer, text, t_ends[0])
        ids = torch.tensor(s_ids)[None]
        lp = torch.log_softmax(student.model(input_ids=ids).logits[0].double(), -1)

        def entries(k, b=b):  # the batch's entries predicting teacher token k: {id: probability}
            ok = batch["topk_valid"][b, k - 1]
            return {int(t): math.exp(float(x)) for t, x in zip(batch["topk_ids"][b, k - 1][ok],
                                                               batch["topk_logprobs"][b, k - 1][ok].double())}

        def first_bytes(k, b=b):  # the first byte of teacher token k, the tail spread evenly over the other tokens
            p = torch.zeros(257, dtype=torch.float64)
            at_k = entries(k)
            for t, pt in at_k.items():
                p[t_bucket[t]] += pt
            rest = vocab_count.clone()
            for t in at_k:
                rest[t_bucket[t]] -= 1
            p += float(batch["tail_mass"][b, k - 1]) * rest / rest.sum()
            return p / p.sum()

        def student_side(u, lp=lp, s_ids=s_ids):  # the student's next-byte distribution before its token u, one
            # token back
            q_i = torch.zeros(257, dtype=torch.float64).index_add(0, s_bucket, lp[u - 1, :len(s_bucket)].exp())
            prev = lp[u - 2, :len(s_text)].exp()
            return one_back(q_i, s_text[s_ids[u - 1]], prev[s_ids[u - 1]], dict(enumerate(prev)), s_text)

        inner = 0
        for ti, sj in reference_chunks(t_ends, s_ends, t_ends[0]):
            if 0 in sj:
                continue
            for u in sj[1:]:
                i_b = s_ends[u - 1]  # the byte where student token u starts, inside teacher token tv
                tv = next(k for k, e in enumerate(t_ends) if e > i_b)
                start = t_ends[tv - 1] if tv else 0
                mask = batch["target_mask"][b]
                if at == "chunks" or not (tv >= 1 and mask[tv - 1] and mask[tv] and start < i_b):
                    ces.append(-lp[u - 1, ids[0, u]])
                    continue
                inner += 1
                ces.append(lam * -lp[u - 1, ids[0, u]])
                v, w = t_ids[tv], t_text[t_ids[tv]][:i_b - start]
                head, tail = entries(tv), float(batch["tail_mass"][b, tv - 1])
                w_id = min((k for k, t in enumerate(t_text) if t == w), default=None)
                p_w = 0.0 if w_id is None else head.get(w_id, tail / (len(t_text) - len(head)))
                p, _ = one_back(first_bytes(tv + 1), w, p_w, head, t_text, tail=tail,
                                exact={v: math.exp(float(batch["label_logprob"][b, tv - 1]))})
                q, _ = student_side(u)
                keep = p > 0
                kls.append((p[keep] * (p[keep].log() - q[keep].log())).sum())
            if ti[0] < 2 or not batch["target_mask"][b, ti[0] - 2] or sj[0] < 2:  # no prediction of the token
                ces.append(-lp[sj[0] - 1, ids[0, sj[0]]])  # before the chunk on both sides: CE alone
                continue
            ces.append(lam * -lp[sj[0] - 1, ids[0, sj[0]]])  # the chunk's first token: (1 - lambda) KD + lambda CE
            p, e_t = one_back(first_bytes(ti[0]), t_text[t_ids[ti[0] - 1]],
                              math.exp(float(batch["label_logprob"][b, ti[0] - 2])), entries(ti[0] - 1), t_text,
                              tail=float(batch["tail_mass"][b, ti[0] - 2]))
            q, e_s = student_side(sj[0])
            assert bool((p > 0)[vocab_count > 0].all())  # every byte a teacher token starts with keeps some mass
            keep = p > 0
            kls.append((p[keep] * (p[keep].log() - q[keep].log())).sum())
            ext_mass[0] += e_t
            ext_mass[1] += float(e_s)
        assert (inner > 0) == (at == "tokens")
    ref = ((1 - lam) * sum(kls) + sum(ces)) / len(ces)  # the mean over the student's tokens
    kl_values = [float(k.detach()) for k in kls]
    assert int(sb["nb_ok"].sum()) == len(kls) > 0 and min(kl_values) >= 0 and max(kl_values) > 0.1
    assert ext_mass[0] > 0 and (ext_mass[1] > 0) == (which == "bpe")  # longer tokens: the teacher's, the BPE's
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    ref.backward()
    torch.testing.assert_close(got_grad, student.model.get_input_embeddings().weight.grad.float(), rtol=1e-3,
                               atol=1e-6)
