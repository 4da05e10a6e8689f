"""The model the responses come from when it is not the teacher (``build --generate N --responses-from POLICY``).

On-policy distillation samples responses from the student and has the teacher score them. The policy is
loaded through the same backend registry as a teacher (``builders.backends``): its ``generate`` samples
(per-prompt seeds, as in generation mode), its ``score`` gives what it said of each position of its
own samples. This module holds what is particular to the policy:

- ``check_policy``: before any model loads, refuse a build whose policy cannot work: no generation
  mode, ``--ray``, a path that is no local model directory, or a tokenizer other than the teacher's
  (the teacher reads the policy's token ids as they are; cross-tokenizer distillation is another
  matter). Only the two tokenizers are loaded for that.
- ``load_policy``: the policy's backend (``role="policy"``, so its messages name it).
- ``policy_values``: per sequence of a batch, the policy's full-vocabulary temperature-1 logprob of each
  cached label and its entropy there (the backend's ``score`` under ``TopK(1)``: the full softmax is
  computed per position in chunks anyway; only these two numbers are kept).
- ``policy_record`` / ``policy_exactness``: the manifest's ``build.policy`` and the exactness of the
  two fields (FORMAT.md, "Responses from another model").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from builders.backends import get_backend
from builders.config import BuildConfig, PolicyConfig
from logitstore.errors import InvalidInputError, LogitstoreError, TokenizerMismatchError
from logitstore.identity import tokenizer_fingerprint
from logitstore.rules import TopK


class PolicyNotFoundError(LogitstoreError, FileNotFoundError):
    """``--responses-from`` names no local model directory."""


def check_policy(teacher: str, config: BuildConfig) -> None:
    """Refuse a policy build that cannot work, before any model loads (see the module docstring)."""
    from builders.backends.hf import load_tokenizer

    policy = config.policy
    if config.generation is None:
        raise InvalidInputError(f"--responses-from {policy.path}: responses are sampled in generation mode; give "
                                "--generate N as well")
    if config.ray is not None:
        raise InvalidInputError("--responses-from runs in one process; --ray builds score given records only")
    path = Path(policy.path)
    if not path.is_dir() or not (path / "config.json").is_file():
        what = "no such directory" if not path.exists() else "not a model directory (no config.json)"
        raise PolicyNotFoundError(f"--responses-from {policy.path}: {what}; the policy is a local model directory "
                                  "with the teacher's tokenizer (e.g. a logitstore train output)")
    trust = bool(policy.backend_options.get("trust_remote_code", False))
    mine = load_tokenizer(str(path), trust_remote_code=trust, role="policy")
    theirs = load_tokenizer(teacher, trust_remote_code=bool(config.backend_options.get("trust_remote_code")))
    check_same_tokenizer(mine, theirs, policy.path, teacher)


def check_same_tokenizer(policy_tokenizer: Any, teacher_tokenizer: Any, policy: str, teacher: str) -> None:
    """Refuse a policy whose tokenizer fingerprint differs from the teacher's."""
    a, b = tokenizer_fingerprint(policy_tokenizer), tokenizer_fingerprint(teacher_tokenizer)
    if a != b:
        raise TokenizerMismatchError(
            f"--responses-from {policy} has tokenizer fingerprint {a} "
            f"({getattr(policy_tokenizer, 'name_or_path', '?')}), the teacher {teacher} has {b} "
            f"({getattr(teacher_tokenizer, 'name_or_path', '?')}): the teacher would read the policy's token ids "
            "as other tokens; sample from a model with the teacher's tokenizer")


def load_policy(policy: PolicyConfig):
    """The policy's backend, loaded like a teacher's."""
    return get_backend(policy.backend)(policy.path, role="policy", **policy.backend_options)


def policy_values(policy, input_ids: Sequence[np.ndarray], positions: Sequence[np.ndarray]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence: (the policy's logprob of the token at each of ``positions`` ``[N]``, its entropy there
    ``[N]``), full vocabulary, temperature 1."""
    return [(s.label_logprob, s.entropy) for s in policy.score(input_ids, positions, TopK(1))]


def policy_record(backend, policy: PolicyConfig) -> dict[str, Any]:
    """``build.policy``: the policy's identity (id, path, content-hash revision, dtype, architecture), its backend
    and the distill round."""
    return {**backend.describe(), "backend": policy.backend, "round": policy.round}


def policy_exactness(backend) -> dict[str, str]:
    """The exactness of policy_logprob and policy_entropy: that of the policy backend's label logprob and entropy
    (vLLM's entropy is a bound); unnamed fields keep the codec's word."""
    ex = getattr(backend, "exactness", {}) or {}
    return {mine: ex[theirs] for mine, theirs in (("policy_logprob", "label_logprob"), ("policy_entropy", "entropy"))
            if theirs in ex}
