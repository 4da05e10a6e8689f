"""The trainer end to end on CPU: the loss falls (against a full-vocabulary reference), eval numbers, exact
resume, DDP under torchrun, sweeps, vocabulary checks and token weighting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from tests.conftest import FP32_ATOL
from tests.trainers.conftest import write_student_config
from trainers.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def cfg(cache, student, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), student=str(student), output=str(out), max_steps=6, batch_size=4, max_length=48,
                lr=3e-3, quiet=True, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def full_kl_and_ce(teacher_dir, student_model, cache_path, seq_ids) -> tuple[float, float]:
    """Plain full-vocabulary reference: mean over target positions of KL(teacher || student) and label NLL."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student_model.eval()
    cache = logitstore.open(cache_path)
    kl = ce = 0.0
    n = 0
    for seq in cache.iter_sequences(seq_ids):
        ids = torch.tensor(seq.input_ids, dtype=torch.long)[None]
        with torch.no_grad():
            lt = torch.log_softmax(teacher(ids).logits[0].double(), -1)
            ls = torch.log_softmax(student_model(ids).logits[0].double(), -1)
        rows = torch.tensor(seq.pos[seq.loss_mask] - 1, dtype=torch.long)
        labels = torch.tensor(seq.labels[seq.loss_mask], dtype=torch.long)
        kl += float((lt[rows].exp() * (lt[rows] - ls[rows])).sum())
        ce += float(-ls[rows, labels].sum())
        n += len(rows)
    return kl / n, ce / n


def test_forward_kl_student_moves_toward_the_teacher(text_cache, student_config, tiny_teacher, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.loop import train

    out = tmp_path / "run"
    summary = train(cfg(text_cache, student_config, out, max_steps=25, holdout=0.2, lr=1e-2, warmup_steps=2))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (out / "tokenizer.json").is_file() and (out / "summary.json").is_file()
    held = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in held if "loss" in r] == list(range(1, 26))
    torch.manual_seed(0)  # the trainer's initialisation of a config student: seeded by --seed
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_config), dtype=torch.float32)
    ids = [s for s in logitstore.open(text_cache).scalars(["seq_id"]).column(0).to_pylist()]
    from logitstore.selection import in_fraction
    from trainers.sources import HOLDOUT_SEED

    held_ids = [s for s in ids if in_fraction(s, HOLDOUT_SEED, 0.2)]
    kl0, ce0 = full_kl_and_ce(tiny_teacher, fresh, text_cache, held_ids)
    kl1, ce1 = full_kl_and_ce(tiny_teacher, model, text_cache, held_ids)
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    # the trainer's own eval: CE equals the reference; its bucket KL is a lower bound of the full KL
    assert summary["eval_ce"] == pytest.approx(ce1, rel=1e-4)
    assert summary["eval_kl"] <= kl1 + 1e-4 and summary["eval_kl"] > 0.3 * kl1


def test_eval_kl_equals_the_coarse_grained_reference(text_cache, student_config, tmp_path):
    """evaluate(): KL over (stored entries + one bucket) computed here from the decoded cache in float64."""
    from trainers.evaluation import evaluate
    from trainers.student import load_student

    cache = logitstore.open(text_cache)
    student = load_student(str(student_config), manifest=cache.manifest, seed=3)
    c = cfg(text_cache, student_config, tmp_path / "x", chunk_size=7)
    got = evaluate(student, str(text_cache), c, torch.device("cpu"))
    kl = ce = 0.0
    n = 0
    for seq in cache:
        ids = torch.tensor(seq.input_ids, dtype=torch.long)[None]
        with torch.no_grad():
            ls = torch.log_softmax(student.model(ids).logits[0].double(), -1).numpy()
        for j in np.flatnonzero(seq.loss_mask):
            row, valid = ls[seq.pos[j] - 1], seq.ids[j] >= 0
            p = np.exp(seq.logprobs[j][valid].astype(np.float64))
            q = np.exp(row[seq.ids[j][valid]])
            p_t, q_t = np.append(p, max(1 - p.sum(), 0)), np.append(q, 1 - q.sum())
            p_t /= p_t.sum()
            nz = p_t > 0
            kl += float((p_t[nz] * (np.log(p_t[nz]) - np.log(q_t[nz]))).sum())
            ce -= row[seq.labels[j]]
            n += 1
    assert got["eval_tokens"] == n
    assert got["eval_ce"] == pytest.approx(ce / n, rel=1e-5)
    assert got["eval_kl"] == pytest.approx(kl / n, rel=1e-3, abs=1e-5)


def test_resume_continues_bit_for_bit(text_cache, student_config, tmp_path):
    from safetensors.torch import load_file

    from trainers.loop import train

    a = tmp_path / "a"
    train(cfg(text_cache, student_config, a, loss="jsd", save_every=3, keep_checkpoints=5, trace_data=True))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-0000006")
    for f in ("model.safetensors", "summary.json"):
        (b / f).unlink()
    train(cfg(text_cache, student_config, b, loss="jsd", save_every=3, keep_checkpoints=5, trace_data=True,
              resume=True))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = lambda p: [json.loads(r) for r in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(a)] == [r["loss"] for r in rows(b)]
    assert (a / "data-rank0.jsonl").read_text() == (b / "data-rank0.jsonl").read_text()


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_output(text_cache, student_config, tmp_path):
    from logitstore.errors import InvalidInputError
    from trainers.loop import train

    out = tmp_path / "r"
    train(cfg(text_cache, student_config, out, max_steps=2))
    with pytest.raises(InvalidInputError, match="previous training run"):
        train(cfg(text_cache, student_config, out, max_steps=2))
    with pytest.raises(InvalidInputError, match="--lr"):
        train(cfg(text_cache, student_config, out, max_steps=3, lr=1.0, resume=True))
    with pytest.raises(InvalidInputError, match="no complete checkpoint"):
        train(cfg(text_cache, student_config, tmp_path / "empty", resume=True))


def test_tokenizer_and_vocab_mismatch_refused(text_cache, student_config, tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    from trainers.loop import train
    from trainers.student import StudentMismatchError

    other = tmp_path / "other"
    shutil.copy(student_config, tmp_path / "cfg.json")
    other.mkdir()
    shutil.copy(student_config, other / "config.json")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.add_tokens(["<a-new-token>"])
    tok.save_pretrained(other)
    with pytest.raises(StudentMismatchError, match="fingerprint"):
        train(cfg(text_cache, other / "config.json", tmp_path / "o1", max_steps=1))
    small = write_student_config(tmp_path / "small" / "config.json", vocab=1000)
    with pytest.raises(StudentMismatchError, match="does not fit"):
        train(cfg(text_cache, small, tmp_path / "o2", max_steps=1))


def test_smaller_padded_student_is_accepted_when_every_cached_id_fits(tmp_path):
    """A cache with vocab_size 300 whose ids all lie below 250: a 256-row student fits; a 200-row one does not."""
    from logitstore import TopK
    from tests.conftest import make_sequences, write_cache
    from trainers.student import StudentMismatchError, check_student, load_student, max_token_id

    rng = np.random.default_rng(0)
    refs = make_sequences(rng, 6, vocab=250, rule=TopK(8), max_tokens=20)
    path = tmp_path / "c"
    write_cache(path, refs, vocab=300, rule=TopK(8))
    cache = logitstore.open(path)
    want = max(max(int(r.input_ids.max()), int(max(x.max() for x in r.ids))) for r in refs)
    assert max_token_id(cache) == want
    ok = load_student(str(write_student_config(tmp_path / "s256" / "config.json", vocab=256)),
                      manifest=cache.manifest)
    check_student(ok, cache)
    bad = load_student(str(write_student_config(tmp_path / "s200" / "config.json", vocab=200)),
                       manifest=cache.manifest)
    if want >= 200:
        with pytest.raises(StudentMismatchError, match=f"token id {want}"):
            check_student(bad, cache)


def test_packed_rows_give_each_sequence_its_own_hidden_states(text_cache, student_config):
    """Packing: hidden states of a packed row equal those of each sequence run alone (plain forward)."""
    from trainers.data import StreamingLoader
    from trainers.student import load_student

    cache = logitstore.open(text_cache)
    student = load_student(str(student_config), manifest=cache.manifest, seed=1)
    student.model.eval()
    loader = StreamingLoader(str(text_cache), batch_size=2, max_length=96, pack=True, shuffle=False, epochs=1)
    batch = next(iter(loader))
    assert int(batch["segment_ids"].max()) >= 2
    with torch.no_grad():
        h = student.hidden(batch)
        seqs = {s.seq_id: s for s in cache}
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][r]
            for k in range(1, int(seg.max()) + 1):
                cols = torch.nonzero(seg == k).flatten()
                ids = batch["input_ids"][r, cols][None]
                alone = student.model.base_model(input_ids=ids).last_hidden_state[0]
                torch.testing.assert_close(h[r, cols], alone, atol=FP32_ATOL, rtol=1e-4)
        assert len(seqs) == len(cache)


def test_sweep_trains_several_students_from_one_cache(text_cache, student_config, tmp_path, capsys):
    from logitstore.selection import save_selection
    from logitstore.subset import make_selection
    from tools.cli import main

    sel = tmp_path / "short.selection.json"
    save_selection(sel, make_selection(text_cache, where="n_tokens < 30"))
    wide = write_student_config(tmp_path / "wide" / "config.json", hidden=48)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
[defaults]
max_steps = 3
holdout = 0.2

[[runs]]
name = "narrow-fkl"
student = "{student_config}"
loss = "forward_kl"

[[runs]]
name = "wide-tvd-short"
student = "{wide}"
loss = "tvd"
cache = "{sel}"
""")
    out = tmp_path / "sweep"
    assert main(["train", str(text_cache), "--sweep", str(sweep), "-o", str(out), "--batch-size", "4",
                 "--max-length", "48", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "narrow-fkl" in table and "wide-tvd-short" in table and "eval_ce" in table
    for name, hidden in (("narrow-fkl", 32), ("wide-tvd-short", 48)):
        assert json.loads((out / name / "config.json").read_text())["hidden_size"] == hidden
        assert json.loads((out / name / "summary.json").read_text())["steps"] == 3
    assert json.loads((out / "wide-tvd-short" / "train_config.json").read_text())["cache"] == str(sel)


def test_cli_contract_train_writes_a_loadable_model(text_cache, student_config, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "train", str(text_cache), "--student",
                        str(student_config), "--loss", "ce", "-o", str(out), "--max-steps", "2", "--batch-size", "2",
                        "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    AutoModelForCausalLM.from_pretrained(out)
    bad = subprocess.run([sys.executable, "-m", "tools.cli", "train", str(text_cache), "--student",
                          str(student_config), "--loss", "kl", "-o", str(tmp_path / "x")], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--loss 'kl'" in bad.stderr and "forward_kl" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_torchrun_two_ranks_on_cpu_see_disjoint_data(text_cache, student_config, tmp_path):
    out = tmp_path / "ddp"
    cache = logitstore.open(text_cache)
    n = len(cache)
    steps = 3  # 48 sequences / (2 ranks x 4) = 6 batches per rank and epoch: 3 steps stay inside one epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "tools.cli", "train", str(text_cache),
                        "--student", str(student_config), "-o", str(out), "--max-steps", str(steps),
                        "--batch-size", "4", "--max-length", "48", "--trace-data", "--quiet", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        rows = [json.loads(x) for x in (out / f"data-rank{rank}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == list(range(steps))
        seen[rank] = [s for x in rows for s in x["seq_ids"]]
        assert len(seen[rank]) == len(set(seen[rank])) == 4 * steps
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) <= set(cache.scalars(["seq_id"]).column(0).to_pylist())
    assert n >= 24
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_two_nodes_read_each_sequence_once_per_epoch(text_cache, student_config, tmp_path):
    """Two torchrun "nodes" (one process each, rendezvous over localhost, as on two machines sharing the cache's
    filesystem), each with 2 DataLoader workers: one epoch trains on every cached sequence exactly once."""
    out = tmp_path / "nodes"
    cache = logitstore.open(text_cache)
    all_ids = cache.scalars(["seq_id"]).column(0).to_pylist()
    batch = 4
    steps = 2 * len(all_ids) // (2 * batch)  # two epochs' worth: 48 sequences / (2 ranks x 4) per epoch
    port = str(29700 + os.getpid() % 1000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", port, "-m", "tools.cli", "train",
         str(text_cache), "--student", str(student_config), "-o", str(out), "--max-steps", str(steps),
         "--batch-size", str(batch), "--max-length", "48", "--num-workers", "2", "--trace-data", "--quiet",
         "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    seen = []
    for rank in (0, 1):
        rows = [json.loads(x) for x in (out / f"data-rank{rank}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == list(range(steps))
        seen += [s for x in rows if x["epoch"] == 0 for s in x["seq_ids"]]
        assert rows[-1]["epoch"] >= 1  # each rank got past its share of epoch 0
    assert sorted(seen) == sorted(all_ids)  # epoch 0 saw every sequence once: none twice, none left out
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_keep_fraction_and_routing_against_a_hand_reference():
    from trainers.weighting import coefficients

    rng = np.random.default_rng(0)
    B, T = 3, 5
    ent = torch.tensor(rng.random((B, T)), dtype=torch.float32)
    sel = torch.tensor(rng.random((B, T)) < 0.8)
    batch = {"weight": torch.tensor([[1.0] * T, [2.0] * T, [0.5] * T]), "teacher_entropy": ent,
             "correct": torch.tensor([[1] * T, [0] * T, [-1] * T], dtype=torch.int8)}
    c = TrainConfig(cache="c", student="s", output="o", keep_fraction=0.5, ce_weight=0.25, route="correctness")
    w, kd, ce = coefficients(batch, sel, c)
    e = ent[sel].numpy()
    n_keep = int(np.ceil(0.5 * len(e)))
    kept = np.zeros(len(e), bool)
    kept[np.argsort(-e, kind="stable")[:n_keep]] = True
    np.testing.assert_allclose(w.numpy(), batch["weight"][sel].numpy() * kept)
    corr = batch["correct"][sel].numpy()
    np.testing.assert_allclose(kd.numpy(), np.where(corr == 1, 0, np.where(corr == 0, 1, 0.75)))
    np.testing.assert_allclose(ce.numpy(), np.where(corr == 1, 1, np.where(corr == 0, 0, 0.25)))
    low = coefficients(batch, sel, c.replace(keep_lowest=True, route="none"))[0]
    kept_low = np.zeros(len(e), bool)
    kept_low[np.argsort(e, kind="stable")[:n_keep]] = True
    np.testing.assert_allclose(low.numpy(), batch["weight"][sel].numpy() * kept_low)


def test_bf16_autocast_and_epochs_limit(text_cache, student_config, tmp_path):
    """--dtype bf16 trains with finite losses; --epochs 1 stops after one epoch of this rank's batches."""
    from trainers.loop import train

    n = len(logitstore.open(text_cache))
    out = tmp_path / "bf16"
    s = train(cfg(text_cache, student_config, out, dtype="bf16", epochs=1, max_steps=1000, batch_size=8))
    assert s["steps"] == -(-n // 8)  # ceil: one epoch of batches of 8
    losses = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines() if "loss" in r]
    assert len(losses) == s["steps"] and all(np.isfinite(losses))
