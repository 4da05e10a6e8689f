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
from pathlib import Path
from typing import Any

import torch

from logitstore.errors import CorruptCacheError, InvalidInputError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def remove_partial(out: Path) -> None:
    """Delete checkpoint directories a crash left half-written (``step-N.tmp``)."""
    d = checkpoint_dir(out)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out: Path, step: int, model, state: dict[str, Any], *, keep: int) -> Path:
    final = checkpoint_dir(out) / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


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
