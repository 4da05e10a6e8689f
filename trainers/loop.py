"""The training driver: one loop for every student, loss, selection and weighting (``logitstore train``).

Per optimiser step, for each of ``grad_accum`` micro-batches of the streaming loader:
the student's body gives hidden states ``[B, T, H]``; the target positions are
gathered (``[N, H]``); ``trainers.view.student_view`` applies the LM head and
log-softmax in chunks of positions; ``trainers.weighting`` decides which tokens count
and with which loss; ``trainers.losses.Objective`` gives the loss. A student with another
tokenizer (``--cross-tokenizer``) plugs in ``trainers.cross.CrossTokenizer`` instead: it turns each
teacher batch into a student batch of aligned chunks and gives that batch's loss. Then AdamW with a
linear warm-up and a cosine decay, gradient clipping, and every so often metrics
(``OUT/metrics.jsonl``), an evaluation on held-out data (``trainers.evaluation``) and a
checkpoint (``trainers.checkpoint``). What the run reads is decided first (``trainers.sources``); with
``--mix-cache`` a second cache is mixed in per batch (``trainers.mixing``, GKD's lambda).

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

from logitstore.codec import Codec
from logitstore.errors import InvalidInputError, LogitstoreError
from logitstore.head import Head
from logitstore.manifest import atomic_write_bytes
from logitstore.rules import Rule
from trainers import checkpoint as ckpt
from trainers.config import TrainConfig, placed
from trainers.cross import CrossTokenizer
from trainers.data import StreamingLoader
from trainers.evaluation import METRICS_FILE, batch_targets, eval_and_log, last_logged, log_metrics, to_device
from trainers.losses import Objective
from trainers.mixing import MixedLoader
from trainers.rundir import SUMMARY_FILE, RunDir, student_identity
from trainers.sources import check_cache, check_mix_cache, check_usable, train_and_eval_sources
from trainers.student import Student, check_student, load_student, save_tokenizer
from trainers.view import student_view
from trainers.weighting import coefficients

logger = logging.getLogger(__name__)



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


def lr_schedule(cfg: TrainConfig):
    """The learning-rate factor per step: linear warm-up, then a cosine down to ``min_lr_ratio``."""
    warm, total, floor = cfg.resolved_warmup(), cfg.max_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95) with weight decay on the matrices only."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


class _DeferredInterrupt:
    """While a single-process run trains: a first Ctrl-C (SIGINT) only asks to stop, and the loop stops at the next
    step boundary with a checkpoint of a consistent state (the model, optimiser and data order of that step), so a
    resume ends where an uninterrupted run ends; a second Ctrl-C stops at once, from the last checkpoint. Elsewhere
    (several ranks, or not the main thread) Ctrl-C stops at once and a resume starts from the last periodic
    checkpoint."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested, self._previous = False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after this step (press again to stop at once)")

    def restore(self) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one student as ``cfg`` says; returns the run's summary (also written to ``OUT/summary.json``)."""
    cfg.validate()
    device, rank, world = _setup_device(cfg)
    run = _Run(cfg, device, rank, world)
    rundir = RunDir(cfg)
    on_rank0(rundir.claim, rank == 0, world)  # OUT checked and locked (``trainers.rundir``)
    try:
        sources = run.open_data()
        state = rundir.resume_state()
        run.open_student(state)
        loader = run.open_loader(sources[0])
        run.optimiser(loader, state)
        run.prepare_output(rundir)
        return run.loop(loader, sources[1])
    finally:
        rundir.release()


def on_rank0(fn, main: bool, world: int):
    """``fn()`` on rank 0 only; every rank gets its result, or raises its error (a ``LogitstoreError``: the others
    raise one with its message), so no rank waits for a rank 0 that gave up."""
    box: list = [("ok", None)]
    if main:
        try:
            box = [("ok", fn())]
        except LogitstoreError as exc:
            if world > 1:
                dist.broadcast_object_list([("error", str(exc))], src=0)
            raise
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise LogitstoreError(value)
    return value


class _Run:
    """One training run's pieces, set up in order by ``train`` (data, student, loader, optimiser, output)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int, world: int):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.main = rank == 0
        self.out = Path(cfg.output)

    def open_data(self):
        """Open the cache, refuse a damaged one (rank 0 checks, the others take its answer); (train, eval)."""
        import logitstore

        cfg = self.cfg
        self.cache = cache = logitstore.open(cfg.cache, allow_missing=cfg.allow_missing)
        self.manifest = cache.manifest
        eval_cache = logitstore.open(cfg.eval, allow_missing=cfg.allow_missing) if cfg.eval else None
        for c, flag in ((cache, "CACHE"), (eval_cache, "--eval")):
            if c is not None:
                check_usable(c, flag, cfg.allow_incomplete)
        cfg.check_rule(self.manifest.rule["rule"], cfg.cache, self.manifest.exactness)
        only = None
        if not cfg.skip_verify:
            if self.main:
                only = check_cache(cache, skip_bad=cfg.skip_bad_shards)
                if eval_cache is not None:
                    check_cache(eval_cache, skip_bad=False, what="--eval")
            if self.world > 1:
                box = [only]
                dist.broadcast_object_list(box, src=0)
                only = box[0]
        if only is not None:
            logger.warning("training on %d of %d sequences (damaged shards left out)", len(only), len(cache))
        self.mix = None
        if cfg.mix_cache:
            self.mix = logitstore.open(cfg.mix_cache, allow_missing=cfg.allow_missing)
            check_usable(self.mix, "--mix-cache", cfg.allow_incomplete)
            check_mix_cache(cache, self.mix)
            if not cfg.skip_verify and self.main:
                check_cache(self.mix, skip_bad=False, what="--mix-cache")
        return train_and_eval_sources(cfg, cache, only, eval_cache)

    def open_student(self, state: dict | None) -> None:
        """Load (or initialise) the student, check it against the cache, restore resumed weights, wrap for DDP."""
        cfg = self.cfg
        student = load_student(cfg.student, manifest=self.manifest, tokenizer=cfg.tokenizer, seed=cfg.seed,
                               cache_tokenizer=not cfg.cross_tokenizer)
        self.cross = CrossTokenizer(cfg, self.manifest, student) if cfg.cross_tokenizer else None
        if self.cross is None:
            check_student(student, self.cache)
        if self.mix is not None and self.cross is None:
            check_student(student, self.mix)
        if state is not None:
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(state["path"], dtype=torch.float32)
            student.model.load_state_dict(saved.state_dict())
        student.model.to(self.device).train()
        student.head = type(student.head).of(student.model)
        torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # dropout streams differ per rank
        body: torch.nn.Module = Body(student)
        if self.world > 1:
            dev = self.device
            body = torch.nn.parallel.DistributedDataParallel(body, device_ids=[dev.index] if dev.type == "cuda"
                                                             else None)
        self.student, self.body = student, body

    def open_loader(self, source) -> StreamingLoader | MixedLoader:
        cfg = self.cfg
        score_cols = [cfg.keep_by.split(":", 1)[1]] if cfg.keep_by.startswith("score:") and cfg.keep_fraction < 1 \
            else []
        def stream(src, seed):
            return StreamingLoader(src, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed,
                                   buffer_size=cfg.shuffle_buffer, num_workers=cfg.num_workers, pack=cfg.pack,
                                   scores=cfg.scores or None, score_columns=score_cols)

        loader = stream(source, cfg.seed)
        self.max_steps = cfg.max_steps
        if self.mix is not None:  # validate() refused --epochs with --mix-cache
            return MixedLoader(loader, stream(self.mix.source, cfg.seed + 1), ratio=cfg.mix_ratio, seed=cfg.seed)
        if cfg.epochs:
            per_epoch = sum(len(loader.epoch_plan(0, worker=w)) for w in range(max(1, cfg.num_workers)))
            self.max_steps = min(self.max_steps, max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum)))
        return loader

    def optimiser(self, loader: StreamingLoader | MixedLoader, state: dict | None) -> None:
        """The objective, AdamW and the schedule over the steps this run takes; a resumed run's saved state."""
        cfg = self.cfg
        # a cross-tokenizer run's targets are aligned chunks: its objective takes the 'other' bucket
        self.objective = Objective.from_config(cfg.replace(tail="other") if self.cross else cfg,
                                               self.manifest.rule["rule"], total_steps=self.max_steps)
        self.opt = make_optimizer(self.student.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_schedule(cfg.replace(max_steps=self.max_steps)))
        self.start = 0
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.objective.load_state_dict(state["objective"])
            loader.load_state_dict({**state["loader"], "rank": self.rank})
            ckpt.set_rng_state(state["rng"])
            self.start = int(state["step"])
        self.loader = loader

    def prepare_output(self, rundir: RunDir) -> None:
        """OUT holds the config and the student's identity, no earlier run (``--force``) and no rows written after
        the checkpoint resumed from."""
        out, start = self.out, self.start
        self.identity = student_identity(self.cfg.student)
        if self.main:
            if self.cfg.force:
                rundir.clear()
            ckpt.remove_partial(out)
            rundir.write_config(self.identity)
            _trim(out / METRICS_FILE, lambda row: row.get("step", 0) <= start)
        if self.cfg.trace_data:
            _trim(out / f"data-rank{self.rank}.jsonl", lambda row: row["step"] < start)

    def save(self, step: int) -> None:
        st = {"step": step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
              "objective": self.objective.state_dict(), "loader": self.loader.state_dict(), "rng": ckpt.rng_state(),
              "config": placed(self.cfg.to_dict()),
              "student_identity": self.identity}
        if self.main:
            ckpt.save_checkpoint(self.out, step, self.student.model, st, keep=self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()

    def step(self, it, step: int) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; the step's metrics averaged (over ranks too)."""
        cfg, device = self.cfg, self.device
        acc: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            tw = time.perf_counter()
            batch = next(it)
            self.wait += time.perf_counter() - tw
            if cfg.trace_data:
                _trace(self.out, self.rank, step, batch["seq_ids"], batch.get("epoch"))
            batch = to_device(batch if self.cross is None else self.cross.prepare(batch), device)
            last = self.world == 1 or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else self.body.no_sync(), _autocast(cfg, device):
                if self.cross is None:
                    loss, m = micro_loss(self.body, self.student.head, batch, cfg, self.objective,
                                         self.manifest.vocab_size, self.cache.rule, codec=self.cache.codec)
                else:
                    loss, m = self.cross.loss(self.body, self.student, batch, self.objective)
                (loss / cfg.grad_accum).backward()
            for k, v in m.items():
                acc[k] = acc.get(k, 0.0) + v / cfg.grad_accum
            self.tokens += int(batch["target_mask"].sum())
        if cfg.grad_clip:
            acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.student.model.parameters(), cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.world > 1:
            acc = _mean_over_ranks(acc, device)
        self.objective.step_end(acc.get("kd", acc["loss"]), step)  # TAID adapts to the distillation term
        return acc

    def loop(self, loader: StreamingLoader | MixedLoader, eval_src) -> dict[str, Any]:
        """Train to ``max_steps`` with metrics, evaluations and checkpoints; then save the final model."""
        from tqdm.auto import tqdm

        cfg, out, main, max_steps = self.cfg, self.out, self.main, self.max_steps
        bar = tqdm(total=max_steps, initial=self.start, desc="train", unit="step", disable=cfg.quiet or not main)
        it = iter(loader)
        t_run, self.wait, self.tokens = time.perf_counter(), 0.0, 0
        step, metrics = self.start, {}
        interrupted = _DeferredInterrupt(self.world == 1)
        try:
            while step < max_steps:
                t0 = time.perf_counter()
                acc = self.step(it, step)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{acc['loss']:.4f}")
                if main and (step % cfg.log_every == 0 or step == max_steps):
                    elapsed = time.perf_counter() - t_run
                    metrics = {"step": step, **acc, "lr": self.sched.get_last_lr()[0],
                               "step_time": time.perf_counter() - t0,
                               "data_wait_fraction": self.wait / max(elapsed, 1e-9), "target_tokens": self.tokens}
                    log_metrics(out, metrics)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps and eval_src is not None:
                    eval_and_log(self.student, eval_src, cfg, self.device, out, step, main, self.world,
                                 self.cross)
                if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
                    self.save(step)
                if interrupted.requested and step < max_steps:  # Ctrl-C during the step: stop between steps
                    logger.warning("interrupted at step %d: writing a checkpoint to resume from", step)
                    self.save(step)
                    raise KeyboardInterrupt
        finally:
            interrupted.restore()
            bar.close()
        self.save(step)
        if not metrics and main:  # resumed at the last step (or logging off): the last row an earlier attempt logged
            metrics = last_logged(out)
        final_eval = eval_and_log(self.student, eval_src, cfg, self.device, out, step, main, self.world,
                                 self.cross) \
            if eval_src else {}
        summary = {"steps": step, "seconds": time.perf_counter() - t_run, "target_tokens": self.tokens,
                   "last": metrics, **final_eval, "output": str(out), "world_size": self.world}
        if main:
            ckpt.save_final(out, self.student.model, lambda d: save_tokenizer(self.student, d))
            atomic_write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=1).encode())  # last: "finished"
        if self.world > 1:
            dist.barrier()
        return summary


def micro_loss(body, head: Head, batch: dict, cfg: TrainConfig, objective: Objective, vocab: int, rule: Rule, *,
               reduction: str = "mean", codec: Codec | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one collated micro-batch (and its metrics): the student's body (``body(batch)``: hidden states
    ``[B, T, H]``), its ``head`` over the target positions in chunks (``student_view``), the token weights
    (``trainers.weighting``) and the objective.

    ``reduction="mean"``: ``sum_i w_i loss_i / sum_i w_i`` over the micro-batch's target positions (the loop's
    loss); ``"sum"``: ``sum_i w_i loss_i`` (for a caller that normalises over several micro-batches itself).
    The metrics are means either way."""
    if reduction not in ("mean", "sum"):
        raise InvalidInputError(f"reduction={reduction!r}: choose 'mean' or 'sum'")
    h = body(batch)
    sel = batch["target_mask"]
    hs = h[sel]
    if hs.shape[0] == 0:  # nothing to learn here; keep every parameter in the graph for DDP
        zero = h.sum() * 0 + head.weight.sum() * 0
        return zero, {"loss": 0.0}
    t = batch_targets(batch, sel, vocab, rule, codec)
    need_entropy = cfg.keep_fraction < 1 and cfg.keep_by == "student_entropy"
    recompute = hs.shape[0] * head.vocab_size * 4 > cfg.head_memory_mb * 2**20
    view = student_view(hs, head, t.support()[0], t.labels, temperature=cfg.temperature,
                        chunk_size=cfg.chunk_size, need_entropy=need_entropy, recompute=recompute,
                        **objective.view_options(t))
    weight, kd, ce = coefficients(batch, sel, cfg, view.entropy)
    loss, metrics = objective(view, t, weight, kd, ce)
    if reduction == "sum":  # reduce() normalised over the positive weights (all of them: weights are >= 0)
        loss = loss * weight.clamp(min=0).sum().to(loss.dtype)
    return loss, metrics


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


def _trace(out: Path, rank: int, step: int, seq_ids: list[str], epoch: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"data-rank{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, "seq_ids": list(seq_ids)}) + "\n")


def _trim(path: Path, keep) -> None:
    """On resume, drop the JSON-lines rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
    path.write_text("".join(r + "\n" for r in rows if keep(json.loads(r))), encoding="utf-8")
