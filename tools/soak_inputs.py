"""The bad-input soak (``python tools/soak.py --bad-inputs SECONDS``): the real command line against generated bad
inputs of every class (``tools/soak_cases.py``), round-robin, for a bounded time.

Each round prepares the next class's input in a fresh directory and runs ``python -m tools.cli ...`` as a user
would; a traceback (or an exit code the class does not allow) and lost or mixed data are counted, per class.
Both must be 0. ``setup`` makes what every class starts from: the tiny teacher, a teacher whose head is smaller
than its tokenizer, data, a sound cache, a selection, saved datasets and a student config.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tools.soak_cases import CLASSES, Case, World

ROOT = Path(__file__).resolve().parents[1]
FILE_LIMIT = 4 << 20  # the "full disk" of the checkpoint class: no file may grow past 4 MiB


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def run_case(case: Case, env: dict) -> tuple[subprocess.CompletedProcess, str | None, str | None]:
    """(the finished process, a traceback or wrong exit if any, lost or mixed data if any)."""
    r = subprocess.run([sys.executable, "-m", "tools.cli", *case.argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, preexec_fn=_limit_file_size if case.full_disk else None)
    crash = None
    if "Traceback (most recent call last)" in r.stderr:
        crash = "traceback: " + r.stderr.strip().splitlines()[-1][:200]
    elif r.returncode not in case.expect:
        crash = f"exit {r.returncode}, expected {case.expect}: {(r.stderr.strip().splitlines() or [''])[-1][:200]}"
    lost = case.check(r)
    if r.returncode == 0 and case.expect == (2,):
        lost = lost or "exit 0 where the input had to be refused"
    return r, crash, lost


def setup(work: Path, rng: np.random.Generator, env: dict, make_teacher, make_data) -> World:
    """The tiny teacher (``make_teacher(dir)``), a teacher with a head smaller than its tokenizer, data
    (``make_data(path, n, rng)``), a sound cache, a selection, saved datasets and a student config."""
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    teacher = make_teacher(work / "teacher")
    torch.manual_seed(1)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=49000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    small.save_pretrained(work / "small-head")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(work / "small-head")
    data = make_data(work / "data.jsonl", 60, rng)
    cache = work / "cache"
    for argv in (["build", str(teacher), str(data), "--top-k", "8", "-o", str(cache), "-q", "--shard-mb", "0.02"],
                 ["select", str(cache), "--where", "true", "--weight", "1.0", "-o", str(work / "selection.json")]):
        subprocess.run([sys.executable, "-m", "tools.cli", *argv], cwd=ROOT, env=env, check=True,
                       capture_output=True)
    ds = datasets.Dataset.from_dict({"text": ["a first line", "a second line"]})
    ds.save_to_disk(str(work / "dataset"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(work / "dataset-dict"))
    student = work / "student" / "config.json"  # the tests' fresh student: 1 layer, hidden 32, the teacher's vocab
    student.parent.mkdir()
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True).to_json_file(str(student))
    return World(work, teacher, data, cache, student, rng)


def bad_inputs(work: Path, seconds: float, seed: int, env: dict, make_teacher, make_data) -> dict:
    """Run the classes round-robin, each with drawn details, until ``seconds`` have passed; the counts. The soak's
    own ``make_teacher`` and ``make_data`` (``tools.soak``) make the teacher and the data."""
    rng = np.random.default_rng(seed)
    w = setup(work, rng, env, make_teacher, make_data)
    counts = {c.__name__: {"runs": 0, "tracebacks": 0, "lost_or_mixed": 0} for c in CLASSES}
    problems: list[str] = []
    t0, i = time.time(), 0
    while time.time() - t0 < seconds:
        make = CLASSES[i % len(CLASSES)]
        i += 1
        case = make(w)
        r, crash, lost = run_case(case, env)
        c = counts[make.__name__]
        c["runs"] += 1
        c["tracebacks"] += crash is not None
        c["lost_or_mixed"] += lost is not None
        status = "; ".join(x for x in (crash, lost) if x) or "ok"
        print(f"{i:4d} {make.__name__:22s} exit {r.returncode}  {status}", flush=True)
        if crash or lost:
            problems.append(f"{make.__name__} {' '.join(case.argv)[:300]}: {status}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("runs", "tracebacks", "lost_or_mixed")}
    return {"seconds": round(time.time() - t0), "classes": len(CLASSES), **total, "by_class": counts,
            "problems": problems, "ok": total["tracebacks"] == 0 and total["lost_or_mixed"] == 0}
