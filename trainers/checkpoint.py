"""Checkpoints of a training run: what exact resume needs, written atomically, read without unpickling code.

``OUT/checkpoints/step-NNNNNNN/`` holds the model (``save_pretrained``: config and
safetensors) and ``trainer_state.pt``: optimiser, schedule, loader position, loss
state (TAID's t), random generator states, the step and the config. It is written
into a ``.tmp`` directory and renamed, so a crash leaves the previous checkpoint intact;
only the newest ``keep`` are kept. ``trainer_state.pt`` holds tensors, numbers, strings
and containers only and is read with ``torch.load(weights_only=True)``, which refuses
anything that would execute code. The final model goes to ``OUT`` itself, loadable with
``AutoModelForCausalLM.from_pretrained(OUT)``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from logitstore.errors import CorruptCacheError, InvalidInputError, LogitstoreError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-\d+\.tmp$")
_FINAL_TMP = ".final.tmp"


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out``, oldest first (a ``.tmp`` one from a crash is not listed)."""
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


class CheckpointWriteError(LogitstoreError, OSError):
    """Writing a checkpoint or the final model failed (disk full, I/O error); nothing half-written is left."""


#: what writing a model or a trainer state raises when the disk is full or failing (safetensors and torch.save wrap
#: the OS error in their own types)
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def remove_partial(out: Path) -> None:
    """Delete checkpoint directories a crash left half-written (``step-N.tmp``, of ours by their name)."""
    d = checkpoint_dir(out)
    if d.is_dir():
        for p in d.iterdir():
            if _TMP_DIR.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _fsync_files(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _write_failed(what: Path, exc: BaseException, step: int | None, out: Path) -> CheckpointWriteError:
    reason = " ".join(str(exc).split())[:300]
    have = list_checkpoints(out)
    keep = f"the last complete checkpoint ({have[-1][1].name}) is intact" if have else "no checkpoint was written"
    at = f" at step {step}" if step is not None else ""
    return CheckpointWriteError(f"{what}: writing failed{at} ({type(exc).__name__}: {reason}); {keep}, nothing "
                                "half-written is left: free disk space and rerun with --resume")


def save_checkpoint(out: Path, step: int, model, state: dict[str, Any], *, keep: int) -> Path:
    """Write ``step-NNNNNNN`` (model and trainer state) through ``step-NNNNNNN.tmp`` and a rename, then prune to the
    newest ``keep``. A failed write (a full disk) removes the temporary directory and raises
    ``CheckpointWriteError``; the previous checkpoints stay as they were."""
    final = checkpoint_dir(out) / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(state, tmp / STATE_FILE)
        _fsync_files(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except _WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, exc, step, out) from exc
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


def save_final(out: Path, model, write_extra: Callable[[Path], None]) -> None:
    """The final model into ``out`` itself (``save_pretrained`` files, then ``write_extra(dir)``: the tokenizer):
    written into ``out/.final.tmp`` first and moved into place, so a failure leaves no half-written model file."""
    tmp = out / _FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        write_extra(tmp)
        _fsync_files(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        tmp.rmdir()
    except _WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(out / "model.safetensors", exc, None, out) from exc


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CorruptCacheError(f"{path / STATE_FILE}: cannot read the trainer state ({exc})") from exc


def latest(out: Path) -> tuple[int, Path]:
    found = list_checkpoints(out)
    if not found:
        raise InvalidInputError(f"--resume: {checkpoint_dir(out)} holds no complete checkpoint to resume from")
    return found[-1]


def rng_state() -> dict[str, Any]:
    """The torch generators' states (dropout and any sampling draw from them; the data order has its own seed)."""
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
