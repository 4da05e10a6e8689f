"""logitstore build end to end on a tiny teacher: values against the plain reference, resume after SIGKILL."""

import json
import os
import subprocess
import sys

import numpy as np

import logitstore
from logitstore.verify import verify
from tests.builders.conftest import reference_logprobs
from tests.conftest import kill_when
from tools.cli import main

WORDS = ("teacher student cache token logit entropy shard manifest parquet query select train sample "
         "distil vocabulary model batch resume").split()


def write_jsonl(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(4, 30))))}) + "\n")
        f.write(json.dumps({"prompt": "Q: what is cached?", "response": " A: sparse logits."}) + "\n")


def content(path):
    return {s.seq_id: (s.record, s.input_ids.tolist(), s.pos.tolist(), s.ids.tolist(), s.logprobs.tolist(),
                       s.entropy.tolist(), s.label_logprob.tolist()) for s in logitstore.open(path)}


def test_build_matches_the_reference(tiny_teacher, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 12)
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "8", "-q",
                 "--values", "fp32", "--token-budget", "96"]) == 0
    assert "13 sequences" in capsys.readouterr().out
    assert verify(out) == []
    cache = logitstore.open(out)
    m = cache.manifest
    assert m.teacher["dtype"] == "fp32" and m.tokenizer["fingerprint"] and m.build["data_fingerprint"]
    for seq in cache:
        ref = reference_logprobs(tiny_teacher, seq.input_ids)[seq.pos - 1]
        top = np.sort(ref, axis=-1)[:, ::-1][:, :8]
        np.testing.assert_allclose(seq.logprobs, top, atol=1e-4)
        np.testing.assert_allclose(seq.label_logprob, ref[np.arange(len(ref)), seq.labels], atol=1e-4)
        p = np.exp(ref)
        np.testing.assert_allclose(seq.entropy, -(p * ref).sum(-1), atol=1e-3)
        if seq.record == 12:  # the prompt/response record: only response tokens are cached
            assert seq.pos[0] > 1 and seq.loss_mask.all()


def test_resume_refuses_different_inputs(tiny_teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 5)
    out = tmp_path / "c"
    base = ["build", str(tiny_teacher), str(data), "-o", str(out), "-q"]
    assert main(base + ["--top-k", "8"]) == 0
    assert main(base + ["--top-k", "8"]) == 2  # exists, no --resume
    assert main(base + ["--top-k", "4", "--resume"]) == 2  # another rule
    write_jsonl(data, 6, seed=1)
    assert main(base + ["--top-k", "8", "--resume"]) == 2  # other data


def _build_proc(teacher, data, out, resume):
    cmd = [sys.executable, "-m", "tools.cli", "build", str(teacher), str(data), "-o", str(out), "--top-k", "8",
           "--token-budget", "256", "--shard-mb", "0.004", "--row-group-positions", "100", "-q"] + (
               ["--resume"] if resume else [])
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL)


def test_sigkill_then_resume_equals_an_uninterrupted_build(tiny_teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 150)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert _build_proc(tiny_teacher, data, full, False).wait(timeout=300) == 0
    proc = _build_proc(tiny_teacher, data, crashed, False)
    kill_when(proc, lambda: len(logitstore.open(crashed).manifest.shards) >= 3)
    partial = logitstore.open(crashed)
    assert not partial.manifest.complete and 0 < len(partial) < 151
    assert _build_proc(tiny_teacher, data, crashed, True).wait(timeout=300) == 0
    assert verify(crashed) == []
    want, got = content(full), content(crashed)
    assert got.keys() == want.keys()  # nothing lost, nothing duplicated (seq ids are unique keys)
    assert logitstore.open(crashed).manifest.sequences == len(want)
    for k in want:
        assert got[k][:3] == want[k][:3]
        np.testing.assert_allclose(np.array(got[k][4]), np.array(want[k][4]), atol=1e-4)


def test_a_failed_first_build_leaves_nothing_behind(tiny_teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 3)
    out = tmp_path / "c"
    base = ["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "-q"]
    assert main(base + ["--max-length", "1"]) == 2  # refused option
    assert not out.exists()
    assert main(base + ["--text-field", "nope"]) == 2  # every record bad
    assert not out.exists()
    assert main(base) == 0 and verify(out) == []
