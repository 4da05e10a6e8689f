"""A training run's output directory: what is ours in it, one run at a time, and which student it started from.

- ``OUT`` is ours when it holds ``train_config.json`` (a JSON object of ``TrainConfig`` options, written at
  the start of every run) or our ``run.lock``. A run refuses a non-empty ``OUT`` that is not ours (it would
  write over a user's files), and one that holds an earlier run of ours (checkpoints, metrics or a summary)
  unless ``--resume`` continues it or ``--force`` starts it over. ``--force`` deletes only the files a run
  writes (``OWN_FILES``, ``checkpoints/step-N``, ``data-rank<R>.jsonl``); anything else stays.
- ``OUT`` may not be ``STUDENT``, lie inside it or hold it: saving the trained model there would replace the
  student's weights (``--student S -o S``), and ``--force`` or checkpoint pruning would delete them.
- A run holds ``OUT/run.lock`` (``logitstore.lock.BuildLock``, holder "training run") from start to end, so
  a second training into the same ``OUT`` is refused with the holder named, and a killed run's lock is taken
  over. Under DDP rank 0 holds it (``trainers.loop`` shares its verdict with the other ranks).
- The student's identity (``student_identity``): a model directory by the content hash of its files, a
  ``config.json`` by that of its bytes (``logitstore.identity.model_revision``, cached by file identity). It is
  written into ``train_config.json`` and every checkpoint; ``--resume`` refuses a student whose content changed,
  which would continue one run with another model's architecture or tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.identity import model_revision
from logitstore.lock import BuildLock
from logitstore.ownership import describe_entries, refuse_file, rmdir_if_empty
from trainers import checkpoint as ckpt
from trainers.config import RESUMABLE_CHANGES, TrainConfig, placed
from trainers.evaluation import METRICS_FILE
from trainers.student import TOKENIZER_FILES

logger = logging.getLogger(__name__)

RUN_LOCK = "run.lock"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "summary.json"
#: the files a run writes at the top of OUT (besides checkpoints/ and the per-rank traces)
OWN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", *TOKENIZER_FILES)
_OWN_PATTERNS = (re.compile(r"^data-rank\d+\.jsonl$"), re.compile(r"^model-\d+-of-\d+\.safetensors$"))


def student_identity(student: str) -> dict[str, Any]:
    """What the student is: ``{"path", "revision", "hashed"}`` (the content hash of a model directory's files, or of
    a ``config.json``'s bytes)."""
    p = Path(student)
    return {"path": str(p.resolve()), **model_revision(p)}


def _is_own_file(p: Path) -> bool:
    return p.is_file() and (p.name in OWN_FILES or any(r.match(p.name) for r in _OWN_PATTERNS))


class RunDir:
    """``OUT`` of one run (``cfg.output``): ``claim`` (rank 0) checks and locks it, ``clear`` (``--force``) removes an
    earlier run's files, ``write_config`` records the run, ``release`` unlocks (and removes an ``OUT`` this run
    created and wrote nothing into)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.output)
        self.lock: BuildLock | None = None
        self.created = False

    def is_ours(self) -> bool:
        return (self.out / CONFIG_FILE).is_file() or (self.out / RUN_LOCK).is_file()

    def earlier_run(self) -> bool:
        """``OUT`` holds what a run leaves: checkpoints, metrics or a summary."""
        return bool(ckpt.list_checkpoints(self.out)) or any((self.out / n).is_file() for n in (METRICS_FILE,
                                                                                               SUMMARY_FILE))

    def claim(self) -> None:
        """Refuse an ``OUT`` that is a file, the student's directory (or in it, or around it), a user's directory,
        or an earlier run without ``--resume``/``--force``; then take the run lock."""
        cfg, out = self.cfg, self.out
        refuse_file(out, "a training run's output")
        _refuse_student_overlap(Path(cfg.student), out)
        if out.is_dir() and any(out.iterdir()) and not self.is_ours():
            raise CacheExistsError(
                f"-o {out} exists, is not empty and holds no training run of logitstore's (it holds "
                f"{describe_entries([p.name for p in out.iterdir()])}); choose a new or empty directory: a run "
                "never writes over files it did not write")
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.lock = BuildLock(out, name=RUN_LOCK, holder="training run")
        try:
            self.lock.acquire()
            if cfg.resume:
                ckpt.latest(out)  # refuses an OUT without a complete checkpoint
            elif self.earlier_run() and not cfg.force:
                raise InvalidInputError(f"-o {out} holds a previous training run; pass --resume to continue it, "
                                        "--force to replace it, or choose another output directory")
        except BaseException:
            self.release()
            raise

    def resume_state(self) -> dict | None:
        """On ``--resume``: the newest checkpoint's state, after refusing a changed config or student."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        _, path = ckpt.latest(self.out)
        state = ckpt.load_state(path)
        saved = {**TrainConfig().to_dict(), **state["config"]}  # options added since then: at their defaults
        if "estimator" not in state["config"] and cfg.estimator == "auto":
            # a run from before --estimator weighed draws by their counts: it goes on as it started
            saved["estimator"] = cfg.estimator = "counts"
        saved, now = placed(saved), placed(cfg.to_dict())  # where paths point, from any working directory
        changed = sorted(k for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise InvalidInputError(f"--resume: the run in {self.out} was started with other settings ({diffs}); "
                                    "resume with the same ones, or train into another -o")
        was, now = state.get("student_identity"), student_identity(cfg.student)
        if was is None:
            logger.warning("%s records no student identity (an older run); resuming without checking it", path)
        elif was.get("revision") != now["revision"]:
            raise InvalidInputError(
                f"--resume: the student {cfg.student} is not the one the run in {self.out} started from (its revision "
                f"was {was.get('revision')}, it is now {now['revision']}: {now['hashed']}); its files changed, and "
                "resuming would continue the run with another model; restore the student, or train into another -o")
        state["path"] = str(path)
        return state

    def clear(self) -> None:
        """``--force``: delete an earlier run's files of ours (checkpoints, metrics, summary, model, traces)."""
        for _, p in ckpt.list_checkpoints(self.out):
            shutil.rmtree(p)
        ckpt.remove_partial(self.out)
        rmdir_if_empty(ckpt.checkpoint_dir(self.out))
        for p in self.out.iterdir():
            if _is_own_file(p):
                p.unlink()
        logger.warning("--force: removed the earlier run's files from %s", self.out)

    def write_config(self, identity: dict[str, Any]) -> None:
        """``train_config.json``: every option, and the student's identity."""
        d = {**self.cfg.to_dict(), "student_identity": identity}
        (self.out / CONFIG_FILE).write_text(json.dumps(d, indent=1), encoding="utf-8")

    def release(self) -> None:
        """Give the lock back; an ``OUT`` this run created and left empty goes too."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created:
            rmdir_if_empty(self.out)


def _refuse_student_overlap(student: Path, out: Path) -> None:
    s, o = student.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise InvalidInputError(f"-o {out} is the student {student} or inside it: saving the trained model there "
                                "would replace the student's own files; choose an output outside the student")
    if o in s.parents:
        raise InvalidInputError(f"the student {student} lies inside -o {out}: the run's checkpoints, pruning and "
                                "--force would delete it; train from a copy outside OUT, or into another -o")
