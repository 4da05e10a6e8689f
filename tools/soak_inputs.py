"""The bad-input soak (``python tools/soak.py --bad-inputs SECONDS``): the real command line against generated bad
inputs of every class (``tools/soak_cases.py``), round-robin, for a bounded time.

Each round prepares the next class's input in a fresh directory and runs ``python -m tools.cli ...`` as a user
would; a traceback (or an exit code the class does not allow) and lost or mixed data are counted, per class.
Both must be 0. ``setup`` makes what every class starts from: the tiny teacher, a teacher whose head is smaller
than its tokenizer, data, a sound cache, a selection, saved datasets and a student config.
"""

from __future__ import annotations

import json
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


class ForkServer:
    """A process that imports the command line and what it loads (torch, transformers, DuckDB, pyarrow) once and
    then runs each case in a fresh child forked from it: ``tools.cli.main(argv)``, what the ``logitstore`` console
    script runs, with its own stdout, stderr and exit code. So a run costs its own work, not Python's start-up and
    imports (8-20 s on a loaded 2-core machine). Nothing is computed in the server before it forks."""

    def __init__(self, env: dict):
        self.p = subprocess.Popen([sys.executable, "-m", "tools.soak_inputs", "--serve"], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, case: Case, log: Path) -> subprocess.CompletedProcess:
        """Run ``case``; its stdout and stderr are kept as ``log.stdout`` and ``log.stderr``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        job = {"argv": case.argv, "full_disk": case.full_disk, "stdout": str(log.with_suffix(".stdout")),
               "stderr": str(log.with_suffix(".stderr"))}
        self.p.stdin.write(json.dumps(job) + "\n")
        self.p.stdin.flush()
        code = json.loads(self.p.stdout.readline())["code"]
        return subprocess.CompletedProcess(case.argv, code, Path(job["stdout"]).read_text(errors="replace"),
                                           Path(job["stderr"]).read_text(errors="replace"))

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def serve() -> None:
    """The server's side (``python -m tools.soak_inputs --serve``): one JSON job per stdin line, one reply each."""
    import os
    import traceback

    import duckdb  # noqa: F401 - imported once here, for every child
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import builders.backends.hf  # noqa: F401
    import builders.driver  # noqa: F401
    import logitstore.query  # noqa: F401
    import trainers.loop  # noqa: F401
    from tools.cli import main

    for line in sys.stdin:
        job = json.loads(line)
        out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        pid = os.fork()
        if pid == 0:  # the child: a fresh process with the command line already imported
            code = 1
            try:
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(out, 1)
                os.dup2(err, 2)
                if job["full_disk"]:
                    _limit_file_size()
                sys.argv = ["logitstore", *job["argv"]]
                code = main(job["argv"])
            except SystemExit as exc:  # argparse's usage errors, as the console script ends on them
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - the console script would print it: the soak counts it
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(out)
        os.close(err)
        deadline = time.time() + 600
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


def run_case(case: Case, server: ForkServer, log: Path) -> tuple[subprocess.CompletedProcess, str | None, str | None]:
    """(the finished run, a traceback or wrong exit if any, lost or mixed data if any)."""
    r = server.run(case, log)
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
    server = ForkServer(env)
    t0, i = time.time(), 0
    while time.time() - t0 < seconds:
        make = CLASSES[i % len(CLASSES)]
        i += 1
        case = make(w)
        r, crash, lost = run_case(case, server, w.work / "logs" / w.last.name)
        c = counts[make.__name__]
        c["runs"] += 1
        c["tracebacks"] += crash is not None
        c["lost_or_mixed"] += lost is not None
        status = "; ".join(x for x in (crash, lost) if x) or "ok"
        print(f"{i:4d} {make.__name__:22s} exit {r.returncode}  {status}", flush=True)
        if crash or lost:
            problems.append(f"{make.__name__} {' '.join(case.argv)[:300]}: {status}")
    server.close()
    total = {k: sum(c[k] for c in counts.values()) for k in ("runs", "tracebacks", "lost_or_mixed")}
    return {"seconds": round(time.time() - t0), "classes": len(CLASSES), **total, "by_class": counts,
            "problems": problems, "ok": total["tracebacks"] == 0 and total["lost_or_mixed"] == 0}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
