"""A writer killed with SIGKILL (no cleanup runs) loses at most the shard in progress.

A child process writes deterministic sequences and is killed after its second shard
commit; the cache must then read back exactly the committed prefix, verify clean apart
from the interrupted shard's temporary file, and resume to the same content as an
uninterrupted write.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time


import logitstore
from logitstore.verify import verify

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import logitstore

    def sequences():
        rng = np.random.default_rng(0)
        for i in range(60):
            z = rng.standard_normal((20, 64)) * 3
            lp = z - np.log(np.exp(z).sum(1, keepdims=True))
            e = logitstore.sparsify(lp, logitstore.TopK(4))
            tok = rng.integers(0, 64, 21)
            yield dict(input_ids=tok, ids=e.ids, logprobs=e.logprobs, tail_mass=e.tail_mass,
                       label_logprob=lp[np.arange(20), tok[1:]], entropy=-(np.exp(lp) * lp).sum(1), record=i)

    path, resume, slow = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
    with logitstore.CacheWriter(path, vocab_size=64, rule=logitstore.TopK(4), shard_bytes=12_000,
                                row_group_positions=100, resume=resume) as w:
        for s in sequences():
            if logitstore.sequence_id(s["input_ids"]) in w.committed_ids:
                continue
            w.add(**s)
            if slow:
                time.sleep(0.02)
""")


def run_child(path, resume, slow):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), "1" if resume else "0", "1" if slow else "0"],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})


def content(path):
    return {s.seq_id: (s.record, s.input_ids.tolist(), s.ids.tolist(), s.logprobs.tolist(), s.entropy.tolist())
            for s in logitstore.open(path)}


def test_sigkill_loses_at_most_the_shard_in_progress_and_resume_completes(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert run_child(full, False, False).wait(timeout=120) == 0
    want = content(full)
    assert len(want) == 60

    child = run_child(crashed, False, True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two shards are committed and a third is being written
        try:
            m = logitstore.open(crashed).manifest
            if len(m.shards) >= 2 and any(p.name.endswith(".tmp") for p in (crashed / "shards").iterdir()):
                break
        except logitstore.LogitstoreError:
            pass  # not started yet: no manifest
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    cache = logitstore.open(crashed)
    assert not cache.manifest.complete and len(cache.manifest.shards) >= 2
    got = content(crashed)
    # exactly a prefix of the records, each identical to the uninterrupted write
    assert sorted(r for r, *_ in got.values()) == list(range(len(got)))
    assert all(got[k] == want[k] for k in got)
    # the only problem verify sees is the interrupted shard's temporary file
    problems = verify(crashed)
    assert problems and all(p.file.endswith(".tmp") and "interrupted" in p.message for p in problems)

    assert run_child(crashed, True, False).wait(timeout=120) == 0
    assert verify(crashed) == []
    assert content(crashed) == want
    assert logitstore.open(crashed).manifest.complete
