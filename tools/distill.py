"""``logitstore distill``: on-policy distillation in rounds, built from the build driver and the trainer.

Round r (1..R): the student of round r-1 (round 1: STUDENT) samples N responses per prompt of
PROMPTS, the teacher scores every response position into ``RUN/round-NNN/cache``
(``builders.driver.build`` with a ``PolicyConfig``: the cache also holds the student's own logprob and
entropy per position), and the student trains on that cache from its previous weights, optionally
mixed per batch with an off-policy cache at ratio lambda (``TrainConfig.mix_cache``), into
``RUN/round-NNN/student`` (``trainers.loop.train``). The teacher thus runs as a batch job, and
every round stays a cache of its own that SQL can read.

::

    RUN/
      run.json            the settings (a --resume must match them; --rounds may grow)
      build.lock          while a distill process runs (one per RUN; a killed one's lock is taken over)
      union.json          the round caches as one union (logitstore sql RUN "... GROUP BY round")
      rounds.json         per round: positions, pass rate, mean teacher NLL of the student's samples, the
                          reverse-KL estimate from the stored policy logprobs, training and held-out metrics
      round-000/student   only for a config.json STUDENT: the seeded initial model that round 1 samples from
      round-001/cache     round 1: the student's samples, scored by the teacher
      round-001/student   round 1's student (AutoModelForCausalLM.from_pretrained)

Resume: every step commits atomically and says whether it finished (a cache's ``complete`` flag, a
student's ``summary.json``, written last), so ``run`` with ``resume=True`` after a SIGKILL at any point
skips the finished steps, resumes a cache build or a training run from its last commit or checkpoint
(or restarts a training run that wrote none), and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import logitstore
from builders.config import BuildConfig, PolicyConfig
from builders.driver import build
from builders.policy import PolicyNotFoundError, check_same_tokenizer
from logitstore.errors import CacheExistsError, InvalidInputError, LogitstoreError
from logitstore.lock import LOCK_NAME, BuildLock, read_lock
from logitstore.manifest import atomic_write_bytes
from logitstore.ownership import describe_entries, refuse_file
from logitstore.settings import declared_defaults, fill_defaults
from logitstore.union import Member, Union, save_union
from trainers.checkpoint import list_checkpoints
from trainers.config import TrainConfig, where
from trainers.config import placed as placed_train
from trainers.loop import train

RUN_FILE, ROUNDS_FILE, SUMMARY = "run.json", "rounds.json", "summary.json"
RUN_FORMAT = "logitstore-distill"
#: settings a resume may change
RESUMABLE = ("rounds",)
NEED_GENERATE = "--generate N is required: each round samples N responses per prompt from the student"


@dataclasses.dataclass
class DistillConfig:
    """One distill run: the teacher, the prompts, the first student, and the build and training of every round."""

    teacher: str
    prompts: str
    student: str
    """a model directory, or a config.json (round-000/student is then initialised from it with --seed)"""
    output: str
    rounds: int
    build: BuildConfig
    """the build of each round's cache; needs ``generation``; its policy and seed are set per round"""
    train: TrainConfig
    """the training of each round; cache, student, output and resume are set per round"""
    policy: PolicyConfig = dataclasses.field(default_factory=lambda: PolicyConfig(path=""))
    """how the student samples (backend, dtype, device); path and round are set per round"""
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        """What ``run.json`` records (and a resume compares), as plain JSON."""
        b = {**dataclasses.asdict(self.build), "rule": self.build.rule.to_dict(), "policy": None}
        b.pop("lock")  # how a build writes, not what it writes (round caches are local: always locked)
        t = {k: v for k, v in self.train.to_dict().items() if k not in ("cache", "student", "output", "resume",
                                                                        "quiet")}
        p = {k: v for k, v in dataclasses.asdict(self.policy).items() if k not in ("path", "round")}
        d = {"format": RUN_FORMAT, "version": 1, "teacher": self.teacher, "prompts": str(Path(self.prompts).resolve()),
             "student": str(Path(self.student).resolve()), "rounds": self.rounds, "seed": self.seed, "build": b,
             "train": t, "policy": p}
        return placed(json.loads(json.dumps(d)))


def placed(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (run.json's) with the teacher and the training's path settings as the places they name
    (``trainers.config.where``), so a run resumes from any working directory."""
    out = {**settings, "teacher": where(settings.get("teacher"))}
    if isinstance(settings.get("train"), dict):
        out["train"] = placed_train(settings["train"])
    return out


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:03d}"


def round_seed(seed: int, r: int) -> int:
    """The sampling seed of round ``r`` (each round draws new samples)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/round/{r}".encode(), digest_size=4).digest(), "little")


def check(cfg: DistillConfig, *, resume: bool) -> None:
    """Everything that can be refused before anything is written (one line each)."""
    from builders.backends.hf import load_tokenizer
    from builders.inputs import data_fingerprint
    from trainers.sources import check_usable

    if cfg.rounds < 1:
        raise InvalidInputError(f"--rounds {cfg.rounds}: must be >= 1 (a round samples, scores and trains)")
    if cfg.build.generation is None:
        raise InvalidInputError(NEED_GENERATE)
    if cfg.build.ray is not None:
        raise InvalidInputError("distill runs its builds in one process; --ray is not supported")
    cfg.train.replace(cache="-", student=cfg.train.student or "-", output="-").validate()  # loss, steps, ...
    for flag, path in (("--mix-cache", cfg.train.mix_cache), ("--eval", cfg.train.eval)):
        try:
            if path:  # a missing, damaged or unfinished cache is named now, not after the first round
                check_usable(logitstore.open(path, allow_missing=cfg.train.allow_missing), flag,
                             cfg.train.allow_incomplete)
        except LogitstoreError as exc:
            raise InvalidInputError(f"{flag}: {exc}") from None
    data_fingerprint(cfg.prompts)  # a missing PROMPTS file
    out = Path(cfg.output)
    check_run_dir(out, resume=resume)
    s = Path(cfg.student)
    if not (s.is_dir() and (s / "config.json").is_file()) and not (s.is_file() and s.suffix == ".json"):
        what = "no such file or directory" if not s.exists() else "not a model directory or a config.json"
        raise PolicyNotFoundError(f"--student {cfg.student}: {what}; round 1 samples from it")
    if s.is_dir() and (out.resolve() == s.resolve() or s.resolve() in out.resolve().parents):
        raise InvalidInputError(f"-o {out} is the student {cfg.student} or inside it: the rounds' students would be "
                                "saved among its files; choose a run directory outside the student")
    tok_dir = _tokenizer_dir(cfg)
    check_same_tokenizer(load_tokenizer(str(tok_dir), role="student"), load_tokenizer(cfg.teacher), cfg.student,
                         cfg.teacher)


def is_run_dir(out: Path) -> bool:
    """``out`` is a distill run of ours: it holds our ``run.json`` (or, killed before writing it, only our lock)."""
    f = out / RUN_FILE
    if f.is_file():
        try:
            return json.loads(f.read_text(encoding="utf-8")).get("format") == RUN_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return [p.name for p in out.iterdir()] == [LOCK_NAME] and read_lock(out) is not None


def check_run_dir(out: Path, *, resume: bool) -> None:
    """RUN is new or empty, or (with ``resume``) a distill run of ours; never a file or a user's directory. Its own
    round directories (``round-NNN/cache``, ``round-NNN/student``) are then ours: the builds and training runs
    inside it resume, or start over, in them."""
    refuse_file(out, "a distill run")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_run_dir(out):
        raise CacheExistsError(f"-o {out} exists, is not empty and holds no distill run of logitstore's (it holds "
                               f"{describe_entries([p.name for p in out.iterdir()])}); choose a new or empty "
                               "directory: a run never writes over files it did not write")
    if not resume:
        raise CacheExistsError(f"-o {out} holds a distill run; pass --resume to continue it, or choose a new -o")


def _tokenizer_dir(cfg: DistillConfig) -> Path:
    """Where the first student's tokenizer is: its directory, or for a config.json --tokenizer, the config's
    directory, or the teacher's."""
    s = Path(cfg.student)
    if s.is_dir():
        return s
    for d in (Path(cfg.train.tokenizer) if cfg.train.tokenizer else None, s.parent, Path(cfg.teacher)):
        if d is not None and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
            return d
    raise InvalidInputError(f"--student {cfg.student}: a config.json student needs a tokenizer: --tokenizer DIR, "
                            "tokenizer files beside it, or a teacher directory with them")


#: the sections of run.json that hold a config dataclass: their settings added since a run started take defaults
SECTIONS = {"build": BuildConfig, "train": TrainConfig, "policy": PolicyConfig}


def _start(out: Path, cfg: DistillConfig, resume: bool) -> None:
    """Write ``run.json``, or on resume check that it holds the same settings."""
    want = cfg.settings()
    f = out / RUN_FILE
    if resume and f.is_file():
        have = fill_defaults(placed(json.loads(f.read_text(encoding="utf-8"))), want,
                             {name: declared_defaults(cls) for name, cls in SECTIONS.items()})
        changed = sorted(k for k in set(have) | set(want) if k not in RESUMABLE and have.get(k) != want.get(k))
        if changed:
            raise InvalidInputError(f"--resume: the run in {out} was started with other settings ({', '.join(changed)} "
                                    f"differ; see {f}); resume with the same ones, or choose a new -o")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(f, json.dumps(want, indent=1).encode())


def _initial_student(out: Path, cfg: DistillConfig) -> Path:
    """STUDENT when it is a model directory; else ``round-000/student``, initialised from the config (seeded)."""
    s = Path(cfg.student)
    if s.is_dir():
        return s.resolve()
    dst = round_dir(out, 0) / "student"
    if (dst / SUMMARY).is_file():
        return dst
    from trainers.student import load_student, save_tokenizer

    student = load_student(str(s), tokenizer=str(_tokenizer_dir(cfg)), seed=cfg.seed)
    tmp = dst.with_name("student.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(student, tmp)
    (tmp / SUMMARY).write_text(json.dumps({"initialised_from": str(s.resolve()), "seed": cfg.seed}))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def _build_round(cfg: DistillConfig, r: int, policy: Path, cache: Path, progress: bool) -> None:
    """Round ``r``'s cache: the policy's samples scored by the teacher (resumed where a build was cut short)."""
    if (cache / "manifest.json").is_file() and logitstore.open(cache).manifest.complete:
        return
    pol = dataclasses.replace(cfg.policy, path=str(policy), round=r)
    bcfg = dataclasses.replace(cfg.build, policy=pol, seed=round_seed(cfg.seed, r))
    build(cfg.teacher, cfg.prompts, cache, bcfg, resume=True, progress=progress, argv=None)


def _finished(student: Path) -> dict | None:
    try:
        return json.loads((student / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _train_round(cfg: DistillConfig, policy: Path, cache: Path, student: Path) -> dict:
    """Round ``r``'s student: trained on its cache from the policy's weights (resumed from its last checkpoint)."""
    done = _finished(student)
    if done is not None:
        return done
    resume = bool(list_checkpoints(student))
    if not resume and student.exists():
        shutil.rmtree(student)  # ours (a round directory): a first attempt killed before its first checkpoint
    # the training run owns (train_config.json, run.lock) and checks (the policy's content hash on resume) its OUT
    return train(cfg.train.replace(cache=str(cache), student=str(policy), output=str(student), resume=resume,
                                   force=False))


def round_record(r: int, out: Path, policy: Path, summary: dict) -> dict[str, Any]:
    """The ``rounds.json`` entry of round ``r`` (from its cache and its student's summary)."""
    rd = round_dir(out, r)
    c = logitstore.open(rd / "cache")
    m = c.manifest
    n, pass_rate, nll, targets = c.sql("SELECT count(*), avg(correct::INT), sum(teacher_nll * n_targets) / "
                                       "sum(n_targets), sum(n_targets) FROM sequences").fetchall()[0]
    rkl, pnll = c.sql("SELECT avg(policy_logprob - label_logprob), -avg(policy_logprob) FROM tokens "
                      "WHERE loss_mask").fetchall()[0]
    gen = m.build.get("generation") or {}
    unbiased = gen.get("temperature") == 1.0 and gen.get("top_p") == 1.0  # samples from the policy itself
    last = summary.get("last") or {}
    return {"round": r, "policy": str(policy), "policy_revision": (m.build.get("policy") or {}).get("revision"),
            "cache": str((rd / "cache").relative_to(out)), "student": str((rd / "student").relative_to(out)),
            "sequences": n, "positions": m.positions, "targets": targets, "pass_rate": pass_rate,
            "teacher_nll": nll, "policy_nll": pnll, "reverse_kl_estimate": rkl if unbiased else None,
            "build_s": m.build.get("elapsed_s"), "timings_s": m.build.get("timings_s"),
            "train_steps": summary.get("steps"), "train_s": summary.get("seconds"), "train_loss": last.get("loss"),
            "eval_ce": summary.get("eval_ce"), "eval_kl": summary.get("eval_kl")}


def _save_rounds(out: Path, records: dict[int, dict]) -> None:
    atomic_write_bytes(out / ROUNDS_FILE, json.dumps({"rounds": [records[r] for r in sorted(records)]},
                                                     indent=1).encode())


def load_rounds(out: str | Path) -> list[dict]:
    """The round records of a run (``rounds.json``), in round order."""
    f = Path(out) / ROUNDS_FILE
    return json.loads(f.read_text(encoding="utf-8"))["rounds"] if f.is_file() else []


def run(cfg: DistillConfig, *, resume: bool = False, progress: bool = True,
        say: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """Run (or continue) the rounds of ``cfg``; returns the round records. ``say`` receives one line per step."""
    check(cfg, resume=resume)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with BuildLock(out, holder="distill run"):
        _start(out, cfg, resume)
        records = {rec["round"]: rec for rec in load_rounds(out)}
        policy = _initial_student(out, cfg)
        for r in range(1, cfg.rounds + 1):
            rd = round_dir(out, r)
            say(f"round {r}/{cfg.rounds}: the student samples {cfg.build.generation.n} responses per prompt, the "
                f"teacher scores them into {rd / 'cache'}")
            _build_round(cfg, r, policy, rd / "cache", progress)
            save_union(out, Union(labels=["round"], members=[Member(cache=str(round_dir(out, i) / "cache"),
                                                                    labels={"round": i}) for i in range(1, r + 1)]))
            say(f"round {r}/{cfg.rounds}: training {cfg.train.max_steps} steps ({cfg.train.loss}) into "
                f"{rd / 'student'}")
            summary = _train_round(cfg, policy, rd / "cache", rd / "student")
            if r not in records:
                records[r] = round_record(r, out, policy, summary)
                _save_rounds(out, records)
            rec = records[r]
            say(f"round {r}/{cfg.rounds}: {rec['positions']:,} positions, pass rate "
                f"{_fmt(rec['pass_rate'])}, teacher NLL of the student's samples {_fmt(rec['teacher_nll'])}, "
                f"train loss {_fmt(rec['train_loss'])}, held-out CE {_fmt(rec['eval_ce'])}")
            policy = rd / "student"
    return [records[r] for r in sorted(records) if r <= cfg.rounds]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
