"""The trainer under failure: a damaged cache is refused (or its bad shards skipped when asked, and said so),
and a training process killed with SIGKILL resumes from its checkpoint to the same weights, bit for bit."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import logitstore
from logitstore.errors import CorruptCacheError
from trainers.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _cfg(cache, student, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), student=str(student), output=str(out), max_steps=3, batch_size=4, max_length=48,
                quiet=True, trace_data=True)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def damaged(text_cache, tmp_path):
    """A copy of the text cache with one byte flipped in the middle of its second shard."""
    path = tmp_path / "damaged"
    shutil.copytree(text_cache, path)
    m = logitstore.open(path).manifest
    assert len(m.shards) >= 3
    shard = path / m.shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    return path, m.shards[1].file


def test_a_damaged_cache_is_refused_naming_the_shard(damaged, student_config, tmp_path):
    from trainers.loop import train

    path, bad = damaged
    with pytest.raises(CorruptCacheError, match=bad) as exc:
        train(_cfg(path, student_config, tmp_path / "o"))
    assert "--skip-bad-shards" in str(exc.value)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_skip_bad_shards_trains_on_the_rest_and_says_so(damaged, text_cache, student_config, tmp_path, caplog):
    import pyarrow.parquet as pq

    from trainers.loop import train

    path, bad = damaged
    in_bad = set(pq.read_table(Path(text_cache) / bad, columns=["seq_id"]).column(0).to_pylist())
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="trainers.loop"):
        train(_cfg(path, student_config, out, skip_bad_shards=True, max_steps=12))
    assert any(bad in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    seen = {s for row in (out / "data-rank0.jsonl").read_text().splitlines() for s in json.loads(row)["seq_ids"]}
    total = len(logitstore.open(text_cache))
    assert seen and not seen & in_bad
    assert len(seen) == total - len(in_bad)  # 12 steps x 4 cover one epoch of the sound shards exactly once


def _signalled_run(text_cache, student_config, tmp_path, sig, loss: str):
    """An uninterrupted run (``tmp_path/uninterrupted``) and the same run (``tmp_path/signalled``) sent ``sig`` once
    its step-4 checkpoint exists; returns (the signalled process, finished, its argv without -o, env)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "tools.cli", "train", str(text_cache), "--student", str(student_config),
            "--loss", loss, "--max-steps", "10", "--save-every", "2", "--keep-checkpoints", "10",
            "--batch-size", "4", "--max-length", "48", "--quiet"]
    subprocess.run(args + ["-o", str(tmp_path / "uninterrupted")], check=True, cwd=ROOT, env=env, capture_output=True,
                   timeout=300)
    out = tmp_path / "signalled"
    proc = subprocess.Popen(args + ["-o", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-0000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    return proc, err, args, env


def _resumes_to_the_uninterrupted_weights(tmp_path, args, env) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "signalled"
    r = subprocess.run(args + ["-o", str(out), "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(tmp_path / "uninterrupted" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []


def test_a_training_run_killed_with_sigkill_resumes_to_the_same_weights(text_cache, student_config, tmp_path):
    proc, _, args, env = _signalled_run(text_cache, student_config, tmp_path, signal.SIGKILL, "reverse_kl")
    assert not (tmp_path / "signalled" / "model.safetensors").exists()  # killed before the end
    _resumes_to_the_uninterrupted_weights(tmp_path, args, env)


def test_a_version_1_cache_still_trains(tmp_path):
    """A cache written by logitstore 0.1 (format version 1, tests/data/format-v1) is read and trained on."""
    import shutil

    from tests.trainers.conftest import write_student_config
    from trainers.loop import train

    v1 = Path(__file__).resolve().parents[1] / "data" / "format-v1"
    for name, loss in (("topk", "forward_kl"), ("sample", "forward_kl")):
        cache = tmp_path / name
        shutil.copytree(v1 / name, cache)
        cfg = write_student_config(tmp_path / f"student-{name}" / "config.json", vocab=64, hidden=16)
        out = tmp_path / f"out-{name}"
        summary = train(TrainConfig(cache=str(cache), student=str(cfg), output=str(out), loss=loss, max_steps=3,
                                    batch_size=2, max_length=16, eval=str(cache), quiet=True))
        assert summary["steps"] == 3 and math.isfinite(summary["eval_ce"]) and math.isfinite(summary["eval_kl"])
        assert (out / "model.safetensors").is_file()


def test_a_run_killed_after_its_last_checkpoint_still_reports_its_last_metrics(text_cache, student_config, tmp_path):
    """Killed between the final checkpoint and the summary, a resumed run trains no step; its summary's ``last``
    is the row the first attempt logged at that step, not empty (``distill`` records its train loss from it)."""
    from trainers.loop import train

    out = tmp_path / "o"
    first = train(_cfg(text_cache, student_config, out, trace_data=False))
    assert first["last"]["step"] == 3 and math.isfinite(first["last"]["loss"])
    for name in ("summary.json", "model.safetensors"):  # what a kill before the end leaves out
        (out / name).unlink()
    again = train(_cfg(text_cache, student_config, out, trace_data=False, resume=True))
    assert again["steps"] == 3
    assert again["last"] == first["last"]
    assert json.loads((out / "summary.json").read_text())["last"] == first["last"]


def test_ctrl_c_is_one_line_and_the_run_resumes_to_the_same_weights(text_cache, student_config, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit 130 with one line that says how to continue, no traceback, no lock left; the
    same command with --resume ends with the weights of an uninterrupted run."""
    proc, err, args, env = _signalled_run(text_cache, student_config, tmp_path, signal.SIGINT, "forward_kl")
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal reached it")
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("logitstore ")]
    assert lines == ["logitstore train: interrupted; what was committed is kept, and the same command with --resume "
                     "continues it"], err[-2000:]
    assert not (tmp_path / "signalled" / "run.lock").exists()
    _resumes_to_the_uninterrupted_weights(tmp_path, args, env)
