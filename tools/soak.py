"""Reliability soak: repeated SIGKILLs of real builds, a corruption sweep, and a fuzz loop. Prints its numbers.

1. Kills. A tiny random Llama with the embedded teacher's real tokenizer (SmolLM2, vocab 49152) is saved
   to a temporary directory, and ``python -m tools.cli build`` runs on generated records, with small
   shards. The build is killed with SIGKILL at a random moment (seeded: a share of the kills at a random
   time during start-up, when the teacher loads, the stale lock is taken over and the data is read; the
   others after a random number of sequences were added, plus a random delay, so that they land in row
   group writes, commits and manifest writes), resumed with ``--resume``, killed again, ... until it
   completes; then it is compared with an uninterrupted build of the same data (same seq ids, tokens and
   positions; teacher values within float noise, as batches differ between runs). After each
   kill the committed shards must be unchanged and what is committed must read back exactly. A
   ``sitecustomize`` on the children's PYTHONPATH logs each sequence the writer accepts, so the work each
   resume repeats (sequences a killed run had added but not committed) is counted, and compared with one
   shard's worth.
2. Corruptions. On copies of the finished cache: flipped bytes, truncated, missing, swapped and stray
   shards, temporary files, edited and truncated manifests, a damaged id map. ``verify`` must report each
   one (naming the file), and the reader must raise a ``LogitstoreError`` or return exactly the sound values.
3. Fuzzing. With atheris (if importable; libFuzzer-guided, the logitstore modules instrumented for coverage)
   or otherwise a seeded random mutation loop: damaged shards, id maps and manifests, read through every
   access path and ``verify``; only documented errors, no wrong value, no hang (libFuzzer's ``-timeout``).

    python tools/soak.py [--records 1500] [--max-kills 15] [--corruptions 200] [--fuzz-seconds 120] [--seed 0]
                         [--startup-kills 0.25] [--workdir DIR]
    python tools/soak.py --bad-inputs SECONDS [--seed 0] [--workdir DIR]   # 4. instead of 1-3 (below)

4. Bad inputs (``--bad-inputs``): the real command line against generated bad inputs of every class of
   RELIABILITY.md's table of other people's files and bad input (``tools/soak_inputs.py``), for a bounded
   time; counts runs, tracebacks and lost or mixed data (both must be 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRACE_HOOK = textwrap.dedent('''
    """Loaded by every soak child (it is on their PYTHONPATH): logs each sequence the cache writer accepts."""
    import os
    if os.environ.get("SOAK_TRACE"):
        import logitstore.writer as _w

        _add, _fd = _w.CacheWriter.add, os.open(os.environ["SOAK_TRACE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

        def add(self, rec):
            ok = _add(self, rec)
            if ok:
                sid = rec.seq_id or _w.default_seq_id(_w.as_numpy(rec.input_ids).astype("int32"), rec.sample)
                os.write(_fd, (sid + "\\n").encode())
            return ok

        _w.CacheWriter.add = add
''')
WORDS = ("teacher student cache token logit entropy shard manifest parquet query select train sample distil "
         "vocabulary model batch resume crash lock verify").split()


# ---------------------------------------------------------------- setup


def make_teacher(path: Path) -> Path:
    """The tests' tiny teacher: a 2-layer random Llama with the embedded teacher's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from builders.embedded import prepare_embedded_teacher

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(prepare_embedded_teacher()).save_pretrained(path)
    return path


def make_data(path: Path, n: int, rng: np.random.Generator) -> Path:
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, int(rng.integers(6, 40))))
        if i % 10 == 3:
            rec = {"messages": [{"role": "user", "content": words[:40]}, {"role": "assistant", "content": words}]}
        elif i % 10 == 7:
            rec = {"prompt": words[:30], "response": " " + words[30:] + " done."}
        else:
            rec = {"text": words}
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- 1. kills


@dataclasses.dataclass
class Builder:
    teacher: Path
    data: Path
    env: dict
    args: tuple = ("--top-k", "8", "--values", "fp32", "-q", "--shard-mb", "0.015", "--row-group-positions", "150",
                   "--token-budget", "1024")

    def start(self, out: Path, resume: bool, trace: Path | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tools.cli", "build", str(self.teacher), str(self.data), "-o", str(out),
               *self.args] + (["--resume"] if resume else [])
        env = {**self.env, **({"SOAK_TRACE": str(trace)} if trace else {})}
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _shards(path: Path) -> list[dict]:
    try:
        return json.loads((path / "manifest.json").read_text())["shards"]
    except FileNotFoundError:
        return []


def _ids(path: Path, shards: list[dict]) -> set[str]:
    import pyarrow.parquet as pq

    return {s for sh in shards for s in pq.read_table(path / sh["file"], columns=["seq_id"]).column(0).to_pylist()}


def decoded(path) -> dict:
    import logitstore

    return {s.seq_id: (s.input_ids.tolist(), s.pos.tolist(), s.loss_mask.tolist(), s.ids, s.logprobs,
                       s.label_logprob, s.entropy, s.tail_mass) for s in logitstore.open(path)}


def same_build(got: dict, want: dict) -> list[str]:
    """Differences between two builds of the same data beyond the float noise of different batch compositions."""
    bad = []
    if got.keys() != want.keys():
        return [f"seq ids differ: {len(got.keys() - want.keys())} extra, {len(want.keys() - got.keys())} missing"]
    for k, w in want.items():
        g = got[k]
        if g[:3] != w[:3]:
            bad.append(f"{k}: tokens, positions or mask differ")
            continue
        for i in (4, 5, 6, 7):
            if not np.allclose(g[i], w[i], atol=1e-4, rtol=0):
                bad.append(f"{k}: values differ by {np.abs(g[i] - w[i]).max():.2e}")
        clear = (np.diff(w[4], axis=1) < -1e-3).all(axis=1)  # no near-ties: the same ids
        if not np.array_equal(g[3][clear], w[3][clear]):
            bad.append(f"{k}: entry ids differ")
    return bad


def kill_loop(b: Builder, work: Path, rng: np.random.Generator, max_kills: int, startup_kills: float) -> dict:
    import logitstore
    from logitstore.verify import verify

    t0 = time.time()
    full = work / "full"
    p = b.start(full, False)
    if p.wait() != 0:
        raise SystemExit(f"the uninterrupted build failed: {p.stderr.read()}")
    t_full = time.time() - t0
    want = decoded(full)
    per_shard = max(s.sequences for s in logitstore.open(full).manifest.shards)
    out, trace = work / "crashed", work / "trace.log"
    kills, runs, lost, repeated, problems, modes = 0, 0, [], [], [], {"start-up": 0, "writing": 0}
    added_before: set[str] = set()
    startup = 10.0  # seconds from a run's start to its first added sequence; measured below
    t0 = time.time()
    while True:
        before, start = _shards(out), len(_lines(trace))
        p = b.start(out, runs > 0, trace)
        t_run = time.time()
        runs += 1
        first_add = None
        if rng.random() < startup_kills:  # while it loads the teacher, takes the lock over, reads the data
            mode, deadline, target = "start-up", t_run + rng.uniform(0.2, startup), None
        else:  # after some sequences, then a random delay: in a row group write, a commit, a manifest write
            mode, deadline, target = "writing", None, start + int(rng.integers(1, 2 * per_shard))
        while p.poll() is None:
            n = len(_lines(trace))
            if first_add is None and n > start:
                first_add = time.time() - t_run
            if (deadline and time.time() >= deadline) or (target and n >= target):
                break
            time.sleep(0.01)
        if target:
            time.sleep(rng.uniform(0, 0.5))
        if first_add is not None:
            startup = first_add
        killed = p.poll() is None and kills < max_kills
        if killed:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            modes[mode] += 1
        elif p.wait() != 0:
            raise SystemExit(f"run {runs} failed: {p.stderr.read()}")
        this_run = _lines(trace)[start:]
        repeated.append(len(set(this_run) & added_before))
        added_before |= set(this_run)
        after = _shards(out)
        if after[:len(before)] != before:
            problems.append(f"run {runs}: committed shards changed")
        if not killed:
            break
        lost.append(len(set(this_run) - _ids(out, after)))
        if after:
            got = decoded(out)
            wrong = [k for k in got if same_build({k: got[k]}, {k: want[k]})]
            if wrong:
                problems.append(f"kill {kills}: {len(wrong)} committed sequences differ")
            extra = [p for p in verify(out) if "not listed in the manifest" not in p.message]
            problems += [f"kill {kills}: verify: {p}" for p in extra]
        print(f"  kill {kills:2d} ({mode:8s}) after {time.time() - t_run:5.1f} s: {len(after):3d} shards committed, "
              f"this run added {len(this_run):4d} sequences and lost {lost[-1]:3d}", flush=True)
    final = logitstore.open(out)
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or "lock" in p.name]
    diff = same_build(decoded(out), want)
    return {
        "kills": kills, "kills_by_moment": modes, "runs": runs, "records": len(want),
        "uninterrupted_s": round(t_full, 1),
        "interrupted_s": round(time.time() - t0, 1), "shard_capacity_sequences": per_shard,
        "max_lost_per_kill": max(lost, default=0), "max_repeated_per_resume": max(repeated, default=0),
        "total_repeated": sum(repeated), "complete": final.manifest.complete, "equal_to_uninterrupted": not diff,
        "differences": diff[:5], "verify_problems": [str(p) for p in verify(out)], "leftover_files": leftovers,
        "problems": problems,
        "ok": not diff and not problems and not leftovers and final.manifest.complete and verify(out) == [] and
        max(lost, default=0) <= per_shard and max(repeated, default=0) <= per_shard,
    }


# ---------------------------------------------------------------- 2. corruption sweep


def _flip(rng, f: Path):
    data = bytearray(f.read_bytes())
    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    f.write_bytes(bytes(data))


def _edit_manifest(rng, path: Path):
    m = json.loads((path / "manifest.json").read_text())
    i = int(rng.integers(len(m["shards"])))
    key = str(rng.choice(["sequences", "positions", "entries", "targets", "bytes", "sha256", "file", "drop",
                          "logprob_step", "k", "vocab_size", "format_version", "id_map_sha256", "swap"]))
    s = m["shards"][i]
    if key == "sha256":
        s[key] = "0" * 64
    elif key == "file":
        s[key] = str(rng.choice(["../outside.parquet", "/etc/passwd", m["shards"][(i + 1) % len(m["shards"])]["file"]]))
    elif key == "drop":
        del m["shards"][i]
    elif key == "swap":
        j = (i + 1) % len(m["shards"])
        m["shards"][i], m["shards"][j] = m["shards"][j], m["shards"][i]
        key = "swap" if i != j else "no-op"
    elif key == "logprob_step":
        m["codec"]["logprob_step"] = 0.05
    elif key == "k":
        m["rule"]["k"] += 1
    elif key == "vocab_size":
        m["vocab_size"] += 1
    elif key == "format_version":
        m["format_version"] = 2
    elif key == "id_map_sha256":
        if m["id_map"]:
            m["id_map"]["sha256"] = "f" * 64
    else:
        s[key] += int(rng.integers(1, 5))
    (path / "manifest.json").write_text(json.dumps(m))
    return key


INJECTIONS = {  # kind -> (damage(rng, cache path) -> detail, the file verify must name)
    "flipped bit in a shard": (lambda rng, p, sh: _flip(rng, p / sh), lambda sh: sh),
    "truncated shard": (lambda rng, p, sh: (p / sh).write_bytes((p / sh).read_bytes()[
        :int(rng.integers((p / sh).stat().st_size))]), lambda sh: sh),
    "missing shard": (lambda rng, p, sh: (p / sh).unlink(), lambda sh: sh),
    "stray file in shards/": (lambda rng, p, sh: (p / "shards" / "notes.txt").write_text("x"),
                              lambda sh: "shards/notes.txt"),
    "stray shard-like file": (lambda rng, p, sh: shutil.copy(p / sh, p / "shards" / "shard-999999.parquet"),
                              lambda sh: "shards/shard-999999.parquet"),
    "temporary file left": (lambda rng, p, sh: (p / "shards" / ".shard-000099.parquet.tmp").write_bytes(b"PAR1"),
                            lambda sh: "shards/.shard-000099.parquet.tmp"),
    "edited manifest": (lambda rng, p, sh: _edit_manifest(rng, p), None),
    "truncated manifest": (lambda rng, p, sh: (p / "manifest.json").write_bytes((p / "manifest.json").read_bytes()[
        :int(rng.integers((p / "manifest.json").stat().st_size))]), lambda sh: "manifest.json"),
    "missing manifest": (lambda rng, p, sh: (p / "manifest.json").unlink(), lambda sh: "manifest.json"),
    "flipped bit in the id map": (lambda rng, p, sh: _flip(rng, p / "id_map.parquet"), lambda sh: "id_map"),
}


def read_everything(path) -> dict:
    """Every value the reader hands out, by each access path; a path that fails gives its error."""
    import logitstore

    out: dict = {}
    try:
        cache = logitstore.open(path)
    except logitstore.LogitstoreError as exc:
        return {"open": exc}
    for name, fn in (("iter", lambda: {s.seq_id: sequence_values(s) for s in cache}),
                     ("scalars", lambda: cache.scalars().to_pylist()),
                     ("lookup", lambda: {sid: sequence_values(cache[sid]) for sid in sorted(cache.index)[::7]})):
        try:
            out[name] = fn()
        except logitstore.LogitstoreError as exc:
            out[name] = exc
    return out


def sequence_values(s) -> tuple:
    arrays = (s.input_ids, s.pos, s.loss_mask, s.ids, s.logprobs, s.label_logprob, s.entropy, s.tail_mass,
              s.n_entries)
    return tuple(a.tolist() for a in arrays) + (s.record, s.n_tokens, s.mean_entropy, s.teacher_nll,
                                                s.token_accuracy, s.correct)


def wrong_values(got: dict, want: dict) -> list[str]:
    return [k for k, v in got.items() if not isinstance(v, Exception) and v != want[k]]


def corruption_sweep(cache: Path, work: Path, rng: np.random.Generator, n: int) -> dict:
    from logitstore.verify import verify
    from tools.cli import main as cli

    want = read_everything(cache)
    shards = sorted(f"shards/{p.name}" for p in (cache / "shards").iterdir())
    stats: dict[str, list[int]] = {k: [0, 0, 0] for k in INJECTIONS}  # injected, detected by verify, wrong reads
    undetected = []
    kinds = list(INJECTIONS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        dst = work / "corrupt"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(cache, dst)
        shard = shards[int(rng.integers(len(shards)))]
        damage, named = INJECTIONS[kind]
        detail = damage(rng, dst, shard)
        if detail == "no-op":
            continue
        stats[kind][0] += 1
        problems = verify(dst)
        want_file = named(shard) if named else "manifest.json"
        text = [str(p) for p in problems]
        if named is None:  # an edited manifest may be reported on the manifest or on the shard it misdescribes
            ok = bool(problems)
        else:
            ok = any(want_file in t for t in text)
        if ok and (dst / "manifest.json").exists():  # the command line agrees: exit 1
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                ok = cli(["verify", str(dst), "-q"]) == 1
        stats[kind][1] += ok
        if not ok:
            undetected.append(f"{kind} ({detail or shard}): {text[:2]}")
        if (dst / "manifest.json").exists() and wrong_values(read_everything(dst), want):
            stats[kind][2] += 1
    return {"by_kind": {k: {"injected": v[0], "detected": v[1], "wrong_reads": v[2]} for k, v in stats.items()},
            "injected": sum(v[0] for v in stats.values()), "detected": sum(v[1] for v in stats.values()),
            "wrong_reads": sum(v[2] for v in stats.values()), "undetected": undetected[:10]}


# ---------------------------------------------------------------- 3. fuzzing

FUZZ_TARGETS = ["shards/shard-000000.parquet", "shards/shard-000001.parquet", "id_map.parquet", "manifest.json"]


def fuzz_cache(work: Path) -> Path:
    """A small sound cache (several shards, ranked ids, qdelta values) for the fuzz loop to damage."""
    import logitstore

    rng = np.random.default_rng(77)
    path = work / "fuzz-sound"
    with logitstore.CacheWriter(path, vocab_size=300, rule=logitstore.MassTopK(0.9, 12), shard_bytes=2500,
                                row_group_positions=40) as w:
        for i in range(10):
            n = int(rng.integers(2, 24))
            z = rng.standard_normal((n - 1, 300)) * 3
            lp = z - np.log(np.exp(z).sum(1, keepdims=True))
            e = logitstore.sparsify(lp, logitstore.MassTopK(0.9, 12))
            tok = rng.integers(0, 300, n)
            w.add(logitstore.SequenceRecord(
                input_ids=tok, record=i, loss_mask=rng.random(n - 1) > 0.2, scored=logitstore.Scored.of(
                    e, label_logprob=lp[np.arange(n - 1), tok[1:]], entropy=-(np.exp(lp) * lp).sum(1))))
    return path


class FuzzTarget:
    """One fuzz input -> a damaged file in a work copy -> every read path and verify. Raises on a wrong value or
    an undocumented exception (which the fuzzer reports as a crash)."""

    def __init__(self, sound: Path, work: Path):
        self.sound, self.work = sound, work
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(sound, work)
        self.files = {t: (sound / t).read_bytes() for t in FUZZ_TARGETS}
        self.want = read_everything(sound)
        self.outcomes = {"error": 0, "same": 0}

    def seeds(self) -> list[bytes]:
        return [bytes([i]) + data for i, data in enumerate(self.files.values())]

    def __call__(self, data: bytes) -> None:
        from logitstore.verify import verify

        if not data:
            return
        target = FUZZ_TARGETS[data[0] % len(FUZZ_TARGETS)]
        for t, orig in self.files.items():
            (self.work / t).write_bytes(data[1:] if t == target else orig)
        got = read_everything(self.work)
        wrong = wrong_values(got, self.want)
        if wrong:
            raise AssertionError(f"damaged {target} read as wrong values: {wrong}")
        problems = verify(self.work)
        if data[1:] != self.files[target] and target != "manifest.json" and \
                not any(target in p.file or target in p.message for p in problems):
            raise AssertionError(f"verify missed damage to {target}: {problems}")
        self.outcomes["error" if any(isinstance(v, Exception) for v in got.values()) else "same"] += 1


def fuzz_worker(work: Path, seconds: int, seed: int) -> None:
    """Run by ``--fuzz-worker`` in a child process: atheris' libFuzzer exits the process when it is done."""
    import atheris

    with atheris.instrument_imports(include=["logitstore"]):
        import logitstore  # noqa: F401
        import logitstore.verify  # noqa: F401
    target = FuzzTarget(fuzz_cache(work), work / "fuzz-work")
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, s in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(s)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=30", f"-seed={seed + 1}",
                   "-max_len=40000", "-print_final_stats=1", f"-artifact_prefix={work}/"], target)
    atheris.Fuzz()


def fuzz(work: Path, seconds: int, seed: int) -> dict:
    try:
        import atheris  # noqa: F401
        engine = "atheris"
    except ImportError:
        engine = "random mutations (atheris is not installed: pip install atheris)"
    t0 = time.time()
    if engine == "atheris":
        p = subprocess.run([sys.executable, __file__, "--fuzz-worker", str(work), "--fuzz-seconds", str(seconds),
                            "--seed", str(seed)], cwd=ROOT, capture_output=True, text=True)
        log = p.stdout + p.stderr
        runs = re.findall(r"Done (\d+) runs in (\d+) second", log) or \
            re.findall(r"stat::number_of_executed_units: (\d+)()", log)
        crash = [line for line in log.splitlines() if "Uncaught Python exception" in line or "ERROR" in line]
        return {"engine": engine, "seconds": round(time.time() - t0, 1), "runs": int(runs[-1][0]) if runs else None,
                "exit": p.returncode, "crashes": crash[:5] + ([log[-3000:]] if p.returncode else []),
                "ok": p.returncode == 0 and not crash}
    target = FuzzTarget(fuzz_cache(work), work / "fuzz-work")
    rng = np.random.default_rng(seed)
    seeds, runs = target.seeds(), 0
    while time.time() - t0 < seconds:
        data = bytearray(seeds[int(rng.integers(len(seeds)))])
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(1, len(data)))
            op = int(rng.integers(4))
            if op == 0:
                data[at] ^= 1 << int(rng.integers(8))
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = rng.bytes(int(rng.integers(1, 16)))
            else:
                data[at:at + 8] = rng.bytes(8)
        target(bytes(data))
        runs += 1
    return {"engine": engine, "seconds": round(time.time() - t0, 1), "runs": runs, **target.outcomes, "ok": True}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1500, help="records in the generated data (default 1500)")
    ap.add_argument("--max-kills", type=int, default=15, help="kills before a run may finish (default 15)")
    ap.add_argument("--startup-kills", type=float, default=0.25,
                    help="share of the kills at a random moment of a run's start-up (default 0.25); the others "
                         "after a random number of added sequences")
    ap.add_argument("--corruptions", type=int, default=200, help="injected corruptions (default 200)")
    ap.add_argument("--fuzz-seconds", type=int, default=120, help="fuzzing time (default 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed)")
    ap.add_argument("--bad-inputs", type=float, metavar="SECONDS",
                    help="instead: run the command line against generated bad inputs of every class for SECONDS "
                         "(tools/soak_inputs.py) and report runs, tracebacks and lost or mixed data")
    ap.add_argument("--fuzz-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.fuzz_worker:
        fuzz_worker(Path(a.fuzz_worker), a.fuzz_seconds, a.seed)
        return 0
    if a.bad_inputs is not None:
        return bad_input_soak(a)
    rng = np.random.default_rng(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        hook = work / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(TRACE_HOOK)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.time()
        print(f"kills: {a.records} records, up to {a.max_kills} SIGKILLs", flush=True)
        b = Builder(make_teacher(work / "teacher"), make_data(work / "data.jsonl", a.records, rng), env)
        kills = kill_loop(b, work, rng, a.max_kills, a.startup_kills)
        print(json.dumps(kills, indent=1), flush=True)
        print(f"corruptions: {a.corruptions} injected into copies of the finished cache", flush=True)
        sweep = corruption_sweep(work / "crashed", work, rng, a.corruptions)
        print(json.dumps(sweep, indent=1), flush=True)
        print(f"fuzzing: {a.fuzz_seconds} s", flush=True)
        fz = fuzz(work, a.fuzz_seconds, a.seed)
        print(json.dumps(fz, indent=1), flush=True)
        ok = kills["ok"] and sweep["detected"] == sweep["injected"] and sweep["wrong_reads"] == 0 and fz["ok"]
        print(f"\nSUMMARY  kills survived {kills['kills']} ({kills['runs']} runs, resumed build "
              f"{'==' if kills['equal_to_uninterrupted'] else '!='} uninterrupted, max repeated per resume "
              f"{kills['max_repeated_per_resume']} <= shard {kills['shard_capacity_sequences']} sequences); "
              f"corruptions detected {sweep['detected']}/{sweep['injected']}, wrong reads {sweep['wrong_reads']}; "
              f"fuzz {fz['engine'].split(' ')[0]} {fz['runs']} runs in {fz['seconds']} s; "
              f"total {time.time() - t0:.0f} s; {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1


def bad_input_soak(a) -> int:
    """``--bad-inputs SECONDS``: tools/soak_inputs.py in a work directory; prints every run, the counts and OK."""
    from tools.soak_inputs import bad_inputs

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
        print(f"bad inputs: the command line against generated bad inputs for {a.bad_inputs:.0f} s", flush=True)
        res = bad_inputs(work, a.bad_inputs, a.seed, env, make_teacher, make_data)
        print(json.dumps(res, indent=1), flush=True)
        print(f"\nSUMMARY  bad inputs: {res['runs']} runs of the command line over {res['classes']} classes in "
              f"{res['seconds']} s; tracebacks {res['tracebacks']}, lost or mixed data {res['lost_or_mixed']}; "
              f"{'OK' if res['ok'] else 'FAILED'}")
        return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
