"""A training run never loses or mixes a user's data (issue 14, items 1, 3, 5, 8, 9 and the trainer's tracebacks):
``-o`` that is not a run of ours, the student's own directory, ``--force``, two runs into one ``OUT``, a student that
changed before ``--resume``, hand-edited selections, unfinished caches, options that are not finite or not of their
type, and a checkpoint onto a full disk. Through the real command line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logitstore.selection import save_selection
from logitstore.subset import make_selection
from tests.conftest import read_manifest, write_manifest
from tools.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _train(cache, student, out, *extra) -> list[str]:
    return ["train", str(cache), "--student", str(student), "--loss", "forward_kl", "-o", str(out), "--max-steps",
            "2", "--batch-size", "4", "--max-length", "48", "--quiet", *extra]


def _err_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("logitstore ")]
    assert len(lines) == 1 and lines[0].startswith(f"logitstore {command}: ") and "Traceback" not in err, err
    return lines[0]


def _tree(path: Path):
    return sorted((p.relative_to(path).as_posix(), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


# ---------------------------------------------------------------- item 3: -o is a new directory or a run of ours


def test_train_refuses_an_output_that_is_not_a_run_of_ours(text_cache, student_config, tmp_path, capsys):
    d = tmp_path / "results"
    d.mkdir()
    (d / "paper.tex").write_text("the user's paper")
    for extra in ((), ("--force",), ("--resume",)):
        assert main(_train(text_cache, student_config, d, *extra)) == 2
        assert "holds no training run of logitstore's" in _err_line(capsys)
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert main(_train(text_cache, student_config, f)) == 2
    assert "is a file, not a directory" in _err_line(capsys)
    assert (d / "paper.tex").read_text() == "the user's paper" and sorted(p.name for p in d.iterdir()) == ["paper.tex"]
    assert f.read_text() == "keep"


def test_train_refuses_the_students_own_directory(text_cache, student_config, tmp_path, capsys):
    """``--student S -o S`` replaced the pretrained weights, then crashed; now refused before anything is written,
    and so are an OUT inside S and a student inside OUT."""
    s = tmp_path / "pretrained"
    assert main(_train(text_cache, student_config, s)) == 0  # a model directory (a run of ours, even)
    before = _tree(s)
    for out, extra, word in ((s, (), "is the student"), (s, ("--force",), "is the student"),
                             (s / "next", (), "is the student"), (tmp_path, ("--force",), "lies inside -o")):
        assert main(_train(text_cache, s, out, *extra)) == 2, out
        assert word in _err_line(capsys), out
    assert _tree(s) == before


def test_force_replaces_only_a_run_of_ours_and_only_its_files(text_cache, student_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(text_cache, student_config, out, "--save-every", "1", "--max-steps", "3")) == 0
    (out / "notes.md").write_text("the user's notes on the run")  # a foreign file in a run directory of ours
    assert main(_train(text_cache, student_config, out)) == 2
    err = _err_line(capsys)
    assert "previous training run" in err and "--force to replace it" in err
    assert main(_train(text_cache, student_config, out, "--force", "--max-steps", "1")) == 0
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # the earlier run's rows are gone, not interleaved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / "notes.md").read_text() == "the user's notes on the run"


# ---------------------------------------------------------------- item 5: one training run per OUT


def test_a_second_training_into_one_out_is_refused_while_the_first_runs(text_cache, student_config, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tools.cli", *_train(text_cache, student_config, out),
                              "--max-steps", "100000", "--log-every", "1"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").is_file(), "the first run did not start"
        for extra in ((), ("--force",), ("--resume",)):
            assert main(_train(text_cache, student_config, out, *extra)) == 2
            err = _err_line(capsys)
            assert "being written by another training run" in err and f"process {first.pid}" in err, err
        assert first.poll() is None  # the first run goes on, its metrics its own
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    finally:
        first.kill()
        first.wait()
    # its holder killed, the lock is stale: a run that starts over takes it over
    assert main(_train(text_cache, student_config, out, "--force", "--max-steps", "1")) == 0
    assert not (out / "run.lock").exists()


# ---------------------------------------------------------------- item 1: the student's identity on resume


def test_resume_refuses_a_student_whose_content_changed(text_cache, student_config, tmp_path, capsys):
    student = tmp_path / "s" / "config.json"
    student.parent.mkdir()
    shutil.copy2(student_config, student)
    out = tmp_path / "run"
    assert main(_train(text_cache, student, out, "--save-every", "1", "--max-steps", "3")) == 0
    recorded = json.loads((out / "train_config.json").read_text())["student_identity"]
    assert recorded["hashed"] == "sha256 of the contents of config.json" and recorded["revision"].startswith("sha256-")
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    original = student.read_bytes()
    student.write_text(json.dumps({**json.loads(original), "initializer_range": 0.5}))  # same shapes, another model
    assert main(_train(text_cache, student, out, "--save-every", "1", "--max-steps", "3", "--resume")) == 2
    err = _err_line(capsys)
    assert "is not the one the run" in err and recorded["revision"] in err
    student.write_bytes(original)  # restored: the resume goes on
    assert main(_train(text_cache, student, out, "--save-every", "1", "--max-steps", "3", "--resume")) == 0


def test_resume_from_another_working_directory(text_cache, student_config, tmp_path, monkeypatch, capsys):
    """Paths are compared by where they point: a run started with relative paths resumes from elsewhere with the
    same files spelled otherwise, and is refused with another cache."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    shutil.copytree(text_cache, tmp_path / "cache")
    shutil.copy2(student_config, tmp_path / "config.json")
    monkeypatch.chdir(work)
    assert main(_train("../../cache", "../../config.json", "../../run", "--save-every", "1", "--max-steps", "3")) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000003")
    monkeypatch.chdir(tmp_path)
    assert main(_train("cache", "config.json", "run", "--save-every", "1", "--max-steps", "3", "--resume")) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000003")
    shutil.copytree(text_cache, tmp_path / "other")
    assert main(_train("other", "config.json", "run", "--save-every", "1", "--max-steps", "3", "--resume")) == 2
    assert "--cache" in _err_line(capsys)


# ---------------------------------------------------------------- item 8: hand-edited selections


def _edited(tmp_path, text_cache, edit) -> Path:
    sel = tmp_path / "sel.json"
    save_selection(sel, make_selection(text_cache, where="true", weight="1.0"))
    d = json.loads(sel.read_text())
    edit(d)
    sel.write_text(json.dumps(d))
    return sel


@pytest.mark.parametrize("edit,words", [
    (lambda d: d["seq_ids"].__setitem__(0, "0000000000000000"), "1 of its {n} seq ids are not in the cache"),
    (lambda d: d.update(seq_ids=[f"{i:016x}" for i in range(len(d["seq_ids"]))]), "none of its {n} seq ids"),
    (lambda d: d["weights"].__setitem__(2, float("nan")), "weights[2]"),
    (lambda d: d["weights"].__setitem__(2, -1.0), "weights[2]"),
    (lambda d: d.update(weights=[0.0] * len(d["weights"])), "every weight is 0"),
    (lambda d: d["seq_ids"].__setitem__(1, 7), "seq_ids[1] is 7 (int)"),
    (lambda d: d["seq_ids"].__setitem__(1, d["seq_ids"][0]), "listed twice"),
])
def test_a_hand_edited_selection_is_refused_in_one_line(text_cache, student_config, tmp_path, capsys, edit, words):
    sel = _edited(tmp_path, text_cache, edit)
    words = words.format(n=read_manifest(text_cache)["totals"]["sequences"])
    assert main(_train(sel, student_config, tmp_path / "out")) == 2
    assert words in _err_line(capsys)
    assert main(["info", str(sel)]) == 2
    assert words in _err_line(capsys, "info")
    assert not (tmp_path / "out").exists()


def test_allow_missing_trains_on_the_known_ids_only(text_cache, student_config, tmp_path, capsys):
    known = read_manifest(text_cache)["totals"]["sequences"]
    sel = _edited(tmp_path, text_cache, lambda d: d["seq_ids"].extend(["ffffffffffffffff", "eeeeeeeeeeeeeeee"])
                  or d["weights"].extend([1.0, 1.0]))
    out = tmp_path / "out"
    assert main(_train(sel, student_config, out, "--allow-missing", "--trace-data", "--max-steps", "30")) == 0
    seen = {s for r in (out / "data-rank0.jsonl").read_text().splitlines() for s in json.loads(r)["seq_ids"]}
    ids = set(json.loads(sel.read_text())["seq_ids"][:known])
    assert seen <= ids and len(seen) == known  # every known sequence, none of the two unknown ones
    capsys.readouterr()
    assert main(["info", str(sel), "--allow-missing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"]["sequences"] == known


# ---------------------------------------------------------------- item 9: an unfinished build


def test_an_unfinished_cache_is_refused_unless_asked(text_cache, student_config, tmp_path, capsys, caplog):
    c = tmp_path / "c"
    shutil.copytree(text_cache, c)
    m = read_manifest(c)
    m["complete"] = False  # as a build still running (or killed) leaves it
    write_manifest(c, m)
    assert main(_train(c, student_config, tmp_path / "a")) == 2
    assert "unfinished build" in _err_line(capsys) and not (tmp_path / "a").exists()
    assert main(_train(c, student_config, tmp_path / "b", "--allow-incomplete")) == 0
    assert any("unfinished build" in r.getMessage() for r in caplog.records)
    capsys.readouterr()
    assert main(["verify", "-q", str(c)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{c}: OK; the build is not finished") and f"{m['totals']['sequences']} committed" in out


# ---------------------------------------------------------------- tracebacks: options, sweeps, a full disk


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--temperature", "inf"), ("--ce-weight", "nan"),
                                        ("--alpha", "-inf"), ("--holdout", "nan")])
def test_non_finite_options_are_refused(text_cache, student_config, tmp_path, capsys, flag, value):
    assert main(_train(text_cache, student_config, tmp_path / "o", f"{flag}={value}")) == 2
    assert f"{flag} {float(value)!r}: must be a finite number" in _err_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option,value,word", [("max_steps", "'3'", "--max-steps '3': must be an int, got str"),
                                               ("lr", "[1]", "--lr [1]: must be a float, got list"),
                                               ("pack", "1", "--pack 1: must be a bool, got int"),
                                               ("loss", "3", "--loss 3: must be a str, got int")])
def test_sweep_values_of_the_wrong_type_are_refused(text_cache, student_config, tmp_path, capsys, option, value,
                                                    word):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'[[runs]]\nname = "a"\nstudent = "{student_config}"\n{option} = {value}\n')
    assert main(["train", str(text_cache), "--sweep", str(sweep), "-o", str(tmp_path / "runs")]) == 2
    assert word in _err_line(capsys)
    assert not (tmp_path / "runs").exists()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


def test_a_checkpoint_onto_a_full_disk_is_one_line_and_leaves_nothing_half_written(text_cache, student_config,
                                                                                   tmp_path):
    """The student's weights (6.3 MB) cannot be written under a 4 MiB file size limit."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tools.cli", *_train(text_cache, student_config, out, "--save-every",
                                                                   "1")], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=_limit_file_size, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last.startswith("logitstore train: "), r.stderr[-2000:]
    assert "checkpoints/step-0000001: writing failed at step 1 (SafetensorError" in last
    assert "no checkpoint was written" in last and "--resume" in last
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # no step-1.tmp left
    assert not (out / "model.safetensors").exists() and not (out / "run.lock").exists()
    assert json.loads((out / "train_config.json").read_text())["save_every"] == 1  # the run itself was sound
