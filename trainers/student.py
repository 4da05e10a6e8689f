"""The student: loading it, checking it against the cache, and running its body.

A student is a local transformers model directory, or a ``config.json`` from which a
fresh model is initialised (seeded). Before any training the student is checked
against the cache it will learn from:

- tokenizer: the student's tokenizer (``--tokenizer`` when given, else its own
  directory's; for a fresh ``config.json`` student without one, the cache's tokenizer
  where that is a local directory) must have the fingerprint the cache's manifest
  records, otherwise cached token ids would mean other tokens; a model directory with no
  tokenizer files and no ``--tokenizer`` is refused;
- vocabulary: every token id in the cache (inputs and teacher entries) must fit the
  student's embedding and LM head. A student whose matrices are padded differently
  from the teacher's (Qwen2.5's 151,936 rows against 152,064) is accepted when the ids
  the cache actually holds fit: if the student is smaller than the cache's
  ``vocab_size``, the cache is scanned once for its largest id.

The body (``model.base_model``) produces hidden states; the LM head is applied by the
losses in chunks of positions (``trainers.view.student_view``), so no ``[B, T, V]``
logits tensor is ever built.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitstore import format as F
from logitstore.errors import InvalidInputError, TokenizerMismatchError
from logitstore.head import Head
from logitstore.identity import check_tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


class StudentMismatchError(TokenizerMismatchError):
    """The student's tokenizer or vocabulary does not match the cache's."""


@dataclasses.dataclass
class Student:
    model: Any  # a transformers PreTrainedModel
    head: Head
    tokenizer: Any | None
    tokenizer_dir: Path | None  # where its files are, to copy next to the checkpoint
    source: str
    fresh: bool  # initialised from a config

    @property
    def vocab_size(self) -> int:
        return min(self.head.vocab_size, int(self.model.get_input_embeddings().num_embeddings))

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` of a collated batch (packed rows get a block-diagonal mask)."""
        dtype = next(self.model.parameters()).dtype
        return self.model.base_model(**forward_inputs(batch, dtype)).last_hidden_state


def forward_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments of a transformers model's forward for a collated batch: ``input_ids``, the attention
    mask (``[B, 1, T, T]`` block-diagonal of ``dtype`` for packed rows, else the ``[B, T]`` padding mask),
    ``position_ids`` (restarting per packed sequence) and ``use_cache=False``."""
    if bool((batch["segment_ids"].amax(dim=1) > 1).any()):  # packed: attention stays inside each sequence
        mask = packed_mask(batch["segment_ids"], dtype)
    else:
        mask = batch["attention_mask"]
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"],
            "use_cache": False}


def packed_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, 1, T, T]`` mask: token i sees token j <= i of its own sequence (``segments [B, T]``,
    0 = padding). Padding rows see themselves, so no row is empty (an empty row gives NaN)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    allowed = (same & causal & (segments[:, None, :] > 0)) | torch.eye(T, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def load_student(spec: str, *, manifest=None, tokenizer: str = "", seed: int = 0,
                 cache_tokenizer: bool = True) -> Student:
    """The student named by ``spec`` (see the module docstring), in float32 on the CPU; ``manifest``: the cache's,
    whose tokenizer a fresh student without one falls back to (None: no cache yet). ``cache_tokenizer=False``
    (a cross-tokenizer student): a fresh student never borrows the cache's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if not path.exists():
        raise InvalidInputError(f"--student {spec}: no such file or directory; give a local model directory or a "
                                "config.json")
    fresh = path.is_file()
    if fresh and path.suffix != ".json":
        raise InvalidInputError(f"--student {spec}: a file student must be a config.json")
    if not fresh and not (path / "config.json").is_file():
        raise InvalidInputError(f"--student {spec}: a directory without config.json is not a model directory")
    try:
        if fresh:
            config = AutoConfig.from_pretrained(str(path))
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"--student {spec}: cannot load ({' '.join(str(exc).split())})") from exc
    head = Head.of(model)
    if head is None:
        raise InvalidInputError(f"--student {spec}: {type(model).__name__} exposes no separate LM head")
    candidates = [Path(tokenizer)] if tokenizer else []
    candidates.append(path.parent if fresh else path)
    cache_tok = ((manifest.tokenizer if manifest is not None else None) or {}).get("name", "")
    if fresh and cache_tokenizer and cache_tok and Path(cache_tok).is_dir():  # a fresh student has none of its own
        candidates.append(Path(cache_tok))
    tok, tok_dir = None, None
    for d in candidates:
        if d.is_dir() and _has_tokenizer(d):
            try:
                tok, tok_dir = AutoTokenizer.from_pretrained(str(d)), d
            except (OSError, ValueError) as exc:
                raise InvalidInputError(f"tokenizer {d}: cannot load ({' '.join(str(exc).split())})") from exc
            break
        if tokenizer and d == Path(tokenizer):
            raise InvalidInputError(f"--tokenizer {tokenizer}: not a directory with tokenizer files")
    return Student(model=model, head=head, tokenizer=tok, tokenizer_dir=tok_dir, source=spec, fresh=fresh)


def check_student(student: Student, cache) -> None:
    """Refuse a student whose tokenizer or vocabulary does not fit ``cache`` (see the module docstring)."""
    m = cache.manifest
    if student.tokenizer is None:
        if not student.fresh:
            raise StudentMismatchError(f"student {student.source} has no tokenizer files, so it cannot be checked "
                                       "against the cache's tokenizer; pass --tokenizer DIR")
        logger.warning("student %s: no tokenizer found; trusting that it uses the cache's tokenizer (%s)",
                       student.source, (m.tokenizer or {}).get("name", "?"))
    else:
        check_tokenizer(student.tokenizer, f"student {student.source}", cache, error=StudentMismatchError)
    v = student.vocab_size
    if v >= m.vocab_size:
        return
    top = max_token_id(cache)
    if top >= v:
        raise StudentMismatchError(
            f"student {student.source} has {v} embedding/head rows, the cache {cache.path} has vocab_size "
            f"{m.vocab_size} and holds token id {top}, which does not fit the student")
    logger.info("student vocab %d < cache vocab %d, but every cached id (max %d) fits", v, m.vocab_size, top)


def max_token_id(cache) -> int:
    """The largest token id anywhere in the cache's inputs and entries (one pass over those columns)."""
    import pyarrow.compute as pc

    id_col = F.id_column(cache.codec.ids)
    top = -1
    for s in range(cache.num_shards):
        for rg in range(len(cache.row_group_rows(s))):
            t = cache.read(s, rg, ["input_ids", id_col])
            if not len(t):
                continue
            m_in = pc.max(pc.list_flatten(t.column("input_ids"))).as_py()
            entries = pc.list_flatten(pc.list_flatten(t.column(id_col)))
            if not len(entries):
                m_ent = None
            elif cache.id_map is None:
                m_ent = pc.max(entries).as_py()
            else:  # entries are codes: map the distinct ones to token ids
                m_ent = int(np.take(cache.id_map, np.unique(entries.to_numpy())).max())
            top = max(top, m_in if m_in is not None else -1, m_ent if m_ent is not None else -1)
    return top


def save_tokenizer(student: Student, out: Path) -> None:
    """Copy the student's tokenizer files next to its checkpoint, so ``out`` is a complete model directory."""
    if student.tokenizer_dir is None:
        return
    for name in TOKENIZER_FILES:
        src = student.tokenizer_dir / name
        if src.is_file():
            shutil.copy2(src, out / name)
