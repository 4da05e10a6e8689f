"""A build's configuration: one typed record from the command line (or Python) to the driver and its workers.

``BuildConfig`` holds everything a build depends on besides the teacher, the data and the
output: the sparse-entry rule and codec, the backend and its options, the record fields
and length policy, batching, generation mode (and, with ``policy``, the model the responses are
sampled from instead of the teacher), storage, and (``ray``) where a distributed build runs.
``build_record`` turns it into the manifest's ``build`` record, the description a resume is
compared with (``RESUME_BUILD_KEYS``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from builders.data import Fields
from builders.generate import GenerationConfig
from logitstore.codec import Codec
from logitstore.rules import Rule, Sampled, TopK
from logitstore.settings import declared_defaults

logger = logging.getLogger(__name__)


#: The rule of a build given no rule flag: the cache that BENCHMARKS.md ("Training quality", issue 15) recommends:
#: 36 systematic draws from the teacher (every token of probability >= 1/36 drawn, so kept with its exact logprob;
#: the rest sampled), trained with the inclusion-probability estimator (the trainer's default for it): 9.7 degrees
#: from full KD's gradient per position, and over 6 seeds of the long regime 98.3% of online KD's KL gain.
#: docs/choosing-a-cache.md shows the table and the plot behind the choice.
DEFAULT_RULE = Sampled(36, systematic=True)


def default_rule(backend: str) -> Rule:
    """``DEFAULT_RULE``; for a backend that cannot draw from the full distribution (vLLM returns only its top
    logprobs), its exact top-k head of the same measurement's best top-k cache (top-32)."""
    return TopK(32) if backend == "vllm" else DEFAULT_RULE


@dataclasses.dataclass
class RayOptions:
    """Where and how wide a distributed build runs (``--ray``)."""

    address: str | None = None
    """None: start a local Ray instance on this machine; "auto": the running cluster; or ray://HOST:PORT"""
    actors: int = 1
    """teacher replicas (actors), each scoring one block at a time"""
    gpus_per_actor: float = 0
    """GPUs each actor reserves (its backend's tensor-parallel size with vLLM)"""
    cpus_per_actor: float = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PolicyConfig:
    """The model that samples the responses of generation mode instead of the teacher (``--responses-from``)."""

    path: str
    """a local model directory with the teacher's tokenizer (e.g. a ``logitstore train`` output)"""
    backend: str = "transformers"
    """the policy's backend (its ``generate`` samples, its ``score`` gives policy_logprob and policy_entropy)"""
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """dtype, device, ... as for the teacher's backend"""
    round: int | None = None
    """the round of ``logitstore distill`` this build belongs to (recorded in build.policy)"""


@dataclasses.dataclass
class BuildConfig:
    """Everything a build depends on besides the teacher and the data."""

    rule: Rule
    codec: Codec = dataclasses.field(default_factory=Codec)
    backend: str = "transformers"
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fields: Fields = dataclasses.field(default_factory=Fields)
    max_length: int | None = None
    on_long: str = "truncate"
    on_bad: str = "error"
    token_budget: int = 8192
    """max padded tokens per teacher batch (batch size x longest sequence)"""
    window: int = 4096
    """records sorted by length together (bigger: less padding, more memory); with ray, one block"""
    cache_prompt: bool = False
    """also cache the non-target positions (prompt tokens), with loss_mask false"""
    generation: GenerationConfig | None = None
    """sample responses from the teacher instead of scoring the given text (generation mode)"""
    policy: PolicyConfig | None = None
    """generation mode: sample the responses from this model instead of the teacher (``builders.policy``)"""
    shard_mb: float = 256
    """shard size limit in MiB"""
    row_group_positions: int = 65536
    """positions per Parquet row group (the unit of reading, shuffling and shard rotation)"""
    seed: int = 0
    ray: RayOptions | None = None
    """score with a pool of Ray actors (``builders.ray_build``) instead of in this process"""
    lock: bool = True
    """take the build lock; False only for an object store without conditional creates (``--no-lock``)"""


#: build arguments a resume must match (the writer also checks teacher, tokenizer, rule and codec)
RESUME_BUILD_KEYS = ("data_fingerprint", "fields", "max_length", "on_long", "cache_prompt", "generation", "seed",
                     "policy")
#: a distributed resume must also keep the windows, which define the blocks
RAY_RESUME_KEYS = RESUME_BUILD_KEYS + ("window",)
#: the defaults of those that are dicts: a sub-setting added since a cache was started counts as its default there
RESUME_DEFAULTS = {"fields": declared_defaults(Fields), "generation": declared_defaults(GenerationConfig)}


def build_record(teacher: str, data: Path, data_fp: str, config: BuildConfig, backend_options: dict,
                 argv: list[str] | None, policy: dict[str, Any] | None = None,
                 policy_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``build`` record: everything needed to reproduce the build (``policy``: the identity record
    of the model the responses were sampled from, ``builders.policy.policy_record``; its run settings apart)."""
    rec = {
        "teacher": teacher, "data": str(data), "data_fingerprint": data_fp, "backend": config.backend,
        "backend_options": backend_options,
        "fields": dataclasses.asdict(config.fields), "max_length": config.max_length, "on_long": config.on_long,
        "on_bad": config.on_bad, "token_budget": config.token_budget, "window": config.window,
        "cache_prompt": config.cache_prompt, "seed": config.seed, "argv": argv, "skipped": None,
        "generation": dataclasses.asdict(config.generation) if config.generation else None,
        "policy": policy,
    }
    if policy is not None:
        rec["policy_options"] = policy_options or {}
    if config.ray is not None:
        rec["ray"] = config.ray.to_dict()
    return rec


def length_limit(config: BuildConfig, teacher_max: int | None) -> tuple[BuildConfig, dict[str, Any]]:
    """The config a build runs with, its ``max_length`` capped at the teacher's context length (a longer sequence
    would be scored past the positions the teacher was trained on), and the manifest's ``build.length_limit``
    record saying which limit applies (``by``: "teacher", "--max-length" or None) and the ``on_long`` policy."""
    given = config.max_length
    if teacher_max is not None and (given is None or teacher_max < given):
        applied, by = teacher_max, "teacher"
    else:
        applied, by = given, None if given is None else "--max-length"
    record = {"max_length": given, "teacher_max_positions": teacher_max, "applied": applied, "by": by,
              "on_long": config.on_long}
    if by == "teacher":
        logger.info("sequences are limited to %d tokens, the teacher's context length%s; longer ones: --on-long %s",
                    applied, "" if given is None else f" (below --max-length {given})", config.on_long)
    return dataclasses.replace(config, max_length=applied), record
