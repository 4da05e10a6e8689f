"""``logitstore distill`` on the tiny teacher and a tiny config.json student (CPU): the rounds, their records and
manifests, the run queried as one union, a SIGKILLed run resumed to the same final student, and the refusals.

References: every figure of ``rounds.json`` is recomputed here from the decoded per-position values of each
round's cache; the model identities from the files' bytes; the final student against an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from tests.trainers.conftest import write_student_config
from tools.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
            for a, b in ((2, 2), (3, 4), (10, 5))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def student_cfg(tmp_path_factory) -> Path:
    return write_student_config(tmp_path_factory.mktemp("student") / "config.json")


@pytest.fixture(scope="module")
def refs(tiny_teacher, tmp_path_factory) -> Path:
    """A plain cache of reference answers: the held-out set (--eval) and the off-policy data (--mix-cache)."""
    d = tmp_path_factory.mktemp("refs")
    rows = [{"prompt": f"What is {a} + {b}?", "response": f" {a + b}."} for a, b in ((1, 1), (6, 2), (7, 7), (9, 3))]
    (d / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["build", str(tiny_teacher), str(d / "refs.jsonl"), "--top-k", "8", "-q", "-o", str(d / "c")]) == 0
    return d / "c"


def args(teacher, prompts, student, run, *extra, refs=None) -> list[str]:
    mix = ["--eval", str(refs), "--mix-cache", str(refs), "--mix-ratio", "0.5"] if refs else []
    return ["distill", str(teacher), str(prompts), "--student", str(student), "--rounds", "2", "--generate", "2",
            "--max-new-tokens", "5", "--top-k", "8", "--loss", "forward_kl", "--max-steps", "4", "--batch-size", "2",
            "--lr", "3e-3", "--verifier", "exact", "--save-every", "2", *mix, "-o", str(run), "-q", *extra]


@pytest.fixture(scope="module")
def run_dir(tiny_teacher, prompts, student_cfg, refs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("distill") / "run"
    assert main(args(tiny_teacher, prompts, student_cfg, run, refs=refs)) == 0
    return run


def content_hash(model_dir: Path) -> str:
    """FORMAT.md: sha256 over the sorted (file name, file sha256) pairs of the config, weights, tokenizer files."""
    skip = {"summary.json", "train_config.json"}
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name not in skip
                   and p.suffix in (".json", ".safetensors", ".jinja", ".txt"))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + hashlib.sha256((model_dir / name).read_bytes()).hexdigest().encode() + b"\n")
    return "sha256-" + h.hexdigest()[:16]


def held_out_ce(student_dir: Path, cache: Path) -> float:
    """Plain reference: mean -log p_student(label) over the cache's target positions, full vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    total = n = 0.0
    for seq in logitstore.open(cache):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(seq.input_ids, dtype=torch.long)[None]).logits[0].double(), -1)
        t = seq.pos[seq.loss_mask]
        total += float(-lp[t - 1, seq.input_ids[t]].sum())
        n += t.size
    return total / n


def test_rounds_json_holds_each_rounds_figures(run_dir, refs):
    recs = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in recs] == [1, 2]
    for rec in recs:
        seqs = list(logitstore.open(run_dir / rec["cache"]))
        tgt = [np.flatnonzero(s.loss_mask) for s in seqs]
        teacher_lp = np.concatenate([s.label_logprob[t] for s, t in zip(seqs, tgt)]).astype(np.float64)
        policy_lp = np.concatenate([s.policy_logprob[t] for s, t in zip(seqs, tgt)]).astype(np.float64)
        assert rec["sequences"] == len(seqs) == 3 * 2
        assert rec["positions"] == sum(s.pos.size for s in seqs) and rec["targets"] == teacher_lp.size
        assert rec["pass_rate"] == pytest.approx(np.mean([bool(s.correct) for s in seqs]))
        assert rec["teacher_nll"] == pytest.approx(-teacher_lp.mean(), rel=1e-5)
        assert rec["policy_nll"] == pytest.approx(-policy_lp.mean(), rel=1e-5)
        assert rec["reverse_kl_estimate"] == pytest.approx((policy_lp - teacher_lp).mean(), rel=1e-4, abs=1e-6)
        summary = json.loads((run_dir / rec["student"] / "summary.json").read_text())
        assert rec["train_steps"] == summary["steps"] == 4 and rec["train_loss"] == summary["last"]["loss"]
        assert rec["eval_ce"] == pytest.approx(held_out_ce(run_dir / rec["student"], refs), abs=1e-4)
        tcfg = json.loads((run_dir / rec["student"] / "train_config.json").read_text())
        assert (tcfg["mix_cache"], tcfg["mix_ratio"]) == (str(refs), 0.5)


def test_each_round_samples_from_the_previous_student_and_trains_from_its_weights(run_dir, student_cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    init = run_dir / "round-000" / "student"
    torch.manual_seed(0)  # round 0: the config.json student initialised with --seed 0
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_cfg), dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(init).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    for r, policy in ((1, init), (2, run_dir / "round-001" / "student")):
        m = logitstore.open(run_dir / f"round-{r:03d}" / "cache").manifest
        assert m.has_policy and m.complete
        assert m.build["policy"]["round"] == r and m.build["policy"]["id"] == str(policy.resolve())
        assert m.build["policy"]["revision"] == content_hash(policy)
        tcfg = json.loads((run_dir / f"round-{r:03d}" / "student" / "train_config.json").read_text())
        assert Path(tcfg["student"]).resolve() == policy.resolve()
        assert Path(tcfg["cache"]).resolve() == (run_dir / f"round-{r:03d}" / "cache").resolve()
    ids = [sorted(s.input_ids.tolist() for s in logitstore.open(run_dir / f"round-{r:03d}" / "cache"))
           for r in (1, 2)]
    assert ids[0] != ids[1]  # another student and another seed: other samples


def test_the_run_is_queried_as_one_union_with_a_round_column(run_dir, capsys):
    assert main(["sql", str(run_dir), "SELECT round, avg(correct::INT) AS pass_rate, count(*) AS n FROM sequences "
                 "GROUP BY round ORDER BY round", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = []
    for r in (1, 2):
        seqs = list(logitstore.open(run_dir / f"round-{r:03d}" / "cache"))
        want.append({"round": r, "pass_rate": float(np.mean([bool(s.correct) for s in seqs])), "n": len(seqs)})
    assert got == [{**w, "pass_rate": pytest.approx(w["pass_rate"])} for w in want]
    assert main(["info", str(run_dir), "--json"]) == 0
    members = json.loads(capsys.readouterr().out)["members"]
    assert [(m["round"], m["sequences"], m["complete"]) for m in members] == [(w["round"], w["n"], True) for w in want]


def test_a_finished_run_resumes_to_nothing_and_other_settings_are_refused(run_dir, tiny_teacher, prompts,
                                                                          student_cfg, refs, tmp_path, capsys,
                                                                          monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = (run / "round-002" / "student" / "model.safetensors").read_bytes()
    # how a build writes (its lock) is no setting of the run: runs started before --no-lock existed resume
    assert "lock" not in json.loads((run / "run.json").read_text())["build"]
    assert main(args(tiny_teacher, prompts, student_cfg, run, "--resume", refs=refs)) == 0
    assert (run / "round-002" / "student" / "model.safetensors").read_bytes() == before
    # from another working directory, every path spelled relative to it: the same run
    monkeypatch.chdir(run.parent)
    rel = [os.path.relpath(p) for p in (tiny_teacher, prompts, student_cfg, "run", refs)]
    assert main(args(*rel[:4], "--resume", refs=rel[4])) == 0
    assert (run / "round-002" / "student" / "model.safetensors").read_bytes() == before
    # a run from before a setting existed (run.json without it) resumes where the setting is at its default ...
    settings = json.loads((run / "run.json").read_text())
    original = json.dumps(settings)
    for section, key in (("train", "gradmag"), ("train", "alm_mode"), ("build", "seed")):
        del settings[section][key]
    del settings["build"]["generation"]["top_p"]  # a sub-setting too (one level down)
    del settings["build"]["fields"]["answer"]
    (run / "run.json").write_text(json.dumps(settings))
    assert main(args(tiny_teacher, prompts, student_cfg, run, "--resume", refs=refs)) == 0
    assert (run / "round-002" / "student" / "model.safetensors").read_bytes() == before
    # ... and not where the run's value is other than the default (max_steps: 4 here, 1000 by default)
    del settings["train"]["max_steps"]
    (run / "run.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(args(tiny_teacher, prompts, student_cfg, run, "--resume", refs=refs)) == 2
    assert "(train differ" in capsys.readouterr().err
    (run / "run.json").write_text(original)
    assert main(args(tiny_teacher, prompts, student_cfg, run, "--resume", "--lr", "1e-2", refs=refs)) == 2
    assert "--resume: the run in" in capsys.readouterr().err  # other settings
    assert main(args(tiny_teacher, prompts, student_cfg, run, refs=refs)) == 2
    assert "pass --resume" in capsys.readouterr().err  # not empty, no --resume


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "round-002" / "student" / "model.safetensors")


def test_a_sigkilled_distill_resumes_to_the_same_final_student(tiny_teacher, prompts, student_cfg, refs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run, ref = tmp_path / "run", tmp_path / "uninterrupted"
    cmd = [sys.executable, "-m", "tools.cli", *args(tiny_teacher, prompts, student_cfg, run, refs=refs)]
    t0 = time.time()
    assert subprocess.run([*cmd[:-2], str(ref), "-q"], env=env, cwd=ROOT, capture_output=True).returncode == 0
    duration = time.time() - t0
    rng = random.Random(int(os.environ.get("LOGITSTORE_KILL_SEED", "16")))
    for attempt in range(2):  # killed twice at random points of the run, then resumed to the end
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.9) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True).returncode == 0
    want, got = final_weights(ref), final_weights(run)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    keys = ("sequences", "positions", "targets", "pass_rate", "teacher_nll", "policy_nll", "train_loss")
    a, b = (json.loads((p / "rounds.json").read_text())["rounds"] for p in (ref, run))
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("build.lock"))


@pytest.fixture()
def other_tokenizer_student(tmp_path, tiny_teacher):
    """A model directory whose tokenizer has one more token than the teacher's."""
    from transformers import AutoTokenizer

    d = tmp_path / "other"
    shutil.copytree(tiny_teacher, d)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.add_tokens(["<logitstore_extra>"])
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("case,want", [
    ("rounds0", "--rounds 0: must be >= 1"),
    ("loss", "--loss 'kl_magic': choose from"),
    ("missing", "--student"),
    ("tokenizer", "tokenizer fingerprint"),
    ("no_generate", "--generate N is required"),
])
def test_bad_runs_are_refused_with_one_line_and_nothing_written(case, want, tiny_teacher, prompts, student_cfg,
                                                                tmp_path, capsys, request):
    run = tmp_path / "run"
    a = args(tiny_teacher, prompts, student_cfg, run)
    if case == "rounds0":
        a[a.index("--rounds") + 1] = "0"
    elif case == "loss":
        a[a.index("--loss") + 1] = "kl_magic"
    elif case == "missing":
        a[a.index("--student") + 1] = str(tmp_path / "nope")
    elif case == "tokenizer":
        a[a.index("--student") + 1] = str(request.getfixturevalue("other_tokenizer_student"))
    elif case == "no_generate":
        i = a.index("--generate")
        del a[i:i + 2]
    code = main(a)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and want in err and err.startswith("logitstore distill:"), err
    assert not run.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_users_directory_is_no_run_and_is_left_as_it_is(resume, tiny_teacher, prompts, student_cfg, tmp_path,
                                                           capsys):
    """-o RUN takes only a new or empty directory or a distill run of ours (run.json), as build -o and train -o do;
    --resume does not make a user's directory ours."""
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    code = main(args(tiny_teacher, prompts, student_cfg, run, *(["--resume"] if resume else [])))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "holds no distill run of logitstore's" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and (run / "notes.txt").read_text() == "keep me"


def test_a_run_inside_a_model_directory_student_is_refused(tiny_teacher, prompts, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(tiny_teacher, student)
    run = student / "run"
    code = main(args(tiny_teacher, prompts, student, run))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is the student" in err and not run.exists(), err
