"""The ``logitstore`` command line: ``info`` and ``verify``, exit codes, messages and ``--help``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import read_manifest, shard_files, write_manifest
from tools.cli import main

SHARD1 = "shards/shard-000001.parquet"


def _reference_totals(built):
    refs = built.refs
    return dict(
        sequences=len(refs),
        positions=sum(r.n for r in refs),
        targets=sum(int(r.loss_mask.sum()) for r in refs),
        entries=sum(int(r.n_entries.sum()) for r in refs),
    )


@pytest.mark.parametrize("flags", [["--format", "json"], ["--json"]])
def test_info_json(ranked_cache, capsys, flags):
    assert main(["info", str(ranked_cache.path), *flags]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)
    for key, value in _reference_totals(ranked_cache).items():
        assert d[key] == value, key
    assert d["shards"] == len(shard_files(ranked_cache.path))
    assert d["bytes"] == sum(f.stat().st_size for f in shard_files(ranked_cache.path))
    assert d["vocab_size"] == ranked_cache.vocab and d["format_version"] == 2 and d["complete"] is True
    assert d["rule"] == {"rule": "mass", "p": 0.9, "k": 24}
    assert d["max_abs_logprob_error"] == 5 / 256  # FORMAT.md: step / 2 of the default qdelta step
    assert d["positions"] and d["entries_per_position"] == d["entries"] / d["positions"]
    assert err == ""


def test_info_table(ranked_cache, capsys):
    assert main(["info", str(ranked_cache.path)]) == 0
    out = capsys.readouterr().out
    t = _reference_totals(ranked_cache)
    assert f"{t['sequences']:,} sequences" in out and f"{t['positions']:,} positions" in out
    assert "values=qdelta" in out and "0.01953" in out
    assert "exactness" in out and "topk_logprobs: quantised" in out


def test_verify_sound_cache(ranked_cache, capsys):
    assert main(["verify", "-q", str(ranked_cache.path)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{ranked_cache.path}: OK"


@pytest.mark.parametrize("fast", [False, True])
def test_verify_corrupted_cache(ranked_cache, tmp_path, capsys, fast):
    path = tmp_path / "c"
    shutil.copytree(ranked_cache.path, path)
    f = path / SHARD1
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    assert main(["verify", "-q", str(path), *(["--fast"] if fast else [])]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and SHARD1 in fails[0]
    assert "1 problem(s)" in out


def test_verify_reports_manifest_edits(ranked_cache, tmp_path, capsys):
    path = tmp_path / "c"
    shutil.copytree(ranked_cache.path, path)
    m = read_manifest(path)
    m["shards"][1]["positions"] += 7
    write_manifest(path, m)
    assert main(["verify", "-q", str(path)]) == 1
    assert SHARD1 in capsys.readouterr().out


@pytest.mark.parametrize("command", ["info"])
def test_missing_path_is_bad_input(tmp_path, capsys, command):
    missing = tmp_path / "nope"
    assert main([command, str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and str(missing) in err


def test_verify_missing_path_is_bad_input(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["verify", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert len((out + err).strip().splitlines()) == 1 and str(missing) in out + err


@pytest.mark.parametrize("version", [0, 99])
def test_info_unknown_version(ranked_cache, tmp_path, capsys, version):
    path = tmp_path / "c"
    shutil.copytree(ranked_cache.path, path)
    m = read_manifest(path)
    m["format_version"] = version
    write_manifest(path, m)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"format_version {version}" in err


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["verify", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: logitstore")
    if argv[0] != "--help":
        assert f"logitstore {argv[0]}" in out and "cache" in out
    else:
        assert "info" in out and "verify" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["info"], ["info", "x", "--format", "yaml"]])
def test_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: logitstore" in capsys.readouterr().err


def test_console_script(ranked_cache):
    exe = shutil.which("logitstore")
    cmd = [exe] if exe else [sys.executable, "-m", "tools.cli"]
    r = subprocess.run([*cmd, "info", str(ranked_cache.path), "--format", "json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sequences"] == len(ranked_cache.refs)
    r = subprocess.run([*cmd, "verify", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--fast" in r.stdout
