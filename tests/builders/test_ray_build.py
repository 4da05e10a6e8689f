"""Distributed builds on a local Ray cluster (2 CPUs, the tiny teacher), against a one-process build.

The reference is ``logitstore build`` without ``--ray`` on the same data and settings: the
same seq ids, the same values bit for bit. Crashes: an actor SIGKILLed mid-block (Ray
retries the block; its part resumes), and the whole build SIGKILLed, then ``--resume``.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import logitstore
from logitstore.verify import verify
from tests.builders.test_driver import content
from tools.cli import main

pytest.importorskip("ray.data")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("teacher student cache token logit entropy shard manifest parquet query select train sample "
         "distil vocabulary model batch resume ray actor block part").split()
#: small windows (blocks), small row groups and shards: several blocks, each committing several shards
FLAGS = ["--top-k", "8", "--window", "40", "--token-budget", "512", "--row-group-positions", "300",
         "--shard-mb", "0.005", "-q"]
RAY = ["--ray", "--ray-actors", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_data(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(10, 60)))) for _ in range(n)]
    lines[7] = lines[3]  # a duplicate, across the first block
    lines[150] = lines[5]  # and one in a later block: each written once
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


@pytest.fixture(scope="module")
def reference(tiny_teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    data = d / "d.jsonl"
    write_data(data)
    ref = d / "one-process"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(ref), *FLAGS]) == 0
    return data, content(ref), logitstore.open(ref).manifest


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tools.cli", "build", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def check_same(out, ref_content, ref_manifest, exact=True):
    """``exact``: the same windows went through the same batches, so the values are bit for bit the same. A
    resumed part scores what it had left in other batches, where float sums may differ in the last bits."""
    assert verify(out) == []
    got = content(out)
    if exact:
        assert got == ref_content  # same seq ids; ids, logprobs, entropies bit for bit
    assert got.keys() == ref_content.keys()
    for k, want in ref_content.items():
        assert got[k][:3] == want[:3]  # record, tokens, positions
        np.testing.assert_allclose(np.array(got[k][4]), np.array(want[4]), atol=1e-4)  # top-k logprobs
        np.testing.assert_allclose(np.array(got[k][5]), np.array(want[5]), atol=1e-4)  # entropies
    cache = logitstore.open(out)
    ids = cache.scalars(["seq_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == len(ref_content)  # no duplicate, none lost
    m = cache.manifest
    assert m.complete and m.duplicates_skipped == ref_manifest.duplicates_skipped == 2
    assert m.build["ray"]["actors"] == 2
    assert cache.sql("SELECT count(*) FROM tokens").fetchall()[0][0] == ref_manifest.positions
    assert not (out / ".inputs").exists()


def test_ray_build_equals_the_one_process_build(tiny_teacher, reference, tmp_path):
    data, ref, ref_m = reference
    out = tmp_path / "ray"
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    check_same(out, ref, ref_m)
    parts = sorted(os.listdir(out / "parts"))
    assert parts == [f"block-{i:06d}" for i in range(5)]  # 200 records / windows of 40
    assert all(len(logitstore.open(out / "parts" / b).manifest.shards) >= 2 for b in parts)
    # a resume of a finished build has nothing left to do and leaves the cache as it is
    before = (out / "manifest.json").read_text()
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY, "--resume")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert json.loads(before)["shards"] == json.loads((out / "manifest.json").read_text())["shards"]
    # the two ways of building are not mixed on one cache
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), *FLAGS, "--resume"]) == 2


def _wait_for_committed_part(out, proc, timeout=300):
    """(lock holder pid, part) of a part that has committed a shard and is still being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for lock in sorted(glob.glob(str(out / "parts" / "block-*" / "build.lock"))):
            part = os.path.dirname(lock)
            try:
                shards = json.loads(open(os.path.join(part, "manifest.json")).read())["shards"]
                pid = json.loads(open(lock).read())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if shards:
                return pid, part
        time.sleep(0.02)
    return None, None


def test_killed_actor_then_rerun_loses_and_duplicates_nothing(tiny_teacher, reference, tmp_path):
    data, ref, ref_m = reference
    out = tmp_path / "ray"
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY)
    pid, part = _wait_for_committed_part(out, p)
    assert pid is not None, "no part committed a shard while the build ran"
    assert pid != p.pid  # the lock names the actor's process, not the coordinator
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    # Ray retries the block on a restarted actor, which takes the dead one's lock over and resumes its part; were
    # the run to fail instead, the re-run below would finish it. Either way nothing is lost or written twice.
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY, "--resume")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    check_same(out, ref, ref_m, exact=False)


def test_killed_build_resumes_across_workers(tiny_teacher, reference, tmp_path):
    data, ref, ref_m = reference
    out = tmp_path / "ray"
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY, start_new_session=True)
    pid, part = _wait_for_committed_part(out, p)
    assert pid is not None
    os.killpg(p.pid, signal.SIGKILL)  # the coordinator, its local Ray cluster and the actors
    p.communicate(timeout=60)
    os.kill(pid, signal.SIGKILL) if _alive(pid) else None
    committed = logitstore.open(part).manifest.shards
    assert committed
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY)  # without --resume: refused, the parts are kept
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "--resume" in err and "Traceback" not in err
    p = cli(tiny_teacher, data, "-o", out, *FLAGS, *RAY, "--resume")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    check_same(out, ref, ref_m, exact=False)
    # the interrupted part kept its committed shards and only redid the rest
    kept = [s.sha256 for s in logitstore.open(part).manifest.shards[:len(committed)]]
    assert kept == [s.sha256 for s in committed]


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_ray_refuses_generation_mode_and_bad_actor_counts(tiny_teacher, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    assert main(["build", str(tiny_teacher), str(data), "-o", str(tmp_path / "c"), "--top-k", "4", "--generate",
                 "2", "--ray"]) == 2
    assert "generation mode" in capsys.readouterr().err
    assert main(["build", str(tiny_teacher), str(data), "-o", str(tmp_path / "c"), "--top-k", "4",
                 "--ray-actors", "0", "--ray"]) == 2
    assert "--ray-actors 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
