"""Caches in an object store, end to end through the command line, against a real S3 HTTP API.

The fixture starts moto's standalone S3 server (``moto[server]``, from the package index) on 127.0.0.1 and stops it
at the end; no other network is used. Every remote result is compared with the same command on a local copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import remote
from logitstore.verify import verify
from tests.builders.test_driver import content, write_jsonl
from tests.conftest import kill_when
from tests.trainers.conftest import write_student_config
from tools.cli import main
from tools.s3server import free_port, s3_server

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("s3fs", reason="s3:// caches need s3fs (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the bucket ``cachebkt``; the AWS variables point at it."""
    pytest.importorskip("moto", reason="the object-store tests need moto[server] (pip install -e '.[test]')")
    with s3_server(tmp_path_factory.mktemp("moto") / "server.log") as env:
        env["LOGITSTORE_CACHE_DIR"] = str(tmp_path_factory.mktemp("diskcache"))
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            fs = remote.filesystem("s3://cachebkt")
            fs.mkdir("cachebkt")
            yield fs
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout)


def _build_args(teacher, data, out):
    return ["build", str(teacher), str(data), "-o", str(out), "--top-k", "8", "--token-budget", "256",
            "--shard-mb", "0.002", "--row-group-positions", "50", "-q"]


@pytest.fixture(scope="module")
def built(s3, tiny_teacher, tmp_path_factory):
    """The same 40 records built into s3://cachebkt/c1 and into a local directory."""
    d = tmp_path_factory.mktemp("objstore")
    data = d / "d.jsonl"
    write_jsonl(data, 40)
    local = d / "local"
    assert main(_build_args(tiny_teacher, data, local)) == 0
    assert main(_build_args(tiny_teacher, data, "s3://cachebkt/c1")) == 0
    return data, local, "s3://cachebkt/c1"


def test_a_remote_build_equals_a_local_one_and_verifies(built, s3, capsys):
    _, local, url = built
    keys = set(s3.ls("cachebkt/c1", detail=False))
    assert keys == {f"cachebkt/c1/{n}" for n in ("manifest.json", "shards", "id_map.parquet")}  # the lock is gone
    want, got = content(local), content(url)
    assert got.keys() == want.keys() and len(got) == 41
    for k in want:
        assert got[k][:4] == want[k][:4]
        np.testing.assert_array_equal(np.array(got[k][4]), np.array(want[k][4]))
    m_local, m_remote = logitstore.open(local).manifest, logitstore.open(url).manifest
    assert [s.sha256 for s in m_remote.shards] == [s.sha256 for s in m_local.shards] and len(m_remote.shards) > 3
    assert m_remote.complete and verify(url) == []
    capsys.readouterr()
    assert main(["verify", "-q", url]) == 0
    assert capsys.readouterr().out.strip() == f"{url}: OK"
    assert main(["info", url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["path"] == url and d["sequences"] == 41 and d["shards"] == len(m_local.shards)


def test_sql_on_a_remote_cache_reads_the_objects(built, capsys):
    _, local, url = built
    q = "SELECT count(*) AS n, sum(n_positions) AS p, round(avg(mean_entropy), 6) AS h FROM sequences"
    rows = {}
    for where in (str(local), url):
        assert main(["sql", where, q, "--format", "json"]) == 0
        rows[where] = json.loads(capsys.readouterr().out)
    assert rows[url] == rows[str(local)]
    cache = logitstore.open(local)  # the reference: numpy over the decoded local cache
    ent = [float(np.mean(s.entropy)) for s in cache if s.n_positions]
    assert rows[url][0]["n"] == 41 and rows[url][0]["p"] == sum(s.n_positions for s in cache)
    assert abs(rows[url][0]["h"] - np.mean(ent)) < 1e-5
    # the query stays confined: another object of the same bucket is refused
    assert main(["sql", url, "SELECT count(*) FROM read_parquet('s3://cachebkt/other/x.parquet')"]) == 2


def test_training_from_s3_equals_training_from_local_disk(built, tmp_path):
    """The same run from the object store, with a disk cache that holds only a few of the cache's shards (so shards
    are evicted and fetched again), gives the same losses and weights as from local disk."""
    import torch
    from safetensors.torch import load_file

    _, local, url = built
    student = write_student_config(tmp_path / "student" / "config.json")
    common = ["--student", str(student), "--loss", "forward_kl", "--max-steps", "6", "--batch-size", "4",
              "--num-workers", "1", "--quiet", "--log-every", "1"]
    shards = logitstore.open(local).manifest.shards
    big = max(s.bytes for s in shards)
    limit = 4 * big  # room for the shards two processes (the trainer and its worker) hold open, 2 each
    assert sum(s.bytes for s in shards) > 2 * limit
    small_cache = tmp_path / "small-disk-cache"
    runs = {"local": _cli("train", str(local), "-o", str(tmp_path / "a"), *common),
            "s3": _cli("train", url, "-o", str(tmp_path / "b"), *common, "--cache-dir", str(small_cache),
                       "--cache-limit", str(limit))}
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
    logs = [[row["loss"] for row in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
             if "loss" in row and "lr" in row] for d in ("a", "b")]
    assert len(logs[0]) == 6 and logs[0] == logs[1]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    held = sum(p.stat().st_size for p in small_cache.glob("caches/*/shards/*"))
    assert held <= limit + big  # the limit held (give or take the one shard a prefetch may be downloading)


def test_sigkill_mid_build_then_resume_equals_an_uninterrupted_build(built, s3, tiny_teacher):
    data, local, _ = built
    url = "s3://cachebkt/killed"
    cmd = [sys.executable, "-m", "tools.cli", *_build_args(tiny_teacher, data, url)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)

    def two_shards() -> bool:
        s3.invalidate_cache()
        return len(json.loads(s3.cat_file("cachebkt/killed/manifest.json"))["shards"]) >= 2

    kill_when(proc, two_shards, every=0.02)
    partial = logitstore.open(url)
    assert not partial.manifest.complete and 0 < len(partial) < 41
    s3.invalidate_cache()
    assert s3.exists("cachebkt/killed/build.lock")  # the killed build's lock is left; the resume takes it over
    assert verify(url) == [] or all("not listed" in p.message for p in verify(url))  # listed shards are whole
    r = _cli(*_build_args(tiny_teacher, data, url), "--resume")
    assert r.returncode == 0, r.stderr
    assert verify(url) == []
    want, got = content(local), content(url)
    assert got.keys() == want.keys()  # nothing lost, nothing duplicated
    for k in want:  # batches after a resume differ from an uninterrupted build's: float rounding only
        assert got[k][:4] == want[k][:4]
        np.testing.assert_allclose(np.array(got[k][4]), np.array(want[k][4]), atol=1e-4)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(built, s3, tiny_teacher):
    data, _, url = built
    before = s3.cat_file("cachebkt/c1/manifest.json")
    m = logitstore.open(url).manifest
    w = logitstore.CacheWriter(url, vocab_size=m.vocab_size, rule=logitstore.TopK(8), resume=True,
                               teacher=m.teacher, tokenizer=m.tokenizer, build=m.build, exactness=m.exactness)
    w.open()
    try:
        r = _cli(*_build_args(tiny_teacher, data, url), "--resume")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "being written by another build" in r.stderr and url in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        w.close()
    s3.invalidate_cache()
    assert not s3.exists("cachebkt/c1/build.lock")
    assert json.loads(s3.cat_file("cachebkt/c1/manifest.json"))["shards"] == json.loads(before)["shards"]


def test_an_interrupted_upload_never_leaves_a_listed_shard(s3, tmp_path, monkeypatch):
    from tests.conftest import make_sequences

    rng = np.random.default_rng(0)
    refs = make_sequences(rng, 30, vocab=300, rule=logitstore.TopK(6), max_tokens=40)
    url = "s3://cachebkt/upload-fails"
    real, calls = remote.RemoteTarget.upload, []

    def failing(self, local, rel):
        calls.append(rel)
        if rel.startswith("shards/") and sum(c.startswith("shards/") for c in calls) == 3:
            raise remote.RemoteStoreError(f"{self.url}: uploading {rel} failed (connection reset)")
        return real(self, local, rel)

    monkeypatch.setattr(remote.RemoteTarget, "upload", failing)
    w = logitstore.CacheWriter(url, vocab_size=300, rule=logitstore.TopK(6), shard_bytes=3000,
                               row_group_positions=50)
    with pytest.raises(remote.RemoteStoreError, match="connection reset"), w:
        for r in refs:
            w.add(r.to_record())
    s3.invalidate_cache()
    listed = json.loads(s3.cat_file("cachebkt/upload-fails/manifest.json"))["shards"]
    assert len(listed) == 2
    objects = {k.rsplit("/", 1)[-1]: s3.info(k)["size"] for k in s3.ls("cachebkt/upload-fails/shards")}
    for s in listed:  # every listed shard is there, whole
        assert objects[s["file"].rsplit("/", 1)[-1]] == s["bytes"]
    assert verify(url) == []
    c = logitstore.open(url)
    assert len(c) == sum(s["sequences"] for s in listed) and not c.manifest.complete


def test_a_pinned_shard_is_never_evicted(built, tmp_path):
    """One process reads a shard (pinned); another, needing room under a limit of 1 byte, evicts only the rest."""
    _, _, url = built
    env = {**os.environ, "LOGITSTORE_CACHE_DIR": str(tmp_path / "dc"), "LOGITSTORE_CACHE_LIMIT": "1",
           "PYTHONPATH": str(ROOT)}
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys, logitstore\n"
        f"c = logitstore.open({url!r}); c.read(0, None, ['seq_id'])\n"
        "print('pinned', flush=True); sys.stdin.readline()\n")], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "pinned"
        old = {k: os.environ.get(k) for k in ("LOGITSTORE_CACHE_DIR", "LOGITSTORE_CACHE_LIMIT")}
        os.environ.update({k: env[k] for k in old})
        try:
            c = logitstore.open(url)
            pinned = c.shard_paths[0]
            assert pinned.is_file()
            for i in (1, 2):
                c.read(i, None, ["seq_id"])
            c.close()
            c.mirror.make_room(1)
            assert pinned.is_file()  # held by the reader process
            assert not c.shard_paths[1].exists() and not c.shard_paths[2].exists()
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        reader.communicate("\n", timeout=60)
    c.mirror.make_room(1)
    assert not pinned.exists()  # released with its reader: now evictable


@pytest.mark.parametrize("case", ["unreachable", "no-bucket", "no-credentials", "not-a-cache"])
def test_bad_object_store_inputs_end_with_one_line(s3, tmp_path, case):
    env = {"unreachable": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
           "no-bucket": {}, "not-a-cache": {},
           "no-credentials": {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_PROFILE": "",
                              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                              "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}}[case]
    url = {"no-bucket": "s3://no-such-bkt/c"}.get(case, "s3://cachebkt/nothing-here")
    base = {**os.environ, **env}
    for k in [k for k, v in base.items() if v == ""]:
        del base[k]
    for args in (["info", url], ["verify", url], ["sql", url, "SELECT 1"]):
        r = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, cwd=ROOT,
                           env={**base, "PYTHONPATH": str(ROOT)}, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert url in lines[0]
        want = {"unreachable": "cannot reach the object store", "no-bucket": "bucket 'no-such-bkt' does not exist",
                "no-credentials": "no credentials", "not-a-cache": "not a logitstore cache"}[case]
        assert want in lines[0], lines[0]


def test_a_store_without_conditional_creates_is_refused_unless_no_lock(s3, monkeypatch):
    """Stores that do not implement If-None-Match answer a conditional PUT with 501 NotImplemented; that answer is
    simulated here (moto implements it), the refusal and --no-lock are real."""
    from tests.conftest import make_sequences

    real = s3.pipe_file
    assert remote.filesystem("s3://cachebkt") is s3  # fsspec hands out one instance per configuration

    def no_conditional(path, data, mode="overwrite", **kw):
        if mode == "create":
            raise OSError("NotImplemented: A header you provided implies functionality that is not implemented")
        return real(path, data, mode=mode, **kw)

    monkeypatch.setattr(s3, "pipe_file", no_conditional)
    refs = make_sequences(np.random.default_rng(1), 5, vocab=300, rule=logitstore.TopK(6), max_tokens=20)
    url = "s3://cachebkt/no-conditional"
    with pytest.raises(remote.RemoteStoreError, match="does not support conditional creates.*--no-lock"):
        logitstore.CacheWriter(url, vocab_size=300, rule=logitstore.TopK(6)).open()
    s3.invalidate_cache()
    assert not s3.exists("cachebkt/no-conditional/manifest.json")
    with logitstore.CacheWriter(url, vocab_size=300, rule=logitstore.TopK(6), lock=False) as w:
        for r in refs:
            w.add(r.to_record())
    assert verify(url) == [] and len(logitstore.open(url)) == 5
    with pytest.raises(logitstore.InvalidInputError, match="local cache always takes its build lock"):
        logitstore.CacheWriter("/tmp/local-cache", vocab_size=300, rule=logitstore.TopK(6), lock=False)


def test_materialize_export_and_merge_into_the_object_store_equal_their_local_outputs(built, s3, tmp_path, capsys):
    import pyarrow.parquet as pq

    _, local, url = built
    where = "n_positions > 20"
    assert main(["select", url, "--where", where, "--materialize", "-o", "s3://cachebkt/sub"]) == 0
    assert main(["select", str(local), "--where", where, "--materialize", "-o", str(tmp_path / "sub")]) == 0
    assert content("s3://cachebkt/sub") == content(tmp_path / "sub") and verify("s3://cachebkt/sub") == []
    assert 0 < len(logitstore.open("s3://cachebkt/sub")) < 41
    assert main(["export", url, "--to", "axolotl", "-o", "s3://cachebkt/exp", "-q"]) == 0
    assert main(["export", str(local), "--to", "axolotl", "-o", str(tmp_path / "exp"), "-q"]) == 0
    mine = sorted(p.relative_to(tmp_path / "exp").as_posix() for p in (tmp_path / "exp").rglob("*.parquet"))
    s3.invalidate_cache()
    theirs = sorted(k.split("cachebkt/exp/", 1)[1] for k in s3.find("cachebkt/exp") if k.endswith(".parquet"))
    assert mine == theirs and mine
    for rel in mine:
        with s3.open(f"cachebkt/exp/{rel}", "rb") as f:
            assert pq.read_table(f).equals(pq.read_table(tmp_path / "exp" / rel))
    assert s3.exists("cachebkt/exp/logitstore_export.json")
    capsys.readouterr()
    assert main(["export", url, "--to", "axolotl", "-o", "s3://cachebkt/exp", "-q"]) == 2  # exists: --force
    assert "--force" in capsys.readouterr().err
    assert main(["export", url, "--to", "axolotl", "-o", "s3://cachebkt/c1", "-q", "--force"]) == 2  # a cache
    assert s3.exists("cachebkt/c1/manifest.json")
    assert main(["export", url, "--to", "axolotl", "-o", "s3://cachebkt/exp", "-q", "--force"]) == 0
    assert main(["merge", url, str(local), "-o", "s3://cachebkt/merged"]) == 0
    assert main(["merge", url, str(local), "-o", str(tmp_path / "merged")]) == 0
    assert content("s3://cachebkt/merged") == content(tmp_path / "merged") and verify("s3://cachebkt/merged") == []


def test_diff_and_report_read_a_remote_cache_like_a_local_one(built, tmp_path):
    _, local, url = built
    assert main(["diff", url, str(local), "-o", str(tmp_path / "d-remote")]) == 0
    assert main(["diff", str(local), str(local), "-o", str(tmp_path / "d-local")]) == 0
    for name in ("d-remote", "d-local"):  # the same teacher outputs on both sides: no divergence anywhere
        got = sorted(p.name for p in (tmp_path / name).iterdir())
        assert got == sorted(p.name for p in (tmp_path / "d-local").iterdir())
    import pyarrow.parquet as pq

    for p in (tmp_path / "d-local").glob("*.parquet"):
        assert pq.read_table(tmp_path / "d-remote" / p.name).equals(pq.read_table(p))
    assert main(["report", url, "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert url in html and "41" in html
