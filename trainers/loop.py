"""The training driver: one loop for every student, loss, selection and weighting (``logitstore train``).

Per optimiser step, for each of ``grad_accum`` micro-batches of the streaming loader:
the student's body gives hidden states ``[B, T, H]``; the target positions are
gathered (``[N, H]``); ``trainers.losses.student_view`` applies the LM head and
log-softmax in chunks of positions; ``trainers.weighting`` decides which tokens count
and with which loss; ``trainers.losses.Objective`` gives the loss. Then AdamW with a
linear warm-up and a cosine decay, gradient clipping, and every so often metrics
(``OUT/metrics.jsonl``), an evaluation on held-out data (label cross-entropy, and the
KL from the teacher over its stored entries plus one bucket for the rest: exact for
that coarse-graining, a lower bound of the full-vocabulary KL) and a checkpoint.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the body runs under DistributedDataParallel
(gloo on CPU, nccl on CUDA), each rank reads its own part of the data (the loader
gives every sequence to exactly one rank per epoch), and rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from logitstore.errors import InvalidInputError
from trainers import checkpoint as ckpt
from trainers.config import RESUMABLE_CHANGES, TrainConfig
from trainers.data import StreamingLoader
from trainers.losses import Objective, SparseTargets, buckets, forward_kl, student_view
from trainers.student import Student, check_student, load_student, save_tokenizer
from trainers.weighting import coefficients

logger = logging.getLogger(__name__)

HOLDOUT_SEED = 0x401D  # fixed, so runs with different --seed evaluate on the same held-out sequences
METRICS_FILE = "metrics.jsonl"


class Body(torch.nn.Module):
    """The student's body as a module, so DistributedDataParallel wraps exactly what runs forward."""

    def __init__(self, student: Student):
        super().__init__()
        self.model = student.model
        self._student = student

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._student.hidden(batch)


def _setup_device(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {cfg.device}: CUDA is not available on this machine")
    device = torch.device(want)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return device, rank, world


def check_cache(cache, *, skip_bad: bool, what: str = "CACHE") -> list[str] | None:
    """Refuse a damaged cache before training (``verify`` without decoding: checksums, schema, counts).

    Returns None when it is sound, else (with ``skip_bad``) the seq ids of its sound shards, after
    logging which shards are left out and why. Files the manifest does not list (a stray or
    temporary file) are ignored: readers never look at them."""
    from logitstore.errors import CorruptCacheError
    from logitstore.verify import verify

    listed = {s.file: i for i, s in enumerate(cache.manifest.shards)}
    problems = [p for p in verify(cache.path, deep=False) if "not listed in the manifest" not in p.message]
    if not problems:
        return None
    bad = {listed[p.file] for p in problems if p.file in listed}
    fatal = [p for p in problems if p.file not in listed]
    text = "; ".join(str(p) for p in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    if fatal or not skip_bad or len(bad) == len(listed):
        hint = "" if fatal else " (or pass --skip-bad-shards to train on the sound shards)"
        raise CorruptCacheError(f"{what} {cache.path} is damaged, refusing to train: {text}; run `logitstore verify "
                                f"{cache.path}` for the full list; restore the damaged shards from a copy or rebuild the cache "
                                f"into a new directory{hint}")
    logger.warning("skipping %d damaged shard(s) of %s: %s", len(bad), cache.path, text)
    keep = set()
    for i in range(len(listed)):
        if i not in bad:
            keep.update(cache._read(i, None, ["seq_id"]).column(0).to_pylist())
    return [sid for sid in cache.scalars(["seq_id"]).column(0).to_pylist() if sid in keep] if cache.selection \
        else sorted(keep)


def _sources(cfg: TrainConfig, cache, only: list[str] | None = None):
    """(train source, eval source or None): the cache/selection itself, or a seeded hash split of it,
    restricted to the seq ids ``only`` when given (the sound shards of a damaged cache)."""
    from logitstore.selection import Selection, cache_fingerprint, in_fraction

    if not cfg.holdout and only is None:
        return cfg.cache, (cfg.eval or None)
    ids = only if only is not None else cache.scalars(["seq_id"]).column(0).to_pylist()
    w = cache.weights
    if not cfg.holdout:
        return Selection(cache=str(cache.path), cache_fingerprint=cache_fingerprint(cache.manifest), seq_ids=ids,
                         weights=[w[x] for x in ids] if w else None, query="sound shards"), (cfg.eval or None)
    parts: dict[bool, list[str]] = {True: [], False: []}
    for sid in ids:
        parts[in_fraction(sid, HOLDOUT_SEED, cfg.holdout)].append(sid)
    if not parts[True] or not parts[False]:
        raise InvalidInputError(f"--holdout {cfg.holdout} leaves {len(parts[False])} training and "
                                f"{len(parts[True])} held-out sequences of {len(ids)}; both must be non-empty")
    fp = cache_fingerprint(cache.manifest)
    sel = {held: Selection(cache=str(cache.path), cache_fingerprint=fp, seq_ids=s,
                           weights=[w[x] for x in s] if w and not held else None, query=f"holdout {cfg.holdout}")
           for held, s in parts.items()}
    return sel[False], sel[True]


def _targets(batch: dict, sel: torch.Tensor, vocab: int, draws: int | None) -> SparseTargets:
    get = lambda k: batch[k][sel] if k in batch else None  # noqa: E731
    return SparseTargets(ids=batch["topk_ids"][sel], valid=batch["topk_valid"][sel], logprobs=get("topk_logprobs"),
                         tail_mass=batch["tail_mass"][sel], labels=batch["labels"][sel], vocab_size=vocab,
                         counts=get("counts"), draws=draws)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _schedule(cfg: TrainConfig):
    warm, total, floor = cfg.resolved_warmup(), cfg.max_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(student: Student, source, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Held-out label cross-entropy and bucket KL(teacher || student) at temperature 1, token-weighted."""
    loader = StreamingLoader(source, batch_size=cfg.batch_size, max_length=cfg.max_length, shuffle=False,
                             epochs=1, rank=0, world_size=1)
    m = loader.manifest
    draws = m.rule.get("draws")
    ce_sum = kl_sum = 0.0
    tokens = seqs = 0
    was_training = student.model.training
    student.model.eval()
    for batch in loader:
        batch = _to(batch, device)
        sel = batch["target_mask"]
        h = student.hidden(batch)[sel]
        t = _targets(batch, sel, m.vocab_size, draws)
        view = student_view(h, student.head, t.ids, t.labels, chunk_size=cfg.chunk_size)
        ce_sum += float(-view.logp_label.double().sum())
        if t.logprobs is not None:
            lt, ls, mask = buckets(view, t, tail="other")
            kl_sum += float(forward_kl(lt, ls, mask).double().sum())
        tokens += int(sel.sum())
        seqs += len(batch["seq_ids"])
        if cfg.eval_sequences and seqs >= cfg.eval_sequences:
            break
    student.model.train(was_training)
    out = {"eval_ce": ce_sum / max(tokens, 1), "eval_tokens": tokens, "eval_sequences": seqs}
    if m.codec.get("values") != "none":
        out["eval_kl"] = kl_sum / max(tokens, 1)
    return out


def _check_output(out: Path, cfg: TrainConfig) -> dict | None:
    """On resume: the saved state to continue from; else refuse an OUT that holds another run."""
    if cfg.resume:
        step, path = ckpt.latest(out)
        state = ckpt.load_state(path)
        saved = {**TrainConfig().to_dict(), **state["config"]}  # options added since then: at their defaults
        changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise InvalidInputError(f"--resume: the run in {out} was started with other settings ({diffs}); "
                                    "resume with the same ones, or train into another -o")
        state["path"] = str(path)
        return state
    if ckpt.list_checkpoints(out) or (out / METRICS_FILE).exists():
        raise InvalidInputError(f"-o {out} holds a previous training run; pass --resume to continue it or "
                                "choose another output directory")
    return None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one student as ``cfg`` says; returns the run's summary (also written to ``OUT/summary.json``)."""
    import logitstore

    cfg.validate()
    device, rank, world = _setup_device(cfg)
    out = Path(cfg.output)
    cache = logitstore.open(cfg.cache)
    manifest = cache.manifest
    rule = manifest.rule["rule"]
    if cfg.resolved_tail(rule) == "sampled" and rule != "sample":
        raise InvalidInputError(f"--tail sampled needs a sampled cache (built with --sample N); {cfg.cache} has "
                                f"rule {rule!r}: use --tail other or renormalize")
    only = None
    if not cfg.skip_verify:  # rank 0 reads every shard once; the others take its answer
        if rank == 0:
            only = check_cache(cache, skip_bad=cfg.skip_bad_shards)
            if cfg.eval:
                check_cache(logitstore.open(cfg.eval), skip_bad=False, what="--eval")
        if world > 1:
            box = [only]
            dist.broadcast_object_list(box, src=0)
            only = box[0]
    train_src, eval_src = _sources(cfg, cache, only)
    if only is not None:
        logger.warning("training on %d of %d sequences (damaged shards left out)", len(only), len(cache))
    state = _check_output(out, cfg)
    student = load_student(cfg.student, manifest=manifest, tokenizer=cfg.tokenizer, seed=cfg.seed)
    check_student(student, cache)
    if state is not None:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(state["path"], dtype=torch.float32)
        student.model.load_state_dict(saved.state_dict())
    student.model.to(device).train()
    student.head = type(student.head).of(student.model)
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout streams differ per rank
    body: torch.nn.Module = Body(student)
    if world > 1:
        body = torch.nn.parallel.DistributedDataParallel(body, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    score_cols = [cfg.keep_by.split(":", 1)[1]] if cfg.keep_by.startswith("score:") and cfg.keep_fraction < 1 else []
    loader = StreamingLoader(train_src, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed,
                             buffer_size=cfg.shuffle_buffer, num_workers=cfg.num_workers, pack=cfg.pack,
                             scores=cfg.scores or None, score_columns=score_cols)
    max_steps = cfg.max_steps
    if cfg.epochs:
        per_epoch = sum(len(loader.epoch_plan(0, worker=w)) for w in range(max(1, cfg.num_workers)))
        max_steps = min(max_steps, max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum)))
    # the schedule and TAID's t run over the steps this run will take
    objective = Objective(cfg.loss, tail=cfg.resolved_tail(rule), temperature=cfg.temperature,
                          ce_weight=cfg.ce_weight, beta=cfg.beta, alpha=cfg.alpha, taid_start=cfg.taid_start,
                          taid_end=cfg.taid_end, total_steps=max_steps)
    opt = _optimizer(student.model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.replace(max_steps=max_steps)))
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        objective.load_state_dict(state["objective"])
        loader.load_state_dict({**state["loader"], "rank": rank})
        ckpt.set_rng_state(state["rng"])
        start = int(state["step"])
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(out)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        _trim(out / METRICS_FILE, lambda row: row.get("step", 0) <= start)
    if cfg.trace_data:
        _trim(out / f"data-rank{rank}.jsonl", lambda row: row["step"] < start)
    draws = manifest.rule.get("draws")

    def save(step: int) -> None:
        st = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "objective": objective.state_dict(), "loader": loader.state_dict(), "rng": ckpt.rng_state(),
              "config": cfg.to_dict()}
        if main:
            ckpt.save_checkpoint(out, step, student.model, st, keep=cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=start, desc="train", unit="step", disable=cfg.quiet or not main)
    it = iter(loader)
    t_run, wait, tokens = time.perf_counter(), 0.0, 0
    step = start
    metrics: dict[str, Any] = {}
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            acc: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                tw = time.perf_counter()
                batch = _to(next(it), device)
                wait += time.perf_counter() - tw
                if cfg.trace_data:
                    _trace(out, rank, step, batch["seq_ids"], batch.get("epoch"))
                sync = contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else body.no_sync()
                with sync, _autocast(cfg, device):
                    loss, m = _micro_loss(body, student, batch, cfg, objective, manifest.vocab_size, draws)
                    (loss / cfg.grad_accum).backward()
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + v / cfg.grad_accum
                tokens += int(batch["target_mask"].sum())
            if cfg.grad_clip:
                acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(student.model.parameters(), cfg.grad_clip))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if world > 1:
                acc = _mean_over_ranks(acc, device)
            objective.step_end(acc.get("kd", acc["loss"]), step)  # TAID adapts to the distillation term
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{acc['loss']:.4f}")
            if main and (step % cfg.log_every == 0 or step == max_steps):
                elapsed = time.perf_counter() - t_run
                metrics = {"step": step, **acc, "lr": sched.get_last_lr()[0], "step_time": time.perf_counter() - t0,
                           "data_wait_fraction": wait / max(elapsed, 1e-9), "target_tokens": tokens}
                _log(out, metrics)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps and eval_src is not None:
                _eval_and_log(student, eval_src, cfg, device, out, step, main, world)
            if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
                save(step)
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d: writing a checkpoint to resume from", step)
        save(step)
        raise
    finally:
        bar.close()
    save(step)
    final_eval = _eval_and_log(student, eval_src, cfg, device, out, step, main, world) if eval_src else {}
    summary = {"steps": step, "seconds": time.perf_counter() - t_run, "target_tokens": tokens,
               "last": metrics, **final_eval, "output": str(out), "world_size": world}
    if main:
        student.model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(student, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if world > 1:
        dist.barrier()
    return summary


def _micro_loss(body, student: Student, batch: dict, cfg: TrainConfig, objective: Objective, vocab: int,
                draws: int | None) -> tuple[torch.Tensor, dict[str, float]]:
    h = body(batch)
    sel = batch["target_mask"]
    hs = h[sel]
    if hs.shape[0] == 0:  # nothing to learn here; keep every parameter in the graph for DDP
        zero = h.sum() * 0 + student.head.weight.sum() * 0
        return zero, {"loss": 0.0}
    t = _targets(batch, sel, vocab, draws)
    need_entropy = cfg.keep_fraction < 1 and cfg.keep_by == "student_entropy"
    recompute = hs.shape[0] * student.head.vocab_size * 4 > cfg.head_memory_mb * 2**20
    view = student_view(hs, student.head, t.ids, t.labels, temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                        need_entropy=need_entropy, recompute=recompute)
    weight, kd, ce = coefficients(batch, sel, cfg, view.entropy)
    return objective(view, t, weight, kd, ce)


def _autocast(cfg: TrainConfig, device: torch.device):
    want = cfg.dtype
    if want == "auto":
        want = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if want == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _mean_over_ranks(acc: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(acc)
    t = torch.tensor([acc[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _eval_and_log(student, source, cfg, device, out, step, main, world) -> dict[str, float]:
    res = {}
    if main:
        res = evaluate(student, source, cfg, device)
        _log(out, {"step": step, **res})
        logger.info("eval at step %d: %s", step, res)
    if world > 1:
        dist.barrier()
    return res


def _trace(out: Path, rank: int, step: int, seq_ids: list[str], epoch: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"data-rank{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, "seq_ids": list(seq_ids)}) + "\n")


def _log(out: Path, row: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _trim(path: Path, keep) -> None:
    """On resume, drop the JSON-lines rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
    path.write_text("".join(r + "\n" for r in rows if keep(json.loads(r))), encoding="utf-8")
