"""The transformers backend: any causal LM that transformers loads, on CPU or CUDA.

A teacher is a local model directory, a hub id (loaded where a hub is reachable, a
clear error where not) or a ``.gguf`` file (transformers' GGUF loader). Per batch the
model *body* runs once over right-padded sequences; only the hidden states of the
requested positions go through the LM head, in chunks (``builders.extract``), so
memory never holds a ``[B, T, V]`` tensor. Right padding with an attention mask keeps
every real token's hidden state identical to scoring the sequence alone (causal
attention never looks right).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builders.extract import chunk_rows_for, extract, split
from logitstore.errors import InvalidInputError, LogitstoreError
from logitstore.head import Head
from logitstore.identity import model_identity, tokenizer_record
from logitstore.records import Scored
from logitstore.rules import Rule

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TeacherLoadError(LogitstoreError, OSError):
    """The teacher (or another model loaded the same way: a policy) could not be loaded (missing path, no hub
    access, unsupported architecture). Messages name the model by its ``role``."""


def _source(teacher: str, trust_remote_code: bool, role: str = "teacher") -> tuple[str, dict[str, Any]]:
    """(what ``from_pretrained`` is given, its keyword arguments) for a model directory, hub id or .gguf file."""
    path = Path(teacher)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherLoadError(f"{role} {teacher}: no such .gguf file")
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise TeacherLoadError(f"{role} {teacher}: a directory without config.json is not a model directory")
        return str(path), kwargs
    if teacher.count("/") == 1 and not teacher.startswith((".", "/")):
        return teacher, kwargs  # a hub id
    raise TeacherLoadError(f"{role} {teacher}: not a model directory, a .gguf file or a hub id (org/name)")


def _load_error(teacher: str, src: str, exc: BaseException, role: str = "teacher") -> TeacherLoadError:
    hint = ("; without hub access, download the model where a hub is reachable and pass its directory"
            if src == teacher and not Path(teacher).exists() else "")
    reason = " ".join(str(exc).split())  # transformers' messages span lines; ours is one line
    return TeacherLoadError(f"{role} {teacher}: cannot load ({reason}){hint}")


def load_tokenizer(teacher: str, *, trust_remote_code: bool = False, role: str = "teacher"):
    """The teacher's tokenizer alone (what a coordinator that only tokenises needs)."""
    from transformers import AutoTokenizer

    src, kwargs = _source(teacher, trust_remote_code, role)
    try:
        return AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise _load_error(teacher, src, exc, role) from exc


#: config attributes that give a model's context length, by architecture family
MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions_of(config: Any) -> int | None:
    """The longest sequence a model with this (transformers) config takes, in tokens; None when it names none."""
    for cfg in (config, getattr(config, "text_config", None)):
        for key in MAX_POSITION_KEYS:
            v = getattr(cfg, key, None) if cfg is not None else None
            if type(v) is int and v > 0:
                return v
    return None


def teacher_max_positions(teacher: str, *, trust_remote_code: bool = False) -> int | None:
    """``max_positions_of`` the teacher's config, read without loading its weights (a coordinator that only
    tokenises)."""
    from transformers import AutoConfig

    src, kwargs = _source(teacher, trust_remote_code)
    try:
        return max_positions_of(AutoConfig.from_pretrained(src, **kwargs))
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise _load_error(teacher, src, exc) from exc


def load_teacher(teacher: str, *, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False,
                 role: str = "teacher"):
    """(model, tokenizer, identity dict) for a model directory, a hub id or a .gguf file."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise InvalidInputError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    src, kwargs = _source(teacher, trust_remote_code, role)
    tok = load_tokenizer(teacher, trust_remote_code=trust_remote_code, role=role)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:  # missing files, no tokenizer, gguf missing, ...
        raise _load_error(teacher, src, exc, role) from exc
    model = model.to(device).eval()
    return model, tok, model_identity(teacher, model, dtype)


class TransformersBackend:
    """See the module docstring. ``extract_mb`` bounds the memory of the head/softmax chunks; ``role`` names the
    model in messages ("teacher", or "policy" for the model of ``--responses-from``)."""

    exactness: dict[str, str] = {}

    def __init__(self, teacher: str, *, dtype: str = "fp32", device: str = "cpu", extract_mb: int = 96,
                 trust_remote_code: bool = False, role: str = "teacher"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInputError(f"--device {device}: CUDA is not available on this machine")
        model, tokenizer, identity = load_teacher(teacher, dtype=dtype, device=device,
                                                  trust_remote_code=trust_remote_code, role=role)
        self._setup(teacher, model, tokenizer, identity, device=device, dtype=dtype, extract_mb=extract_mb, role=role)

    @classmethod
    def from_model(cls, model, tokenizer, identity: dict[str, Any], *, name: str, device: str = "cpu",
                   dtype: str = "fp32", extract_mb: int = 96, role: str = "teacher") -> TransformersBackend:
        """A backend around a model already in memory (benchmarks of random-weight models of real shapes; a
        caller that loaded the model itself), with the same checks as a loaded teacher. ``tokenizer`` may be None
        for a model that only scores token ids (the tokenizer-size check is then skipped); ``name`` names it in
        errors; ``identity`` is its manifest record."""
        backend = cls.__new__(cls)
        backend._setup(name, model.to(device).eval(), tokenizer, dict(identity), device=device, dtype=dtype,
                       extract_mb=extract_mb, role=role)
        return backend

    def _setup(self, teacher: str, model, tokenizer, identity: dict[str, Any], *, device: str, dtype: str,
               extract_mb: int, role: str = "teacher") -> None:
        self.role = role
        self.model, self.tokenizer, self.identity = model, tokenizer, identity
        self.device = torch.device(device)
        self.body = self.model.base_model
        head = Head.of(self.model)
        if head is None:
            raise TeacherLoadError(f"{role} {teacher}: {type(self.model).__name__} exposes no separate LM head")
        self.head = head
        self.vocab_size = self.head.vocab_size
        self.max_positions = max_positions_of(self.model.config)
        rows = min(self.vocab_size, int(self.model.get_input_embeddings().num_embeddings))
        if self.tokenizer is not None and len(self.tokenizer) > rows:  # from_model may have no tokenizer
            raise TeacherLoadError(
                f"{role} {teacher}: its tokenizer has {len(self.tokenizer)} tokens, its embedding and LM head only "
                f"{rows} rows, so token ids >= {rows} cannot be scored; give the model with the tokenizer it was "
                "trained with")
        self.chunk_rows = chunk_rows_for(self.vocab_size, extract_mb << 20)
        self._check_head(teacher, dtype)
        self.extract_mb = extract_mb

    @torch.no_grad()
    def _check_head(self, teacher: str, dtype: str) -> None:
        """Refuse a model whose logits are not what this backend computes from its hidden states.

        The backend applies the LM head (and the post-head transforms it knows) itself, to keep
        memory bounded; an architecture with another transform would be stored wrongly while
        labelled exact. One short probe through the model's own forward catches that.
        """
        ids = torch.arange(1, 9, device=self.device)[None] % self.vocab_size
        want = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), -1)
        h = self.hidden([ids[0].cpu().numpy()])[0]
        got = torch.empty((h.shape[0], self.vocab_size), dtype=torch.float32, device=h.device)
        tmp = None if self.head.weight.dtype == torch.float32 else torch.empty_like(got, dtype=self.head.weight.dtype)
        self.head.into(h, got, tmp)
        got = torch.log_softmax(got, -1)
        tol = 1e-3 if dtype == "fp32" else 0.1
        err = float((got - want).abs().max())
        if not err <= tol:
            raise TeacherLoadError(
                f"{self.role} {teacher}: {type(self.model).__name__} transforms its logits in a way this backend does "
                f"not reproduce (max logprob difference {err:.3g} on a probe); refusing rather than storing "
                "wrong values")

    def describe(self) -> dict[str, Any]:
        return dict(self.identity)

    def options(self) -> dict[str, Any]:
        return {"device": str(self.device), "extract_mb": self.extract_mb, "chunk_rows": self.chunk_rows}

    def tokenizer_record(self) -> dict[str, Any]:
        return tokenizer_record(self.tokenizer)

    @torch.no_grad()
    def hidden(self, input_ids: Sequence[np.ndarray]) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` of a right-padded batch."""
        lengths = [len(x) for x in input_ids]
        T = max(lengths)
        ids = torch.zeros((len(input_ids), T), dtype=torch.long)
        mask = torch.zeros((len(input_ids), T), dtype=torch.long)
        for i, x in enumerate(input_ids):
            ids[i, :len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
            mask[i, :len(x)] = 1
        out = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def hidden_at(self, input_ids: Sequence[np.ndarray], positions: Sequence[np.ndarray]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``[M, H]`` that predict the tokens at ``positions`` (the state at t - 1 predicts
        token t) over all sequences of a batch, and those tokens ``[M]``."""
        h = self.hidden(input_ids)
        rows = np.concatenate([np.full(len(p), i) for i, p in enumerate(positions)]).astype(np.int64)
        cols = np.concatenate([np.asarray(p, np.int64) for p in positions])
        if not rows.size:
            return h.new_zeros((0, h.shape[-1])), torch.zeros(0, dtype=torch.long, device=h.device)
        hs = h[torch.as_tensor(rows, device=h.device), torch.as_tensor(cols - 1, device=h.device)]
        labels = torch.as_tensor(np.concatenate([np.asarray(x, np.int64)[np.asarray(p, np.int64)]
                                                 for x, p in zip(input_ids, positions)]), device=h.device)
        return hs, labels

    @torch.no_grad()
    def score(self, input_ids: Sequence[np.ndarray], positions: Sequence[np.ndarray], rule: Rule,
              generator: torch.Generator | None = None) -> list[Scored]:
        hs, labels = self.hidden_at(input_ids, positions)
        res = extract(hs, self.head, labels, rule, chunk_rows=self.chunk_rows, generator=generator)
        return split(res, [len(p) for p in positions])

    @torch.no_grad()
    def generate(self, prompt: np.ndarray, *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[np.ndarray]:
        """``n`` sampled responses to one prompt (token ids, through the end-of-sequence token if produced)."""
        torch.manual_seed(seed)  # transformers' sampling draws from the global generator
        ids = torch.as_tensor(np.asarray(prompt, np.int64))[None].to(self.device)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  num_return_sequences=n, pad_token_id=pad, **sampling)
        responses = []
        for row in out[:, ids.shape[1]:].cpu().numpy():
            stop = next((i + 1 for i, t in enumerate(row) if int(t) in eos), len(row))
            responses.append(row[:stop].astype(np.int32))
        return responses
