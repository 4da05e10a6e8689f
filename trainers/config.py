"""The training configuration: one typed dataclass, whose field help becomes ``logitstore train --help``.

Every option of a training run lives in ``TrainConfig``; the command line (``tools.cli.train``,
one flag per field), the sweep file (``trainers.sweep``) and the Python API all fill the same dataclass, and
``validate()`` checks it once with messages that name the command-line flag. A run
writes its config into ``OUT/train_config.json``, so a checkpoint says how it was made,
and resume refuses a config that changed anything that shapes the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from logitstore.errors import InvalidInputError
from logitstore.format import SAMPLING_RULES

#: The distillation losses and tail policies, by name: the one list (trainers.losses implements each; this
#: module stays free of torch, so the command line builds its parser fast).
LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "taid", "ce")
TAILS = ("other", "renormalize", "sampled", "sampled_label", "label", "residual", "entropy")
SAMPLED_TAILS = ("sampled", "sampled_label")  # the unbiased estimators: caches with draws, forward_kl at T = 1
ESTIMATORS = ("auto", "counts", "inclusion")  # how the sampled tails weigh a draw (SparseTargets.estimate)

KEEP_BY = ("teacher_entropy", "student_entropy")  # or "score:<column>" of a `logitstore score` directory
ROUTES = ("none", "correctness")
CROSS = ("alm", "gold", "nextbyte")  # cross-tokenizer methods (trainers.cross)
ALM_MODES = ("plain", "append_space", "merge_by_space_prob", "merge_by_space_prob+append_space")  # tokenkit's names
NEXTBYTE_AT = ("chunks", "tokens")  # where nextbyte compares next-byte distributions (trainers.cross)
DTYPES = ("auto", "fp32", "bf16")


def _bad(flag: str, value: Any, allowed: str) -> InvalidInputError:
    return InvalidInputError(f"--{flag.replace('_', '-')} {value!r}: {allowed}")


def _f(default: Any, help: str, **kw) -> Any:  # noqa: A002 - the argparse word
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    cache: str = _f("", "CACHE or SELECTION to train from", positional=True)
    student: str = _f("", "a local HF model directory, or a config.json from which a fresh student is initialised "
                          "(seeded by --seed)")
    output: str = _f("", "OUT directory: the final model (save_pretrained), checkpoints, metrics.jsonl")
    loss: str = _f("forward_kl", f"distillation loss: {', '.join(LOSSES)}")
    tail: str = _f("auto", "teacher tail handling: 'other' (an exact bucket for the mass outside the stored "
                           "entries), 'label' (the label's own exact bucket, then 'other'), 'renormalize' (both "
                           "sides restricted to the stored entries), 'sampled' (the unbiased estimator of a cache "
                           "with draws: --sample or --tail-draws; forward_kl), 'sampled_label' (the same with the "
                           "label's exact target in place of its draws: unbiased, lower variance), 'residual' "
                           "(RS-KD: the tail mass on the label; forward_kl), 'entropy' (the 'other' bucket, its "
                           "mass spread as the student's own tail re-tempered to the teacher's exact entropy there: "
                           "top-k caches; forward_kl); auto: sampled for caches with draws and forward_kl, else "
                           "other")
    estimator: str = _f("auto", "with --tail sampled or sampled_label: how a draw is weighed: 'counts' (by how "
                                "often it was drawn, (c/D) p/q) or 'inclusion' (by whether it was drawn at all, "
                                "p / pi with pi = 1 - (1 - q)^D, or min(1, D q) for systematic draws: "
                                "Horvitz-Thompson, never more variable per token; needs the draws' logprobs); both "
                                "unbiased; auto: inclusion where the cache stores the draws' logprobs, else counts")
    temperature: float = _f(1.0, "distillation temperature tau: teacher and student re-tempered, KD term scaled "
                                 "by tau^2 (the cache holds temperature-1 logprobs)")
    ce_weight: float = _f(0.0, "weight lambda of the label cross-entropy: loss = (1-lambda) KD + lambda CE")
    beta: float = _f(0.5, "jsd: the mixture weight beta of the generalized JSD")
    alpha: float = _f(0.1, "skew_kl / skew_rkl: the skew alpha")
    taid_start: float = _f(0.4, "taid: the interpolation weight t at step 0")
    taid_end: float = _f(1.0, "taid: the final t")
    max_steps: int = _f(1000, "optimiser steps to train")
    epochs: float = _f(0.0, "stop after this many epochs of the data as well (0: only --max-steps)")
    batch_size: int = _f(8, "sequences (or packed rows with --pack) per micro-batch and rank")
    grad_accum: int = _f(1, "micro-batches per optimiser step")
    max_length: int = _f(2048, "longer sequences are truncated to this many tokens")
    pack: bool = _f(False, "pack short sequences into rows of --max-length tokens (attention kept per sequence)")
    lr: float = _f(3e-4, "peak learning rate of AdamW")
    min_lr_ratio: float = _f(0.1, "the cosine decays to lr * this")
    warmup_steps: int = _f(0, "linear warm-up steps (default: 5%% of --max-steps)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = _f(0, "seed of initialisation, data order and dropout")
    dtype: str = _f("auto", "fp32, bf16 (autocast), or auto: bf16 where the hardware has it (CUDA), else fp32")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    holdout: float = _f(0.0, "hold out this fraction of the training sequences (by a seeded hash of seq_id) "
                             "for evaluation when no --eval is given")
    eval: str = _f("", "a CACHE or SELECTION to evaluate on (held-out CE and KL to the teacher)")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end)")
    eval_sequences: int = _f(0, "evaluate on at most this many sequences (0: all)")
    save_every: int = _f(0, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep")
    resume: bool = _f(False, "continue from the last checkpoint in OUT (exactly: model, optimiser, schedule, "
                             "data order, random state)")
    force: bool = _f(False, "start over in an OUT that holds an earlier run of logitstore's, deleting that run's "
                            "files (only those: OUT is refused if it holds anything else)")
    allow_missing: bool = _f(False, "train on a selection whose seq ids are not all in its cache, using those that "
                                    "are (default: refuse it, as a sign it was edited or made from another cache)")
    allow_incomplete: bool = _f(False, "train on an unfinished build (manifest complete: false), on the sequences "
                                       "committed so far (default: refuse it)")
    mix_cache: str = _f("", "a second CACHE or SELECTION (e.g. off-policy data) mixed in per batch: each batch comes "
                            "from CACHE with probability --mix-ratio, else from this one (GKD's lambda); same rule, "
                            "vocabulary and tokenizer as CACHE")
    mix_ratio: float = _f(0.5, "with --mix-cache: the fraction lambda of batches drawn from CACHE (1: CACHE only, 0: "
                               "--mix-cache only); which batch comes from where is seeded by --seed")
    keep_fraction: float = _f(1.0, "train on this fraction of each batch's target tokens, chosen by --keep-by")
    keep_by: str = _f("teacher_entropy", "rank tokens by teacher_entropy, student_entropy or score:COLUMN "
                                         "(a column of --scores)")
    keep_lowest: bool = _f(False, "keep the lowest-ranked tokens instead of the highest")
    scores: str = _f("", "a directory written by `logitstore score` (for --keep-by score:COLUMN)")
    route: str = _f("none", "'correctness': KD on sequences the verifier marked incorrect, CE on correct ones")
    chunk_size: int = _f(1024, "positions per chunk of the student's head and log-softmax (bounds memory at "
                               "large vocabularies)")
    head_memory_mb: int = _f(1024, "keep the student's logits of a micro-batch for the backward pass when they "
                                   "fit in this many MB (fastest); beyond it, each chunk is recomputed in the "
                                   "backward pass (one more head matmul) so memory stays at one [chunk, V]")
    num_workers: int = _f(0, "DataLoader worker processes per rank")
    shuffle_buffer: int = _f(1024, "sequences shuffled together inside each rank's part of the data")
    log_every: int = _f(10, "write metrics every N steps")
    tokenizer: str = _f("", "the student's tokenizer directory, for a config.json student without one beside it "
                            "(default: the student's directory, else the cache's tokenizer when it is a local "
                            "directory and the student shares it); also spelled --student-tokenizer",
                        aliases=("--student-tokenizer",))
    cross_tokenizer: str = _f("", "train a student whose tokenizer differs from the teacher's: 'alm' (approximate "
                                  "likelihood matching of aligned text chunks), 'gold' (the cached distribution "
                                  "through a vocabulary match on aligned one-token chunks, ULD elsewhere) or "
                                  "'nextbyte' (both models' next-byte distributions at every aligned token "
                                  "boundary, in place of that token's CE; give --ce-weight, e.g. 0.5); evaluation in "
                                  "bits per byte")
    teacher_tokenizer: str = _f("", "with --cross-tokenizer: the teacher's tokenizer directory, when the cache's "
                                    "tokenizer record does not name a local one (its fingerprint must match)")
    alm_temperature: float = _f(100.0, "with --cross-tokenizer alm: the binarisation temperature tau of chunk "
                                       "likelihoods")
    alm_mode: str = _f("plain", "with --cross-tokenizer alm: 'plain' (each aligned chunk's likelihood), "
                                "'append_space' (each chunk's likelihood times the probability that the next token "
                                "starts with a space: the event 'this text, then a word ends'), "
                                "'merge_by_space_prob' (chunks joined until one ends where the teacher gives a space "
                                "next at least --alm-space-threshold), or both joined by '+' (the ALM authors' "
                                "recommended form); the teacher's space probability is the sum over the cached "
                                "entries (exact for an exact head; a lower bound by at most the tail mass)")
    alm_space_threshold: float = _f(0.1, "with --alm-mode merge_by_space_prob: the teacher's probability of a space "
                                         "next at which a chunk may close")
    gradmag: bool = _f(False, "with --cross-tokenizer and --ce-weight lambda in (0, 1): weigh the KD and CE losses "
                              "so that their gradients w.r.t. the student's final hidden states have norms in the "
                              "ratio (1 - lambda) : lambda, keeping the harmonic-mean magnitude (GradMag, the ALM "
                              "paper's balancing; lambda 0.5 weighs them equally)")
    nextbyte_at: str = _f("chunks", "with --cross-tokenizer nextbyte: where the next-byte distributions are compared: "
                                    "'chunks' (where both tokenizations start a token) or 'tokens' (at every "
                                    "student token of the target text; inside a teacher token, the teacher's side "
                                    "is its distribution at the token's start given the bytes so far)")
    skip_verify: bool = _f(False, "do not check the cache's shard checksums, schema and counts before training "
                                  "(pages are still checked by their CRCs while reading)")
    skip_bad_shards: bool = _f(False, "train on the sound shards of a damaged cache, leaving out (and naming) the "
                                      "damaged ones; without it a damaged cache is refused")
    trace_data: bool = _f(False, "write OUT/data-rank<R>.jsonl: the seq ids each rank trained on, per step (audit)")
    quiet: bool = _f(False, "no progress bar")

    def resolved_tail(self, rule: str) -> str:
        if self.tail != "auto":
            return self.tail
        return "sampled" if rule in SAMPLING_RULES and self.loss == "forward_kl" and \
            self.temperature == 1.0 else "other"

    def check_rule(self, rule: str, cache: str, exactness: dict[str, str] | None = None) -> None:
        """Refuse a tail policy the cache ``cache`` (sparse-entry rule named ``rule``, fields as exact as its
        manifest's ``exactness`` says) cannot serve."""
        entropy = (exactness or {}).get("entropy", "exact")
        if self.loss != "ce" and self.resolved_tail(rule) == "entropy" and entropy not in ("exact", "quantised"):
            raise InvalidInputError(f"--tail entropy needs the teacher's exact entropy; {cache} stores it as "
                                    f"{entropy!r} (a vLLM build stores a bound): use --tail other")
        if self.resolved_tail(rule) in SAMPLED_TAILS and rule not in SAMPLING_RULES:
            raise InvalidInputError(f"--tail {self.resolved_tail(rule)} needs a cache with draws (built with "
                                    f"--sample D or --top-k K --tail-draws D); {cache} has rule {rule!r}: use "
                                    "--tail other, label or renormalize")
        if self.estimator == "inclusion" and self.resolved_tail(rule) not in SAMPLED_TAILS:
            raise InvalidInputError(f"--estimator {self.estimator} weighs the draws of --tail sampled or "
                                    f"sampled_label; this run's tail is {self.resolved_tail(rule)!r}")

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else max(0, self.max_steps // 20)

    def validate(self) -> TrainConfig:
        self._check_types()
        for name in ("cache", "student", "output"):
            if not getattr(self, name):
                raise InvalidInputError(f"{'CACHE' if name == 'cache' else '--' + name} is required")
        if self.force and self.resume:
            raise InvalidInputError("--force starts OUT over and --resume continues it: give one of them")
        self.validate_loss()
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "log_every", "shuffle_buffer",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "must be >= 1")
        for name in ("eval_every", "save_every", "warmup_steps", "num_workers", "eval_sequences"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "must be >= 0")
        if not 0 <= self.holdout < 1:
            raise _bad("holdout", self.holdout, "must be in [0, 1)")
        if self.epochs < 0:
            raise _bad("epochs", self.epochs, "must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise InvalidInputError(f"--lr {self.lr} must be > 0 and --min-lr-ratio {self.min_lr_ratio} in [0, 1]")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"choose from {', '.join(DTYPES)}")
        if self.eval and self.holdout:
            raise InvalidInputError("give --eval or --holdout, not both")
        if not 0 <= self.mix_ratio <= 1:
            raise _bad("mix_ratio", self.mix_ratio, "must be in [0, 1] (the fraction of batches from CACHE)")
        if self.mix_cache and self.epochs:
            raise InvalidInputError("--epochs counts passes over one cache; with --mix-cache give --max-steps only")
        if self.cross_tokenizer:
            self._validate_cross(_bad)
        elif self.teacher_tokenizer:
            raise InvalidInputError("--teacher-tokenizer goes with --cross-tokenizer")
        elif self.gradmag or self.alm_mode != "plain" or self.nextbyte_at != "chunks":
            flag = "--gradmag" if self.gradmag else "--alm-mode" if self.alm_mode != "plain" else "--nextbyte-at"
            raise InvalidInputError(f"{flag} goes with --cross-tokenizer")
        return self

    def validate_loss(self) -> TrainConfig:
        """Check the ``LOSS_FIELDS`` only (what shapes one micro-batch's loss; ``validate`` checks everything)."""
        self._check_types()
        if self.loss not in LOSSES:
            raise _bad("loss", self.loss, f"choose from {', '.join(LOSSES)}")
        if self.tail != "auto" and self.tail not in TAILS:
            raise _bad("tail", self.tail, f"choose from auto, {', '.join(TAILS)}")
        if self.estimator not in ESTIMATORS:
            raise _bad("estimator", self.estimator, f"choose from {', '.join(ESTIMATORS)}")
        if self.chunk_size < 1:
            raise _bad("chunk_size", self.chunk_size, "must be >= 1")
        if self.head_memory_mb < 0:
            raise _bad("head_memory_mb", self.head_memory_mb, "must be >= 0")
        if not self.temperature > 0:
            raise _bad("temperature", self.temperature, "must be > 0")
        if not 0 <= self.ce_weight <= 1:
            raise _bad("ce_weight", self.ce_weight, "must be in [0, 1]")
        if not 0 < self.keep_fraction <= 1:
            raise _bad("keep_fraction", self.keep_fraction, "must be in (0, 1]")
        if self.keep_by not in KEEP_BY and not self.keep_by.startswith("score:"):
            raise _bad("keep_by", self.keep_by, f"choose from {', '.join(KEEP_BY)} or score:COLUMN")
        if self.keep_by.startswith("score:") and self.keep_fraction < 1 and not self.scores:
            raise InvalidInputError(f"--keep-by {self.keep_by} needs --scores SCORES (from `logitstore score`)")
        if self.route not in ROUTES:
            raise _bad("route", self.route, f"choose from {', '.join(ROUTES)}")
        return self

    def _validate_cross(self, bad) -> None:
        if self.cross_tokenizer not in CROSS:
            raise bad("cross_tokenizer", self.cross_tokenizer, f"choose from {', '.join(CROSS)}")
        if not self.alm_temperature > 0:
            raise bad("alm_temperature", self.alm_temperature, "must be > 0")
        if self.alm_mode not in ALM_MODES:
            raise bad("alm_mode", self.alm_mode, f"choose from {', '.join(ALM_MODES)}")
        if self.alm_mode != "plain" and self.cross_tokenizer != "alm":
            raise bad("alm_mode", self.alm_mode, "goes with --cross-tokenizer alm")
        if not 0 < self.alm_space_threshold < 1:
            raise bad("alm_space_threshold", self.alm_space_threshold, "must be in (0, 1)")
        if self.gradmag and not 0 < self.ce_weight < 1:
            raise bad("ce_weight", self.ce_weight, "--gradmag balances KD and CE: give --ce-weight in (0, 1)")
        if self.gradmag and self.cross_tokenizer == "nextbyte":
            raise bad("gradmag", True, "goes with --cross-tokenizer alm or gold (nextbyte weighs KD and CE per "
                                       "token by --ce-weight)")
        if self.nextbyte_at not in NEXTBYTE_AT:
            raise bad("nextbyte_at", self.nextbyte_at, f"choose from {', '.join(NEXTBYTE_AT)}")
        if self.nextbyte_at != "chunks" and self.cross_tokenizer != "nextbyte":
            raise bad("nextbyte_at", self.nextbyte_at, "goes with --cross-tokenizer nextbyte")
        if self.gradmag and self.loss == "ce":
            raise bad("loss", self.loss, "--gradmag balances KD and CE: --loss ce has no KD term")
        unsupported = [(self.pack, "--pack"), (self.keep_fraction < 1, "--keep-fraction"),
                       (self.route != "none", "--route"), (self.tail != "auto", "--tail"),
                       (self.temperature != 1.0, "--temperature"), (bool(self.scores), "--scores")]
        for used, flag in unsupported:
            if used:
                raise InvalidInputError(f"{flag} is not available with --cross-tokenizer (the teacher's tokens are "
                                        "aligned with the student's by chunks, not positions)")
        if self.cross_tokenizer == "alm" and self.loss not in ("forward_kl", "ce"):
            raise bad("loss", self.loss, "with --cross-tokenizer alm the divergence is ALM's binarised KL: leave "
                                         "--loss at forward_kl, or ce for the student's cross-entropy alone")

    def _check_types(self) -> None:
        """Every option has its field's type (a sweep file can give "10" or [1]), and every float is finite
        (``--lr nan`` passes every comparison it fails)."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else f.type.__name__
            ok = {"bool": type(v) is bool, "int": type(v) is int, "str": isinstance(v, str),
                  "float": type(v) in (int, float)}[kind]
            flag = f"--{f.name.replace('_', '-')}" if not f.metadata.get("positional") else "CACHE"
            if not ok:
                raise InvalidInputError(f"{flag} {v!r:.60}: must be {'a' if kind != 'int' else 'an'} {kind}, got "
                                        f"{type(v).__name__}")
            if kind == "float" and not math.isfinite(v):
                raise InvalidInputError(f"{flag} {v!r}: must be a finite number")

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidInputError(f"{where}: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


#: The options that shape the loss of one micro-batch: what ``trainers.hf`` (the Hugging Face Trainer integration)
#: takes, the rest being the Trainer's own arguments.
LOSS_FIELDS = ("loss", "tail", "estimator", "temperature", "ce_weight", "beta", "alpha", "taid_start", "taid_end",
               "keep_fraction", "keep_by", "keep_lowest", "scores", "route", "chunk_size", "head_memory_mb")

#: settings that name a file or directory: a resume compares where they point, not how they were spelled
PATH_FIELDS = ("cache", "student", "eval", "mix_cache", "scores", "tokenizer", "teacher_tokenizer")


def where(value: Any) -> Any:
    """A path setting as the place it names (absolute, symlinks resolved) where it names a local file or directory;
    anything else (empty, a URL such as ``s3://...``, a hub id) as it is."""
    if not isinstance(value, str) or not value or "://" in value or not os.path.exists(value):
        return value
    return os.path.realpath(value)


def placed(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a ``TrainConfig.to_dict()``, or part of one) with its ``PATH_FIELDS`` as the places they name."""
    return {k: where(v) if k in PATH_FIELDS else v for k, v in settings.items()}


#: Options that may differ between a run and its resumption (they do not shape the trajectory).
RESUMABLE_CHANGES = ("output", "max_steps", "resume", "quiet", "log_every", "eval_every", "save_every",
                     "keep_checkpoints", "eval", "eval_sequences", "device", "trace_data", "skip_verify", "force",
                     "allow_missing", "allow_incomplete")
