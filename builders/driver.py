"""The build driver: data + teacher backend -> cache. One driver for every backend, local or distributed.

``build(teacher, data, out, config)`` checks the inputs before any model loads (the data path,
a live build lock, the kind of directory ``out`` is), then either scores in this process or,
with ``config.ray``, hands the same plan to a pool of Ray actors (``builders.ray_build``).
In this process: the sequences to score (``builders.plan.sequences_to_score``) are taken in
windows, each window sorted by length and cut into token-budget batches, scored by the backend
and written through one ``CacheWriter`` (``builders.scoring``), with a progress bar in
positions/s. With ``config.policy`` (``--responses-from``) the responses of generation mode are sampled
from that model instead of the teacher, which scores them, and the policy's own logprob and entropy
of each position are stored beside the teacher's (``builders.policy``). Everything needed to
reproduce the build goes into the manifest, and the time spent sampling, in the policy's pass and in
the teacher's scoring (``build.timings_s``). ``resume=True``
keeps the committed shards, skips the sequences they hold and redoes the rest; a resume with a
different teacher, tokenizer, rule, codec or data is refused.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import logitstore
from builders.backends import get_backend
from builders.backends.base import Backend
from builders.config import BuildConfig, build_record, length_limit
from builders.data import SkipReport
from builders.inputs import data_fingerprint
from builders.plan import Plan, sequences_to_score, window_seed
from builders.policy import check_policy, load_policy, policy_record
from builders.scoring import open_writer, score_items
from logitstore import remote
from logitstore.contract import check_rule_and_codec
from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.lock import check_unlocked
from logitstore.manifest import Manifest
from logitstore.ownership import check_output_dir
from logitstore.parts import PARTS_DIR
from logitstore.progress import progress_bar

logger = logging.getLogger(__name__)


def build(teacher: str, data: str | os.PathLike, out: str | os.PathLike, config: BuildConfig, *,
          resume: bool = False, progress: bool = True, argv: list[str] | None = None) -> Manifest:
    """Build (or, with ``resume``, continue) the cache ``out`` from ``data`` scored by ``teacher``."""
    out, data = _out_path(out), Path(data)
    _check_config(teacher, config)  # before any model loads
    if config.ray is not None:
        if remote.is_remote(out):
            raise InvalidInputError(f"-o {out}: a distributed build (--ray) writes to a shared filesystem; build "
                                    "into one, or drop --ray to build into the object store")
        from builders.ray_build import build_ray

        return build_ray(teacher, data, out, config, resume=resume, progress=progress, argv=argv)
    data_fp = _check_inputs(data, out, resume)
    policy = load_policy(config.policy) if config.policy is not None else None
    backend = get_backend(config.backend)(teacher, **config.backend_options)
    return _build_with(backend, teacher, data, data_fp, out, config, resume, progress, argv, policy)


def build_with(backend: Backend, teacher: str, data: str | os.PathLike, out: str | os.PathLike,
               config: BuildConfig, *, resume: bool = False, progress: bool = True,
               argv: list[str] | None = None) -> Manifest:
    """``build`` with a backend already made (a model in memory, a benchmark): the same checks, plan,
    batches and writer; ``teacher`` is the name the manifest's build record gives it."""
    out, data = _out_path(out), Path(data)
    _check_config(teacher, config)
    data_fp = _check_inputs(data, out, resume)
    policy = load_policy(config.policy) if config.policy is not None else None
    return _build_with(backend, teacher, data, data_fp, out, config, resume, progress, argv, policy)


def _out_path(out: str | os.PathLike) -> Path | str:
    """The output cache: a local path, or an object-store URL kept as the string it is."""
    return str(out) if remote.is_remote(str(out)) else Path(out)


def _check_config(teacher: str, config: BuildConfig) -> None:
    if config.token_budget < 2:
        raise InvalidInputError(f"token_budget={config.token_budget} must be at least 2")
    check_rule_and_codec(config.rule, config.codec)
    if config.policy is not None:
        check_policy(teacher, config)  # generation mode, a model directory, the teacher's tokenizer


def _check_inputs(data: Path, out: Path, resume: bool) -> str:
    """The data's fingerprint, after the checks that must fail before a teacher loads: what ``out`` is (a build
    already writing it, a distributed build's directory, a file or a foreign directory, refused: nothing of a
    user's is written over; a cache, continued only with ``resume``)."""
    data_fp = data_fingerprint(data)  # also: a missing data path fails here
    if remote.is_remote(out):
        if remote.check_output(out) and not resume:
            raise CacheExistsError(f"{out} already holds a cache; pass --resume to continue it, or choose a new "
                                   "output URL")
        return data_fp
    check_unlocked(out)
    if (out / PARTS_DIR).exists():
        raise InvalidInputError(f"{out} holds the parts of a distributed build (--ray); continue it with --ray "
                                "--resume, or choose a new output path")
    if check_output_dir(out) and not resume:
        raise CacheExistsError(f"{out} already holds a cache; pass --resume to continue it, or choose a new output "
                               "path")
    return data_fp


def _build_with(backend: Backend, teacher: str, data: Path, data_fp: str, out: Path, config: BuildConfig,
                resume: bool, progress: bool, argv: list[str] | None, policy=None) -> Manifest:
    build_args = build_record(teacher, data, data_fp, config, {**config.backend_options, **backend.options()}, argv,
                              policy=None if policy is None else policy_record(policy, config.policy),
                              policy_options=None if policy is None else
                              {**config.policy.backend_options, **policy.options()})
    config, build_args["length_limit"] = length_limit(config, backend.max_positions)
    # a failed first build that committed nothing leaves nothing behind: the writer removes the directory it
    # created, under its lock (so never the directory of another build that started meanwhile)
    return _run(backend, data, out, config, build_args, resume, progress, policy)


def _run(backend, data: Path, out: Path, config: BuildConfig, build_args: dict, resume: bool,
         progress: bool, policy=None) -> Manifest:
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    timings = {"generate": 0.0, "policy_score": 0.0, "teacher_score": 0.0}
    report = SkipReport()
    bar = progress_bar(progress, desc="scoring")
    t0, done_positions, done_seqs = time.time(), 0, 0

    def on_batch(seqs: int, positions: int) -> None:
        nonlocal done_seqs, done_positions
        done_seqs, done_positions = done_seqs + seqs, done_positions + positions
        if bar is not None:
            bar.update(positions)
            bar.set_postfix(seqs=done_seqs, refresh=False)

    with open_writer(backend, out, config, build_args, resume, policy=policy) as writer:
        committed = _committed_records(out) if resume and writer.manifest.shards and config.generation else None
        items = sequences_to_score(backend, data, config, report, committed_records=committed, progress=progress,
                                   sampler=policy, timings=timings)
        plan = Plan(writer.committed_ids)
        for index, _, todo in plan.windows(items, config.window):
            gen.manual_seed(window_seed(config.seed, index))
            score_items(backend, writer, todo, config, gen, on_batch, policy=policy, timings=timings)
        writer.manifest.duplicates_skipped = plan.duplicates
        writer.manifest.build["skipped"] = report.to_dict()
        writer.manifest.build["elapsed_s"] = round(time.time() - t0, 1)
        writer.manifest.build["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    if bar is not None:
        bar.close()
    logger.info("built %s: %d sequences, %d positions in %.1f s", out, done_seqs, done_positions, time.time() - t0)
    return writer.manifest


def _committed_records(out: Path) -> dict[int, int]:
    """record -> samples the committed shards hold (generation mode: prompts whose samples are all there are
    not sampled again)."""
    done: dict[int, int] = {}
    for rec in logitstore.open(out).scalars(["record"]).column(0).to_pylist():
        done[rec] = done.get(rec, 0) + 1
    return done
