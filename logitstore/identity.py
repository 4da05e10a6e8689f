"""What a model and a tokenizer *are*: content hashes a cache, a run and a resume are keyed by.

- Tokenizers: ``tokenizer_fingerprint`` hashes the token -> id table and the special tokens,
  so two tokenizers with the same fingerprint map text to the same ids. Caches record it
  (``tokenizer_record``); ``check_tokenizer`` refuses a model whose tokenizer would read the
  cached ids as other tokens.
- Models: ``model_revision`` identifies a local model by the *content* of its files
  (config, weights, tokenizer), never by names and sizes alone, so replacing a checkpoint at
  the same path with another of the same size changes its revision and a resume refuses to
  mix the two. A model loaded from the hub is identified by its commit. Hashing a 100 GB
  teacher takes about a minute, so each file's sha256 is kept in a small JSON cache under
  ``$LOGITSTORE_HOME`` (default ``~/.cache/logitstore``), keyed by the file's path, device,
  inode, size, mtime and ctime: any write to a file (even one that restores its mtime)
  changes its ctime, and it is hashed again.

This module needs no torch: it works on tokenizer objects (duck-typed) and on files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from logitstore.errors import InvalidInputError, TokenizerMismatchError
from logitstore.jsonfile import read_json

logger = logging.getLogger(__name__)

#: files of a model directory that make up the model: config, weights, tokenizer, chat template
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".gguf", ".model", ".txt", ".jinja", ".tiktoken")
#: files in a model directory that do not change what the model computes
IGNORED_FILES = ("README.md", "trainer_state.pt", "metrics.jsonl", "summary.json", "train_config.json", "run.lock")
HASH_CACHE_NAME = "file-hashes.json"
#: a model directory may name itself in this file: {"id": "org/name ..."} (the embedded teacher does)
MODEL_ID_FILE = "logitstore_model.json"
_MAX_CACHED = 100_000


# ---------------------------------------------------------------- tokenizers


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (first 16 hex chars) of the token -> id table and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((str(k), str(v)) for k, v in (tokenizer.special_tokens_map or {}).items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """What a manifest records about a tokenizer; a local directory's name as its absolute path, so the cache finds
    it (``train --cross-tokenizer``) from any working directory."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if os.path.isdir(name):
        name = os.path.realpath(name)
    return {
        "name": name,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
    }


def check_tokenizer(tokenizer: Any, who: str, cache, *, error: type[Exception] = TokenizerMismatchError) -> None:
    """Refuse ``tokenizer`` (of ``who``, e.g. "student DIR") when ``cache``'s manifest records another
    fingerprint: the cached token ids would mean other tokens to it. A cache that records none is not
    judged here (callers decide whether that is acceptable)."""
    rec = cache.manifest.tokenizer or {}
    want, got = rec.get("fingerprint"), tokenizer_fingerprint(tokenizer)
    if want and got != want:
        raise error(f"{who} has tokenizer fingerprint {got} ({getattr(tokenizer, 'name_or_path', '?')}), the cache "
                    f"{cache.path} has {want} ({rec.get('name', '?')}): cached token ids would mean other tokens "
                    "to it; use a model with the teacher's tokenizer")


# ---------------------------------------------------------------- models


def home_dir() -> Path:
    """Where logitstore keeps what it computes once per machine: ``$LOGITSTORE_HOME``, else
    ``$XDG_CACHE_HOME/logitstore``, else ``~/.cache/logitstore`` (the embedded teacher, file hashes)."""
    return Path(os.environ.get("LOGITSTORE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "logitstore"))


def hash_cache_path() -> Path:
    return home_dir() / HASH_CACHE_NAME


def model_files(path: Path) -> list[Path]:
    """The files whose content identifies the model at ``path`` (a directory, or one file such as a .gguf)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                  and p.name not in IGNORED_FILES and not p.name.startswith("."))


def model_revision(path: str | os.PathLike, *, commit: str | None = None) -> dict[str, Any]:
    """``{"revision", "hashed"}``: the hub ``commit`` when the model came from the hub, else ``"sha256-"``
    and 16 hex chars of the sha256 over the sorted (file name, file sha256) pairs of ``model_files``;
    ``hashed`` says what was hashed (for the manifest)."""
    if commit:
        return {"revision": commit, "hashed": "hub commit"}
    p = Path(path)
    files = model_files(p)
    digests = file_sha256s(files)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode("utf-8") + b"\0" + digests[f].encode() + b"\n")
    return {"revision": "sha256-" + h.hexdigest()[:16],
            "hashed": "sha256 of the contents of " + (", ".join(f.name for f in files) or "no files")}


def file_sha256s(files: list[Path]) -> dict[Path, str]:
    """sha256 of each file's bytes, from the hash cache where the file is unchanged since it was hashed."""
    cache_file = hash_cache_path()
    cache = _load_cache(cache_file)
    out, changed = {}, False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        digest = cache.get(key)
        if digest is None:
            if st.st_size > 1 << 30:
                logger.info("hashing %s (%.1f GB) once to identify the model", f, st.st_size / 1e9)
            digest = _sha256(f)
            cache[key] = digest
            changed = True
        out[f] = digest
    if changed:
        _save_cache(cache_file, cache)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _load_cache(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        d = read_json(path, InvalidInputError)
    except InvalidInputError as exc:  # unreadable or damaged: hash again (it is only a cache)
        logger.debug("ignoring the hash cache: %s", exc)
        return {}
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(d, dict) else {}


def _save_cache(path: Path, cache: dict[str, str]) -> None:
    """Best effort: a read-only home directory only costs hashing again next time."""
    if len(cache) > _MAX_CACHED:
        cache = dict(list(cache.items())[-_MAX_CACHED:])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("cannot write the hash cache %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


def model_identity(teacher: str, model, dtype: str) -> dict[str, Any]:
    """The manifest's record of a model loaded from ``teacher`` (a path or a hub id): its id (a model directory
    may name itself in ``logitstore_model.json`` ``{"id": ...}``, as the embedded teacher does; then ``path``
    says where it was loaded from), its revision (a hub commit, else ``model_revision``'s content hash) and
    what was hashed, the dtype and the architecture."""
    path = Path(teacher)
    local = path.exists()
    ident: dict[str, Any] = {"id": teacher if not local else str(path.resolve())}
    named = (path if path.is_dir() else path.parent) / MODEL_ID_FILE
    if local and named.is_file():
        record = None
        try:
            record = read_json(named, InvalidInputError)
        except InvalidInputError as exc:
            logger.warning("%s; using the path as the id", exc)
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            ident["id"], ident["path"] = record["id"], str(path.resolve())
        elif record is not None:
            logger.warning('%s: not a model id record {"id": ...}; using the path as the id', named)
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) if not local else None
    ident.update(model_revision(path, commit=commit) if local or commit else {"revision": "unknown", "hashed": ""})
    return {**ident, "dtype": dtype, "architecture": type(model).__name__}
