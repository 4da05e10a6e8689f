"""The classes of the bad-input soak (``tools/soak_inputs.py``): one generator per class of RELIABILITY.md's "Other
people's files and hand-edited inputs" table, each drawing its details from a seeded generator (which files a
user has, which key of a manifest is edited and to what, which SQL attack, which option gets NaN, ...), preparing
the input in a fresh directory and returning the ``Case`` to run: the command line, the exit codes it may end
with, and the check of what it left. A run counts as

- a *traceback* when its stderr holds one, or it ends by a signal or with an exit code other than the one the
  class expects (0, 1 for ``verify``'s findings, 2 for a refused input);
- *lost or mixed data* when a file it was not asked to write changed (a user's file, a cache, a manifest, a
  student, a secret read into the output), or it exited 0 where its input had to be refused (a resume with
  another teacher's weights, an edited manifest read as sound), or it wrote a sequence longer than the teacher's
  context length.

Both must be 0. The classes are ``CLASSES``, in the order the soak runs them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Case:
    """One run: the command, the exit codes it may end with, and the check of what it left (a problem or None)."""

    argv: list[str]
    expect: tuple[int, ...] = (2,)
    check: Callable[[subprocess.CompletedProcess], str | None] = lambda r: None
    full_disk: bool = False


@dataclasses.dataclass
class World:
    """What every round starts from: the tiny teacher, its data, a sound cache, a student config."""

    work: Path
    teacher: Path
    data: Path
    cache: Path
    student: Path
    rng: np.random.Generator
    n: int = 0
    last: Path | None = None

    def fresh(self, name: str) -> Path:
        """A new directory for one round (``last``: where its run's stdout and stderr go too)."""
        self.n += 1
        self.last = d = self.work / "rounds" / f"{self.n:04d}-{name}"
        d.mkdir(parents=True)
        return d

    def copy_cache(self, d: Path) -> Path:
        shutil.copytree(self.cache, d / "cache")
        return d / "cache"


def tree(path: Path) -> list:
    """Every file under ``path`` with its bytes (a directory: None), to compare before and after."""
    if path.is_file():
        return [("", path.read_bytes())]
    return sorted((p.relative_to(path).as_posix(), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def unchanged(path: Path, what: str) -> Callable[[subprocess.CompletedProcess], str | None]:
    before = tree(path)
    return lambda r: None if tree(path) == before else f"{what} {path} changed"


def build_argv(w: World, out: Path, *extra: str, teacher: Path | None = None, data: Path | None = None) -> list[str]:
    return ["build", str(teacher or w.teacher), str(data or w.data), "--top-k", "8", "-o", str(out), "-q", *extra]


def train_argv(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(cache), "--student", str(student), "-o", str(out), "--max-steps", "1", "--batch-size", "4",
            "--max-length", "48", "--quiet", *extra]


def resign(cache: Path, edit: Callable[[dict], None]) -> None:
    from logitstore.manifest import CHECKSUM_KEY, manifest_checksum

    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    m.pop(CHECKSUM_KEY, None)
    m[CHECKSUM_KEY] = manifest_checksum(m)
    (cache / "manifest.json").write_text(json.dumps(m, indent=1))


# ---------------------------------------------------------------- the classes


def teacher_swap(w: World) -> Case:
    """A resume with the teacher's weights replaced at the same path by a same-size checkpoint of other values."""
    import torch
    from safetensors.torch import load_file, save_file

    d = w.fresh("teacher-swap")
    teacher, cache = d / "teacher", w.copy_cache(d)
    shutil.copytree(w.teacher, teacher)
    f = teacher / "model.safetensors"
    tensors = load_file(f)
    floats = sorted(k for k, v in tensors.items() if v.is_floating_point())
    name = floats[int(w.rng.integers(len(floats)))]
    g = torch.Generator().manual_seed(int(w.rng.integers(2**31)))
    tensors[name] = tensors[name] + torch.randn(tensors[name].shape, generator=g) * float(w.rng.uniform(1e-3, 1))
    save_file(tensors, f, metadata={"format": "pt"})
    return Case(build_argv(w, cache, "--resume", teacher=teacher), check=unchanged(cache, "the cache"))


USER_FILES = ["shards/my_results.parquet", "shards/shard-000000.parquet", "notes.txt", "build.lock", "shards/x.tmp",
              "manifest.json", "id_map.parquet", "parts/block-000000/data.bin", ".inputs/block-000000.parquet"]


def user_directory(w: World) -> Case:
    """``build -o`` a directory of a user's files (some named like ours), or a file, with or without --resume."""
    d = w.fresh("user-dir")
    out = d / "out"
    if w.rng.random() < 0.2:
        out.write_text("a user's file")
    else:
        for rel in w.rng.choice(USER_FILES, int(w.rng.integers(1, 4)), replace=False):
            p = out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"name": "another tool"}) if rel == "manifest.json" else f"the user's {rel}")
    extra = [x for x, p in (("--resume", 0.5), ("--ray", 0.2)) if w.rng.random() < p]
    return Case(build_argv(w, out, *extra), check=unchanged(out, "the user's directory"))


def foreign_file_in_cache(w: World) -> Case:
    """A file of the user's inside a cache of ours, then ``build --resume``: it stays, verify names it later."""
    d = w.fresh("foreign-in-cache")
    cache = w.copy_cache(d)
    rel = str(w.rng.choice(["shards/notes.txt", "shards/shard-9.parquet", "README.md", "shards/a.tmp"]))
    (cache / rel).write_text("the user's")
    return Case(build_argv(w, cache, "--resume"), expect=(0,),
                check=lambda r: None if (cache / rel).read_text() == "the user's" else f"{rel} was deleted")


def select_force(w: World) -> Case:
    """``select --force -o`` a manifest, a shard, the id map, the cache directory or a user's file."""
    d = w.fresh("select-force")
    cache = w.copy_cache(d)
    user = d / "data.jsonl"
    user.write_text('{"text": "mine"}\n')
    target = [cache / "manifest.json", cache / "shards" / "shard-000000.parquet", cache / "id_map.parquet", cache,
              user][int(w.rng.integers(5))]
    before, user_before = tree(cache), tree(user)
    return Case(["select", str(cache), "--where", "true", "--force", "-o", str(target)],
                check=lambda r: None if tree(cache) == before and tree(user) == user_before else "overwritten")


def train_output(w: World) -> Case:
    """``train -o`` a user's directory, a file, the student's own directory or one inside it."""
    d = w.fresh("train-out")
    kind = int(w.rng.integers(4))
    student, out = w.student, d / "out"
    if kind == 0:
        out.mkdir()
        (out / "paper.tex").write_text("the user's")
    elif kind == 1:
        out.write_text("the user's")
    else:  # a model directory as the student, and -o it or a directory inside it
        student = d / "pretrained"
        student.mkdir()
        shutil.copy2(w.student, student / "config.json")
        (student / "model.safetensors").write_bytes(b"pretrained weights")
        out = student if kind == 2 else student / "next"
    watched = student if kind >= 2 else out
    extra = [x for x, p in (("--force", 0.4), ("--resume", 0.3)) if w.rng.random() < p]
    if "--force" in extra and "--resume" in extra:
        extra.remove("--resume")
    return Case(train_argv(w.cache, student, out, *extra), check=unchanged(watched, "the user's files"))


def concurrent_training(w: World) -> Case:
    """``train`` into an OUT whose run lock a live process holds (a training run in progress)."""
    from logitstore.lock import LockInfo, _proc_start

    d = w.fresh("concurrent")
    out = d / "out"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "600"])
    info = LockInfo(pid=holder.pid, host=socket.gethostname(), started="now", command="logitstore train ...",
                    proc_start=_proc_start(holder.pid))
    (out / "run.lock").write_text(json.dumps(dataclasses.asdict(info)))
    (out / "train_config.json").write_text("{}")
    before = tree(out)

    def check(r):
        holder.kill()
        holder.wait()
        return None if tree(out) == before else "the running run's directory changed"
    return Case(train_argv(w.cache, w.student, out, *(["--force"] if w.rng.random() < 0.5 else [])), check=check)


SQL_ATTACKS = [
    ("where", "1=1; COPY (SELECT 1) TO '{w}/out.csv'"), ("where", "true) UNION (SELECT 'x'"),
    ("where", "seq_id IN (SELECT content FROM read_text('{secret}'))"), ("weight", "1; ATTACH '{w}/x.db'"),
    ("query", "SELECT content AS seq_id FROM read_text('{secret}')"),
    ("query", "SELECT seq_id FROM sequences; COPY (SELECT 1) TO '{w}/out.csv'"),
    ("sql", "COPY (SELECT * FROM sequences) TO '{cache}/shards/x.parquet'"), ("sql", "ATTACH '{cache}/x.db'"),
    ("sql", "SELECT * FROM read_text('{secret}')"), ("sql", "EXPORT DATABASE '{cache}/e'"),
    ("sql", "SET enable_external_access = true; SELECT * FROM read_text('{secret}')"),
    ("sql", "SELECT 1; COPY (SELECT 1) TO '{w}/out.csv'"), ("sql", "INSTALL httpfs"),
]


def sql_attack(w: World) -> Case:
    """``select --where/--weight/--query`` and ``sql`` with the issue's attacks: no file written, no secret read."""
    d = w.fresh("sql")
    cache = w.copy_cache(d)
    secret = d / "secret.txt"
    secret.write_text("SECRET-" + str(w.rng.integers(10**9)))
    kind, text = SQL_ATTACKS[int(w.rng.integers(len(SQL_ATTACKS)))]
    text = text.format(w=d, secret=secret, cache=cache)
    argv = {"where": ["select", str(cache), "--where", text, "-o", str(d / "s.json")],
            "weight": ["select", str(cache), "--where", "true", "--weight", text, "-o", str(d / "s.json")],
            "query": ["select", str(cache), "--query", text, "-o", str(d / "s.json")],
            "sql": ["sql", str(cache), text]}[kind]
    before, names = tree(cache), {p.name for p in d.iterdir()}

    def check(r):
        if tree(cache) != before:
            return "the cache changed"
        if {p.name for p in d.iterdir()} != names:
            return f"wrote {sorted({p.name for p in d.iterdir()} - names)}"
        return "the secret was read" if secret.read_text() in r.stdout else None
    return Case(argv, check=check)


def long_record(w: World) -> Case:
    """A record longer than the teacher's 512 positions, with a random --max-length and --on-long."""
    from logitstore.reader import Cache

    d = w.fresh("long")
    words = " ".join(np.random.default_rng(int(w.rng.integers(2**31))).choice(["cache", "token", "teacher"],
                                                                               int(w.rng.integers(520, 1500))))
    data = d / "data.jsonl"
    data.write_text(json.dumps({"text": "a short one"}) + "\n" + json.dumps({"text": words}) + "\n")
    extra = (["--max-length", str(int(w.rng.integers(300, 2000)))] if w.rng.random() < 0.6 else []) + \
        ["--on-long", str(w.rng.choice(["truncate", "skip"]))]

    def check(r):
        if r.returncode != 0:
            return None  # counted as a wrong exit
        longest = max(int(n) for n in Cache(d / "c").scalars(["n_tokens"]).column(0).to_pylist())
        return None if longest <= 512 else f"a sequence of {longest} tokens, past the teacher's 512 positions"
    return Case(build_argv(w, d / "c", *extra, data=data), expect=(0,), check=check)


SELECTION_EDITS = [
    ("unknown id", lambda s: s["seq_ids"].__setitem__(0, "0" * 16)),
    ("all unknown", lambda s: s.update(seq_ids=[f"{i:016x}" for i in range(len(s["seq_ids"]))])),
    ("NaN weight", lambda s: s["weights"].__setitem__(1, float("nan"))),
    ("negative weight", lambda s: s["weights"].__setitem__(1, -2.0)),
    ("integer id", lambda s: s["seq_ids"].__setitem__(1, 12)), ("duplicate", lambda s: s["seq_ids"].append(
        s["seq_ids"][0]) or s["weights"].append(1.0)),
    ("zero weights", lambda s: s.update(weights=[0] * len(s["weights"]))),
    ("weights of another length", lambda s: s["weights"].pop()),
]


def edited_selection(w: World) -> Case:
    """A hand-edited selection through ``info``, ``sql`` or ``train``."""
    d = w.fresh("selection")
    sel = d / "s.json"
    shutil.copy2(w.work / "selection.json", sel)
    s = json.loads(sel.read_text())
    _, edit = SELECTION_EDITS[int(w.rng.integers(len(SELECTION_EDITS)))]
    edit(s)
    sel.write_text(json.dumps(s))
    cmd = int(w.rng.integers(3))
    argv = [["info", str(sel)], ["sql", str(sel), "SELECT count(*) FROM sequences"],
            train_argv(sel, w.student, d / "out")][cmd]
    return Case(argv, check=unchanged(w.cache, "the cache"))


MANIFEST_EDITS = [
    ("totals deleted", lambda m: m.pop("totals")),
    ("tokenizer.vocab_size changed", lambda m: m["tokenizer"].update(vocab_size=m["tokenizer"]["vocab_size"] + 1)),
    ("a shard's count changed", lambda m: m["shards"][0].update(sequences=m["shards"][0]["sequences"] + 1)),
    ("the teacher renamed", lambda m: m["teacher"].update(id="another")), ("complete flipped", lambda m: m.update(
        complete=not m["complete"])), ("checksum deleted", lambda m: m.pop("checksum")),
]


def edited_manifest(w: World) -> Case:
    """A manifest edited by hand (its checksum no longer matches): info, sql and train refuse it, verify reports it."""
    d = w.fresh("manifest-edit")
    cache = w.copy_cache(d)
    m = json.loads((cache / "manifest.json").read_text())
    MANIFEST_EDITS[int(w.rng.integers(len(MANIFEST_EDITS)))][1](m)
    (cache / "manifest.json").write_text(json.dumps(m, indent=1))
    cmd = int(w.rng.integers(4))
    argv = [["info", str(cache)], ["sql", str(cache), "SELECT 1"], ["verify", "-q", str(cache)],
            train_argv(cache, w.student, d / "out")][cmd]
    return Case(argv, expect=(1,) if cmd == 2 else (2,), check=unchanged(cache, "the cache"))


def damaged_manifest(w: World) -> Case:
    """A manifest path ".", JSON nested too deeply, a huge integer: one line from every command."""
    d = w.fresh("manifest-damage")
    cache = w.copy_cache(d)
    kind = int(w.rng.integers(3))
    if kind == 0:
        resign(cache, lambda m: m["shards"][int(w.rng.integers(len(m["shards"])))].update(
            file=str(w.rng.choice([".", "", "./", "shards/"]))))
    elif kind == 1:
        depth = int(w.rng.integers(2000, 200_000))
        (cache / "manifest.json").write_text("[" * depth + "]" * depth)
    else:
        text = (cache / "manifest.json").read_text()
        (cache / "manifest.json").write_text(re.sub(r'"vocab_size": \d+', '"vocab_size": ' + "9" * int(
            w.rng.integers(4301, 20000)), text, count=1))
    cmd = int(w.rng.integers(4))
    argv = [["info", str(cache)], ["sql", str(cache), "SELECT 1"], ["verify", "-q", str(cache)],
            train_argv(cache, w.student, d / "out")][cmd]
    return Case(argv, expect=(1,) if cmd == 2 else (2,), check=unchanged(cache, "the cache"))


def unfinished_cache(w: World) -> Case:
    """``train`` or ``verify`` on a cache whose build is unfinished (complete: false)."""
    d = w.fresh("unfinished")
    cache = w.copy_cache(d)
    resign(cache, lambda m: m.update(complete=False))
    kind = int(w.rng.integers(3))
    if kind == 0:
        return Case(train_argv(cache, w.student, d / "out"), check=unchanged(cache, "the cache"))
    if kind == 1:
        return Case(train_argv(cache, w.student, d / "out", "--allow-incomplete"), expect=(0,))
    return Case(["verify", "-q", str(cache)], expect=(0,),
                check=lambda r: None if "not finished" in r.stdout else "verify did not say the build is unfinished")


def damaged_input(w: World) -> Case:
    """A teacher whose head is smaller than its tokenizer; a saved dataset with a junk state.json, a missing .arrow
    or a non-JSON dataset_dict.json."""
    d = w.fresh("input")
    kind = int(w.rng.integers(4))
    if kind == 0:
        return Case(build_argv(w, d / "c", teacher=w.work / "small-head"))
    ds = d / "ds"
    shutil.copytree(w.work / ("dataset-dict" if kind == 3 else "dataset"), ds)
    if kind == 1:
        (ds / "state.json").write_text(str(w.rng.choice(["junk", "{", '{"_data_files": 3}', "[" * 50_000])))
    elif kind == 2:
        for f in ds.glob("*.arrow"):
            f.unlink()
    else:
        (ds / "dataset_dict.json").write_text(str(w.rng.choice(["{not json", "[]", '{"splits": 3}'])))
    return Case(build_argv(w, d / "c", data=ds))


FLOAT_FLAGS = ("--lr", "--temperature", "--ce-weight", "--beta", "--alpha", "--holdout", "--min-lr-ratio",
               "--weight-decay", "--grad-clip", "--keep-fraction", "--epochs")


def bad_option(w: World) -> Case:
    """A float option NaN or infinite, or a sweep value of the wrong type."""
    d = w.fresh("option")
    if w.rng.random() < 0.5:
        flag = str(w.rng.choice(FLOAT_FLAGS))
        return Case(train_argv(w.cache, w.student, d / "out", f"{flag}={w.rng.choice(['nan', 'inf', '-inf'])}"))
    option, value = [("max_steps", '"3"'), ("lr", "[1]"), ("pack", "1"), ("loss", "3"), ("batch_size", "2.5"),
                     ("seed", "true"), ("holdout", '"0.1"')][int(w.rng.integers(7))]
    sweep = d / "sweep.toml"
    sweep.write_text(f'[[runs]]\nname = "a"\nstudent = "{w.student}"\n{option} = {value}\n')
    return Case(["train", str(w.cache), "--sweep", str(sweep), "-o", str(d / "runs")],
                check=lambda r: None if not (d / "runs").exists() else "a run directory was written")


def output_file(w: World) -> Case:
    """``-o`` naming a file, for the commands that write a directory."""
    d = w.fresh("out-file")
    f = d / "precious.txt"
    f.write_text("keep")
    c = str(w.cache)
    argv = [build_argv(w, f), ["diff", c, c, "-o", str(f)], ["score", c, str(w.teacher), "-o", str(f)],
            ["select", c, "--where", "true", "--materialize", "-o", str(f)],
            train_argv(w.cache, w.student, f)][int(w.rng.integers(5))]
    return Case(argv, check=unchanged(f, "the file"))


def full_disk(w: World) -> Case:
    """A training run whose checkpoint cannot be written (no file may grow past 4 MiB): one line, no step-N.tmp."""
    d = w.fresh("full-disk")
    out = d / "out"

    def check(r):
        left = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
        return f"left {left}" if left or (out / "model.safetensors").exists() else None
    return Case(train_argv(w.cache, w.student, out, "--save-every", "1"), check=check, full_disk=True)


CLASSES = [teacher_swap, user_directory, foreign_file_in_cache, select_force, train_output, concurrent_training,
           sql_attack, long_record, edited_selection, edited_manifest, damaged_manifest, unfinished_cache,
           damaged_input, bad_option, output_file, full_disk]
