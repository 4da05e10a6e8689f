"""Training from a logitstore cache inside the Hugging Face ``Trainer``, TRL, or a plain accelerate loop.

The pieces, each usable alone (docs/training.md, "Use a logitstore cache from your own trainer"):

- ``CacheDataset(CACHE)``: a map-style ``torch.utils.data.Dataset`` over a cache or a selection (refused,
  as by ``logitstore train``, when it is an unfinished build or a selection with seq ids not in its cache,
  unless ``allow_incomplete`` / ``allow_missing``), one item per sequence (``{"sequence":
  logitstore.Sequence, "weight": float, "length": int}``, ``length`` the tokens kept under ``max_length``).
  Items are decoded a row group at a time and the last ``blocks_kept`` row groups stay decoded, so a
  sampler that walks row groups in order reads each once: ``dataset.sampler(seed)`` is the streaming
  loader's epoch order for one process (``trainers.data``: row groups permuted per epoch, windows of
  ``buffer_size`` sequences shuffled); ``accelerate`` then deals its batches out to the ranks, so every
  sequence is used once per epoch.
- ``dataset.collator()`` (``CacheCollator``): items -> the batch of ``trainers.collate``, the very keys
  ``trainers.loop`` trains on (``pack=True`` packs a micro-batch's sequences into rows of ``max_length``).
- ``DistillationLoss(CACHE, loss=..., tail=..., ...)``: ``loss, metrics = kd(model, batch)``, our trainer's
  micro-batch loss (``trainers.loop.micro_loss``) with every option of ``trainers.config.LOSS_FIELDS``.
  The forward runs through ``model`` itself (a DDP or accelerate wrapper included, so its gradient
  hooks run) with ``output_hidden_states=True`` and ``logits_to_keep=1``: no ``[B, T, V]`` logits;
  the LM head and log-softmax run over the target positions in chunks (``trainers.view``).
- ``DistillationTrainer``: a ``transformers.Trainer`` whose ``compute_loss`` is that loss
  (``DistillationMixin`` puts the same on a Trainer subclass that accepts a torch dataset; TRL 1.16's
  ``SFTTrainer`` does not, but its ``SFTConfig`` is a ``TrainingArguments`` that ``DistillationTrainer``
  takes). It uses the dataset's sampler and collator, logs ``kd``/``ce`` (and TAID's ``taid_t``) next
  to ``loss``, adapts TAID's ``t`` after every optimiser step and keeps it in checkpoints.

What is averaged. Per micro-batch the loss is ``sum_i w_i loss_i / sum_i w_i`` over its target
positions (``w_i``: selection weight times the ``keep_fraction`` mask; docs/losses.md). With
``normalize="micro_batch"`` (the default, as ``logitstore train``) the Trainer divides it by the
number of accumulated micro-batches and DDP averages the gradients over ranks: a step's loss is
the mean over its micro-batches and ranks of their means, exactly our loop's. With
``normalize="step"`` a micro-batch contributes ``sum_i w_i loss_i / N``, ``N`` the target positions
of the whole optimiser step (all its micro-batches, and all ranks when
``average_tokens_across_devices``, the loss then scaled by the number of processes against DDP's
averaging): with unit weights, the token mean over the step, whatever the split into micro-batches
and ranks (what transformers' own causal-LM loss does since 4.46).
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import transformers

from logitstore.errors import InvalidInputError
from logitstore.head import Head
from logitstore.reader import Cache
from logitstore.selection import cache_fingerprint
from trainers.collate import CacheKind, block_of, collate, pack_rows
from trainers.config import LOSS_FIELDS, TrainConfig
from trainers.data import StreamingLoader
from trainers.loop import micro_loss
from trainers.losses import Objective
from trainers.sources import check_usable
from trainers.student import Student, check_student, forward_inputs

logger = logging.getLogger(__name__)

NORMALIZE = ("micro_batch", "step")
OBJECTIVE_FILE = "logitstore_objective.json"  # TAID's state, next to the Trainer's optimizer.pt


class CacheDataset(torch.utils.data.Dataset):
    """One item per (selected) sequence of a cache; see the module docstring."""

    def __init__(self, cache, *, max_length: int | None = None, buffer_size: int = 1024, scores=None,
                 score_columns=(), blocks_kept: int = 4, allow_missing: bool = False, allow_incomplete: bool = False):
        if isinstance(blocks_kept, bool) or not isinstance(blocks_kept, int) or blocks_kept < 1:
            raise InvalidInputError(f"blocks_kept={blocks_kept!r}: must be an integer >= 1")
        cache = cache if isinstance(cache, Cache) else Cache(cache, allow_missing=allow_missing)
        check_usable(cache, "CacheDataset", allow_incomplete)  # an unfinished build, or no sequence, as `train`
        loader = StreamingLoader(cache, batch_size=1, max_length=max_length, buffer_size=buffer_size, rank=0,
                                 world_size=1, scores=scores, score_columns=score_columns)
        self.source, self.max_length, self.blocks_kept = loader.source, max_length, blocks_kept
        self.kind = CacheKind.of(self.source.cache)
        self._blocks: collections.OrderedDict = collections.OrderedDict()
        self._pid, self.epoch = os.getpid(), 0

    @property
    def cache(self) -> Cache:
        return self.source.cache

    def __len__(self) -> int:
        return len(self.source)

    def __getstate__(self):  # a DataLoader worker (spawn) reopens the cache; decoded blocks stay behind
        return {**self.__dict__, "_blocks": collections.OrderedDict(), "_pid": None}

    def __getitem__(self, i: int) -> dict:
        src = self.source
        if not 0 <= int(i) < len(src):
            raise IndexError(f"index {i} out of range for {len(src)} sequences")
        if self._pid != os.getpid():  # a worker process: its own file handles
            src.open_again()
            self._blocks.clear()
            self._pid = os.getpid()
        g = int(src.group[i])
        if g not in self._blocks:
            members = np.arange(src.gstart[g], src.gstart[g] + src.gcount[g])  # the row group's selected rows
            self._blocks[g] = (src.decode(members), int(members[0]))
            while len(self._blocks) > self.blocks_kept:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(g)
        (block, where), first = self._blocks[g]
        return {"sequence": block.sequence(int(where[int(i) - first])), "weight": float(src.weight[i]),
                "length": int(src.length[i])}

    def sampler(self, *, seed: int = 0, shuffle: bool = True) -> CacheSampler:
        """The streaming loader's order of one process (``shuffle=False``: storage order), in the epoch that
        ``set_epoch`` (of the sampler or of this dataset) last set."""
        return CacheSampler(self.source.with_settings(seed=int(seed), shuffle=bool(shuffle)), self)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of this dataset's samplers. accelerate calls it on the dataset when the sampler sits under its
        ``BatchSamplerShard`` (DDP), where it cannot reach the sampler itself."""
        self.epoch = int(epoch)

    def collator(self, *, pack: bool = False) -> CacheCollator:
        if pack and self.max_length is None:
            raise InvalidInputError("pack=True needs the dataset's max_length (the length of a packed row)")
        return CacheCollator(self.kind, max_length=self.max_length, pack=pack, scores=self.source.scores,
                             score_names=list(self.source.score_names))


class CacheSampler(torch.utils.data.Sampler):
    """Indices of a ``CacheDataset`` in the streaming loader's order of the dataset's current epoch."""

    def __init__(self, source, dataset: CacheDataset):
        self.source, self.dataset = source, dataset

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        return iter(self.source.plan(self.epoch, 0, 1).order.tolist())


class CacheCollator:
    """``CacheDataset`` items -> one batch of ``trainers.collate`` (``epoch`` is None: the sampler owns epochs)."""

    def __init__(self, kind: CacheKind, *, max_length: int | None, pack: bool = False, scores=None,
                 score_names=()):
        self.kind, self.max_length, self.pack = kind, max_length, pack
        self.scores, self.score_names = scores or {}, list(score_names)

    def __call__(self, items: list[dict]) -> dict:
        if not items or any(not isinstance(it, dict) or "sequence" not in it for it in items):
            raise InvalidInputError("CacheCollator takes a non-empty list of CacheDataset items")
        seqs = [it["sequence"] for it in items]
        n = len(seqs)
        length = np.array([it["length"] for it in items], np.int64)
        row, off = pack_rows(length, self.max_length) if self.pack else (np.arange(n), np.zeros(n, np.int64))
        return collate([(block_of(seqs), np.arange(n), np.arange(n))], kind=self.kind,
                       seq_ids=[s.seq_id for s in seqs], length=length, row=row, offset=off,
                       weight=np.array([it["weight"] for it in items], np.float32), scores=self.scores,
                       score_names=self.score_names)


def unwrap(model):
    """The model inside DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


class DistillationLoss:
    """Our trainer's loss of one collated micro-batch, for any loop: ``loss, metrics = kd(model, batch)``.

    ``cache``: the cache or selection the batches come from (its rule, vocabulary and fingerprint);
    ``options``: fields of ``trainers.config.LOSS_FIELDS`` (``loss``, ``tail``, ``estimator``, ``temperature``,
    ``ce_weight``, ``beta``, ``alpha``, ``taid_*``, ``keep_fraction``, ``keep_by``, ``keep_lowest``,
    ``scores``, ``route``, ``chunk_size``, ``head_memory_mb``), or ``config=TrainConfig(...)`` (its
    loss fields are used). ``total_steps`` lays out TAID's linear floor (the Trainer sets it).
    """

    def __init__(self, cache, *, config: TrainConfig | None = None, total_steps: int | None = None, **options):
        unknown = sorted(set(options) - set(LOSS_FIELDS))
        if unknown:
            raise InvalidInputError(f"DistillationLoss: unknown option(s) {unknown}; the loss takes "
                                    f"{', '.join(LOSS_FIELDS)} (batch size, steps and the optimiser are the "
                                    "Trainer's)")
        cfg = (config or TrainConfig()).replace(**options).validate_loss()
        if cfg.cross_tokenizer:
            raise InvalidInputError(f"--cross-tokenizer {cfg.cross_tokenizer}: trainers.hf trains a student with the "
                                    "cache's tokenizer; a student with another tokenizer trains with logitstore train "
                                    "--cross-tokenizer")
        # only its manifest is used (rule, vocabulary, fingerprint): the datasets check their selections' seq ids
        self.cache = cache if isinstance(cache, Cache) else Cache(cache, allow_missing=True)
        self.config, self.rule, self.vocab = cfg, self.cache.rule, int(self.cache.manifest.vocab_size)
        cfg.check_rule(self.rule.name, str(self.cache.path), self.cache.manifest.exactness)
        self.objective = Objective.from_config(cfg, self.rule.name, total_steps)
        self._keeps_logits: dict[type, bool] = {}

    def check_model(self, model, tokenizer=None) -> None:
        """Refuse a model whose tokenizer (when given) or vocabulary does not fit the cache (``trainers.student``)."""
        model = unwrap(model)
        head = Head.of(model)
        if head is None:
            raise InvalidInputError(f"{type(model).__name__} exposes no separate LM head; the loss applies the head "
                                    "to hidden states itself")
        check_student(Student(model=model, head=head, tokenizer=tokenizer, tokenizer_dir=None,
                              source=type(model).__name__, fresh=tokenizer is None), self.cache)

    def hidden(self, model, batch: dict) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` through ``model``'s own forward (wrappers' hooks run), logits of one
        position only where the model takes ``logits_to_keep``."""
        base = unwrap(model)
        keep = self._keeps_logits.get(type(base))
        if keep is None:
            keep = self._keeps_logits[type(base)] = "logits_to_keep" in inspect.signature(base.forward).parameters
        extra = {"logits_to_keep": 1} if keep else {}
        out = model(**forward_inputs(batch, next(base.parameters()).dtype), output_hidden_states=True,
                    return_dict=True, **extra)
        return out.hidden_states[-1]

    def __call__(self, model, batch: dict, *, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of a collated batch on ``model`` (a transformers causal LM, possibly wrapped); see
        ``trainers.loop.micro_loss`` for ``reduction``."""
        head = Head.of(unwrap(model))
        if head is None:
            raise InvalidInputError(f"{type(unwrap(model)).__name__} exposes no separate LM head")
        return micro_loss(lambda b: self.hidden(model, b), head, batch, self.config, self.objective, self.vocab,
                          self.rule, reduction=reduction, codec=self.cache.codec)


class DistillationMixin:
    """``compute_loss`` = ``DistillationLoss`` on any ``transformers.Trainer`` subclass (module docstring).

    Keywords: ``distillation`` (a ``DistillationLoss``; default: ``forward_kl`` on the training dataset's
    cache) and ``normalize`` (``"micro_batch"`` or ``"step"``). A ``CacheDataset`` brings its collator
    and sampler (seeded by ``args.data_seed`` or ``args.seed``)."""

    def __init__(self, *args, distillation: DistillationLoss | None = None, normalize: str = "micro_batch",
                 **kwargs):
        if normalize not in NORMALIZE:
            raise InvalidInputError(f"normalize={normalize!r}: choose {' or '.join(NORMALIZE)}")
        if normalize == "step" and not hasattr(transformers.Trainer, "_get_num_items_in_batch"):
            raise InvalidInputError(f"normalize='step' needs a transformers whose Trainer counts the step's items "
                                    f"(_get_num_items_in_batch); {transformers.__version__} does not: use "
                                    "normalize='micro_batch' or upgrade transformers")
        train = kwargs.get("train_dataset")
        if distillation is None:
            if not isinstance(train, CacheDataset):
                raise InvalidInputError("give distillation=DistillationLoss(CACHE, ...) or a CacheDataset as "
                                        "train_dataset")
            distillation = DistillationLoss(train.cache)
        evals = kwargs.get("eval_dataset")
        evals = evals.values() if isinstance(evals, dict) else [evals]
        want = cache_fingerprint(distillation.cache.manifest)
        for name, ds in [("train_dataset", train)] + [("eval_dataset", e) for e in evals]:
            if isinstance(ds, CacheDataset) and cache_fingerprint(ds.cache.manifest) != want:
                raise InvalidInputError(f"{name} reads {ds.cache.path}, another cache than the loss's "
                                        f"{distillation.cache.path}; give both the same cache (or selections of it)")
        if kwargs.get("data_collator") is None and isinstance(train, CacheDataset):
            kwargs["data_collator"] = train.collator()
        super().__init__(*args, **kwargs)
        self.distillation, self.normalize = distillation, normalize
        # the Trainer divides a per-micro-batch mean by the accumulation steps, and uses a step-normalised loss as is
        self.loss_is_scaled_for_ga = normalize == "step"
        self.model_accepts_loss_kwargs = normalize == "step"  # the same switch on transformers before 5.0
        distillation.check_model(self.model, getattr(self, "processing_class", None))
        self._sums: dict[str, float] = {}
        self._since_step: dict[str, float] = {}
        self.add_callback(_StepEnd(self))

    # ------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        ds = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(ds, CacheDataset):
            return ds.sampler(seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        if isinstance(eval_dataset, CacheDataset):
            return eval_dataset.sampler(shuffle=False)
        return super()._get_eval_sampler(eval_dataset)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        if isinstance(data_collator, CacheCollator):  # its items are not model inputs; nothing to remove
            return data_collator
        return super()._get_collator_with_removed_columns(data_collator, description)

    def _get_num_items_in_batch(self, batch_samples, device):
        """The target positions of an optimiser step (summed over ranks with ``average_tokens_across_devices``)."""
        n = torch.tensor(sum(int(b["target_mask"].sum()) for b in batch_samples), device=device)
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    # ------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.normalize == "step" and model.training and num_items_in_batch is not None
        with self.accelerator.autocast():
            loss, metrics = self.distillation(model, inputs, reduction="sum" if step else "mean")
        if step:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1).to(loss.dtype)
            if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over the processes
        if model.training:
            for k in ("kd", "ce"):
                if k in metrics:
                    self._since_step[k] = self._since_step.get(k, 0.0) + metrics[k]
                    self._since_step[k + "_n"] = self._since_step.get(k + "_n", 0.0) + 1
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss only (no ``[B, T, V]`` logits are gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast():
            loss, _ = self.distillation(model, inputs)
        return loss.detach(), None, None

    def end_step(self) -> None:
        """After an optimiser step: the step's mean kd/ce (over micro-batches and ranks) feed TAID and the logs."""
        acc, self._since_step = self._since_step, {}
        # [kd sum, kd count, ce sum, ce count], the same shape on every rank (one collective per step)
        v = torch.tensor([acc.get("kd", 0.0), acc.get("kd_n", 0.0), acc.get("ce", 0.0), acc.get("ce_n", 0.0)],
                         dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            v = self.accelerator.reduce(v, reduction="sum")
        kd_sum, kd_n, ce_sum, ce_n = v.tolist()
        step = {k: s / n for k, s, n in (("kd", kd_sum, kd_n), ("ce", ce_sum, ce_n)) if n}
        if not step:
            return
        self.distillation.objective.step_end(step.get("kd", step.get("ce")), self.state.global_step - 1)
        for k, x in step.items():
            self._sums[k] = self._sums.get(k, 0.0) + x
            self._sums[k + "_steps"] = self._sums.get(k + "_steps", 0.0) + 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs gain ``kd`` and ``ce`` (means over the steps since the last log) and TAID's ``taid_t``."""
        if "loss" in logs and self._sums:
            sums, self._sums = self._sums, {}
            logs.update({k: sums[k] / sums[k + "_steps"] for k in ("kd", "ce") if sums.get(k + "_steps")})
            if self.distillation.objective.loss == "taid":
                logs["taid_t"] = self.distillation.objective.taid_t
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ TAID's state in checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            Path(output_dir, OBJECTIVE_FILE).write_text(json.dumps(self.distillation.objective.state_dict()))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and Path(checkpoint, OBJECTIVE_FILE).is_file():
            self.distillation.objective.load_state_dict(json.loads(Path(checkpoint, OBJECTIVE_FILE).read_text()))


class _StepEnd(transformers.TrainerCallback):
    """Lays TAID's schedule over the run's steps, and closes every optimiser step (``DistillationMixin.end_step``)."""

    def __init__(self, trainer: DistillationMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.max_steps > 0:
            self.trainer.distillation.objective.total_steps = int(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_step()


class DistillationTrainer(DistillationMixin, transformers.Trainer):
    """``transformers.Trainer`` training on a logitstore cache with our loss (module docstring)."""
