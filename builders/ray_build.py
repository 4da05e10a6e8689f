"""Distributed builds on Ray Data: ``logitstore build TEACHER DATA -o CACHE --ray [ADDRESS]``.

The coordinator (this process) reads and tokenises the data exactly as a one-process
build does and cuts it into the same windows (``builders.plan.Plan``: duplicates
dropped, committed sequences skipped). Each window with work left becomes a *block*:
its sequences go to ``CACHE/.inputs/block-NNNNNN.parquet``. A Ray Data pipeline then
maps the block numbers over a pool of actors (``BlockScorer``), each holding one
teacher backend (one per GPU, or one per CPU slot): an actor scores a block with the
``builders.scoring.score_items`` and writes it through the store's ``CacheWriter`` into
its own part, ``CACHE/parts/block-NNNNNN/`` (``logitstore.parts``). As blocks finish,
the coordinator rewrites the top-level manifest over the parts' committed shards; the
last rewrite marks the cache complete.

So the cache holds what a one-process build of the same data holds: the same
sequences, seq ids and values (the same windows are scored in the same batches, and a
rule-sample window draws from ``window_seed(seed, window)`` either way). Entry ids
are coded with one id map shared by every part, ranked by the token counts of the
first window's input (a one-process build ranks the first row group's entry ids:
the codes differ, the decoded ids do not).

Resume (``--ray --resume``): the coordinator reads the seq ids committed in every
part and plans again; finished blocks have nothing left and are not sent, a part
that was interrupted (a killed actor) is resumed by its own writer, which redoes only
what it had not committed. Ray's own retry of a failed block lands in the same part.

The cache directory must be visible at the same path to the coordinator and every
actor (a shared POSIX filesystem on a cluster); the writer needs atomic renames.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builders.config import RAY_RESUME_KEYS, RESUME_DEFAULTS, BuildConfig, RayOptions, build_record, length_limit
from builders.data import Example, SkipReport
from builders.inputs import data_fingerprint
from builders.plan import Item, Plan, positions_of, sequences_to_score, window_seed
from builders.scoring import open_writer, score_items
from logitstore import format as F
from logitstore.errors import CacheExistsError, InvalidInputError, TokenizerMismatchError
from logitstore.identity import tokenizer_record
from logitstore.lock import LOCK_NAME, BuildLock, read_lock
from logitstore.manifest import Manifest, load_manifest, require_current_version
from logitstore.ownership import check_output_dir, refuse_file, rmdir_if_empty
from logitstore.parts import (
    PARTS_DIR,
    commit_parts,
    committed_seq_ids,
    is_part_dir,
    part_manifests,
    part_name,
    remove_parts,
)
from logitstore.progress import progress_bar
from logitstore.writer import build_key_diffs

logger = logging.getLogger(__name__)

INPUTS_DIR = ".inputs"
ID_COUNTS_FILE = "id_counts.parquet"  # the token counts every part's id map is ranked by
_INPUT_NAME = re.compile(r"^(\.?block-\d{6,}\.parquet(\.tmp)?|id_counts\.parquet)$")  # the files of .inputs
_INPUT_SCHEMA = pa.schema([
    ("record", pa.int64()), ("sample", pa.int32()), ("correct", pa.bool_()), ("prompt_len", pa.int32()),
    ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_())),
])


class _Tokenising:
    """What ``builders.plan.sequences_to_score`` needs of a backend to read records: the tokenizer alone."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer


def build_ray(teacher: str, data: str | os.PathLike, out: str | os.PathLike, config: BuildConfig, *,
              resume: bool = False, progress: bool = True, argv: list[str] | None = None) -> Manifest:
    """Build (or continue) the cache ``out`` with a pool of Ray actors (``config.ray``); see the module
    docstring. ``builders.driver.build`` calls this for a config with ``ray`` set."""
    from builders.backends.hf import load_tokenizer, teacher_max_positions

    ray_options = config.ray if config.ray is not None else RayOptions()
    out, data = Path(out).absolute(), Path(data)
    if config.generation is not None:
        raise InvalidInputError("--ray builds score the given records; generation mode (--generate) runs in one "
                                "process (drop --ray, or generate first and build from the generated records)")
    if config.token_budget < 2:
        raise InvalidInputError(f"token_budget={config.token_budget} must be at least 2")
    if ray_options.actors < 1:
        raise InvalidInputError(f"--ray-actors {ray_options.actors}: must be at least 1")
    if importlib.util.find_spec("ray") is None:  # before tokenising the data, not after
        raise InvalidInputError("--ray needs Ray Data: pip install 'logitstore[ray]' (ray[data])")
    data_fp = data_fingerprint(data)
    refuse_file(out, "a cache")
    started = out.exists() and any(out.iterdir())
    if started and not resume:
        raise CacheExistsError(f"{out} already exists and is not empty; pass --resume to continue a --ray build "
                               "there, or choose a new output path")
    # a directory of ours (our manifest, or a started build's lock, parts and inputs) or refused: never a user's
    check_output_dir(out, before_commit={PARTS_DIR: is_part_dir, INPUTS_DIR: _own_input})
    if resume and (out / F.MANIFEST_NAME).is_file() and not (out / PARTS_DIR).is_dir():
        raise InvalidInputError(f"{out} was built in one process; resume it without --ray")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = BuildLock(out)
    lock.acquire()
    try:
        trust = bool(config.backend_options.get("trust_remote_code", False))
        tokenizer = load_tokenizer(teacher, trust_remote_code=trust)
        build_args = build_record(teacher, data, data_fp, dataclasses.replace(config, ray=ray_options),
                                  dict(config.backend_options), argv)
        teacher_max = teacher_max_positions(teacher, trust_remote_code=trust)
        engine_len = config.backend_options.get("max_model_len")  # vLLM's --max-model-len caps it further
        if engine_len:
            teacher_max = min(teacher_max or engine_len, engine_len)
        config, build_args["length_limit"] = length_limit(config, teacher_max)
        if (out / F.MANIFEST_NAME).is_file():
            _check_resume(out, load_manifest(out), build_args)
        report = SkipReport()
        plan, blocks, total = _plan(tokenizer, data, out, config, report)
        build_args["skipped"] = report.to_dict()
        t0 = time.time()
        if blocks:
            _run_blocks(teacher, out, config, ray_options, build_args, blocks, tokenizer_record(tokenizer), plan,
                        total, progress)
        build_args["elapsed_s"] = round(time.time() - t0, 1)
        if not any(m.shards for m in part_manifests(out).values()):
            raise InvalidInputError(f"{data}: no sequence to score (every record was skipped or empty)")
        m = commit_parts(out, build=build_args, duplicates_skipped=plan.duplicates, complete=True)
        _clear_inputs(out / INPUTS_DIR)
        return m
    except BaseException:
        if created and not any(m.shards for m in _safe_parts(out).values()):
            # what this build wrote goes under its lock; then only the empty directory, as the writer does
            _clear_inputs(out / INPUTS_DIR)
            remove_parts(out)
            lock.release()
            rmdir_if_empty(out)
        raise
    finally:
        if lock.held:
            lock.release()


def _safe_parts(out: Path) -> dict[int, Manifest]:
    try:
        return part_manifests(out)
    except Exception:  # noqa: BLE001 - cleanup after a failure must not hide the failure
        return {}


def _own_input(p: Path) -> bool:
    """A file of the coordinator's in ``.inputs``: a block's input, the token counts, or their temporary files."""
    return p.is_file() and bool(_INPUT_NAME.match(p.name))


def _clear_inputs(inputs: Path) -> None:
    """Delete the coordinator's files in ``.inputs`` (block inputs, token counts, their temporary files) and the
    directory when that leaves it empty."""
    if inputs.is_dir():
        for p in inputs.iterdir():
            if _own_input(p):
                p.unlink()
        rmdir_if_empty(inputs)


def _check_resume(out: Path, old: Manifest, new: dict) -> None:
    require_current_version(old, out)
    diffs = build_key_diffs(old.build, new, RAY_RESUME_KEYS, RESUME_DEFAULTS)
    if diffs:
        raise InvalidInputError(f"cannot resume {out}: " + "; ".join(diffs))


def _plan(tokenizer, data: Path, out: Path, config: BuildConfig, report: SkipReport
          ) -> tuple[Plan, list[int], int]:
    """Write the input of every block with work left, and the id-map counts; (plan, the blocks, positions to
    score)."""
    plan = Plan(committed_seq_ids(out, part_manifests(out)))
    inputs = out / INPUTS_DIR
    _clear_inputs(inputs)
    inputs.mkdir(exist_ok=True)
    blocks: list[int] = []
    total = 0
    id_counts = np.zeros(0, np.int64)
    items = sequences_to_score(_Tokenising(tokenizer), data, config, report)
    for index, window, todo in plan.windows(items, config.window):
        if index == 0:  # the shared id map ranks the first window's tokens: the same on every run
            id_counts = np.bincount(np.concatenate([it.ex.input_ids for it in window]).astype(np.int64))
        if todo:
            total += sum(len(positions_of(it.ex, config.cache_prompt)[0]) for it in todo)
            _write_input(inputs / f"block-{index:06d}.parquet", todo)
            blocks.append(index)
    pq.write_table(pa.table({"count": pa.array(id_counts, pa.int64())}), inputs / ID_COUNTS_FILE)
    return plan, blocks, total


def _write_input(path: Path, todo: list[Item]) -> None:
    table = pa.table({
        "record": pa.array([it.ex.record for it in todo], pa.int64()),
        "sample": pa.array([it.sample for it in todo], pa.int32()),
        "correct": pa.array([it.correct for it in todo], pa.bool_()),
        "prompt_len": pa.array([it.ex.prompt_len for it in todo], pa.int32()),
        "input_ids": pa.array([it.ex.input_ids.astype(np.int32) for it in todo], pa.list_(pa.int32())),
        "loss_mask": pa.array([it.ex.loss_mask.astype(bool) for it in todo], pa.list_(pa.bool_())),
    }, schema=_INPUT_SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_input(path: Path) -> list[Item]:
    """A block's sequences, as the coordinator planned them."""
    t = pq.read_table(path).to_pydict()
    return [Item(Example(record=t["record"][i], input_ids=np.asarray(t["input_ids"][i], np.int32),
                         loss_mask=np.asarray(t["loss_mask"][i], bool), prompt_len=t["prompt_len"][i],
                         answer=None, kind="input"), t["sample"][i], t["correct"][i])
            for i in range(len(t["record"]))]


class BlockScorer:
    """A Ray Data actor: one teacher backend; scores whole blocks into their parts."""

    def __init__(self, teacher: str, out: str, config: BuildConfig, build: dict, tokenizer: dict):
        from builders.backends import get_backend

        self.out, self.config, self.build = Path(out), config, build
        self.id_counts = pq.read_table(self.out / INPUTS_DIR / ID_COUNTS_FILE).column("count").to_numpy()
        self.backend = get_backend(config.backend)(teacher, **config.backend_options)
        got = self.backend.tokenizer_record()["fingerprint"]
        if got != tokenizer["fingerprint"]:
            raise TokenizerMismatchError(f"teacher {teacher} loaded in a Ray actor has tokenizer fingerprint {got}, "
                                         f"the coordinator's has {tokenizer['fingerprint']}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        res: dict[str, list] = {"block": [], "sequences": [], "positions": []}
        for block in batch["block"]:
            block = int(block)
            part = self.out / part_name(block)
            holder = read_lock(part)
            if holder is not None and holder.host != socket.gethostname():
                # The coordinator hands a block to one actor at a time, so a lock from another host is a dead
                # attempt's (Ray retries a block after its actor died); the part's writer resumes it.
                logger.warning("%s: taking over the lock of %s (an earlier attempt at this block)", part,
                               holder.describe())
                (part / LOCK_NAME).unlink(missing_ok=True)
            gen = torch.Generator().manual_seed(window_seed(self.config.seed, block))
            items = read_input(self.out / INPUTS_DIR / f"block-{block:06d}.parquet")
            with open_writer(self.backend, part, self.config, {**self.build, "block": block},
                             resume=(part / F.MANIFEST_NAME).is_file(), id_counts=self.id_counts) as writer:
                seqs, positions = score_items(self.backend, writer, items, self.config, gen)
            res["block"].append(block)
            res["sequences"].append(seqs)
            res["positions"].append(positions)
        return res


def _run_blocks(teacher: str, out: Path, config: BuildConfig, opts: RayOptions, build_args: dict,
                blocks: list[int], tokenizer: dict, plan: Plan, total: int,
                progress: bool) -> None:
    import ray  # present: build_ray checked before planning
    import ray.data

    started = not ray.is_initialized()
    if started:
        quiet = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        ray.init(address=opts.address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": quiet})
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notices; failures still raise here
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts positions
    ctx.print_on_execution_start = False
    bar = progress_bar(progress, desc="scoring", total=total)
    try:
        ds = ray.data.from_items([{"block": b} for b in blocks], override_num_blocks=len(blocks))
        ds = ds.map_batches(
            BlockScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=opts.actors),
            num_gpus=opts.gpus_per_actor or None, num_cpus=opts.cpus_per_actor,
            fn_constructor_kwargs={"teacher": teacher, "out": str(out), "config": config, "build": build_args,
                                   "tokenizer": tokenizer})
        done = 0
        for row in ds.iter_rows():
            done += 1
            if bar is not None:
                bar.update(int(row["positions"]))
                bar.set_postfix(blocks=f"{done}/{len(blocks)}", refresh=False)
            commit_parts(out, build=build_args, duplicates_skipped=plan.duplicates, complete=False)
    finally:
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()
