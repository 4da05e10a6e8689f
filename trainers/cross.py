"""Cross-tokenizer students (``train --cross-tokenizer alm|gold``): the piece the training loop plugs in.

``CrossTokenizer(cfg, manifest, student)`` turns each teacher batch of the streaming loader into
a student batch (``prepare``): per sequence, the text is rebuilt from the teacher's tokens, encoded
with the student's tokenizer and cut into aligned chunks (``trainers.align``); then it gives the
loss of a micro-batch (``loss``) and the held-out evaluation (``evaluate``). The student's body and
head run as for any student (``trainers.view.student_view``, chunked).

- ``alm``: per chunk ``alm_kl(t_c, s_c)`` (``trainers.xlosses``), t_c the sum of the teacher's exact
  ``label_logprob`` over the chunk's teacher tokens (stored for every cached position), s_c the
  student's; ``loss = (1 - ce_weight) mean_c alm_kl + ce_weight mean_u CE_u`` over student tokens u.
  ``--loss ce``: the student's cross-entropy alone (the baseline on the same text and tokens).
- ``gold`` (after TRL's GOLD trainer, which matches vocabularies by token string and falls back to
  ULD; Boizard et al. 2024): on a one-token chunk (one teacher token and one student token, so the
  same bytes), the cached entries are mapped to student ids by a vocabulary match on token bytes
  (special tokens by content) and ``--loss`` (default forward KL) is taken over the matched ids plus
  one bucket for the rest (``trainers.losses.buckets``); on every other chunk, ULD's sorted L1
  between the teacher's distribution at the chunk's first position (top K and tail mass) and the
  student's, each scaled by the probability of the rest of the chunk along the text (GOLD's merge of
  a multi-token group: the first marginal times the actual continuation's probability).

Evaluation is in bits per byte over the target text (``trainers.align.roles``): ``eval_bpb`` the
student's, ``eval_teacher_bpb`` the teacher's on the same bytes (special tokens' chunks spell no text
and are left out), ``eval_ce`` nats per student token. The teacher tokenizer comes from the cache's
tokenizer record (a local directory) or ``--teacher-tokenizer``; its fingerprint must match.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from logitstore.errors import InvalidInputError, TokenizerMismatchError
from logitstore.identity import tokenizer_fingerprint
from trainers.align import TokenBytes, align
from trainers.losses import reduce
from trainers.targets import SparseTargets
from trainers.view import StudentView, student_view
from trainers.xlosses import alm_kl, sorted_l1

logger = logging.getLogger(__name__)


def load_teacher_tokenizer(manifest, flag: str = ""):
    """The cache's teacher tokenizer: ``flag`` (``--teacher-tokenizer``), else the tokenizer record's name when
    it is a local directory or in the local Hugging Face cache; its fingerprint must be the cache's."""
    from transformers import AutoTokenizer

    rec = manifest.tokenizer or {}
    name, want = flag or rec.get("name", ""), rec.get("fingerprint")
    how = "--teacher-tokenizer" if flag else "the cache's tokenizer record"
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True) if name else None
    except (OSError, ValueError) as exc:
        logger.debug("cannot load %s: %s", name, exc)
        tok = None
    if tok is None:
        raise InvalidInputError(f"{how} names tokenizer {name!r}, which is not available locally; pass "
                                f"--teacher-tokenizer DIR (a directory with the teacher's tokenizer files, "
                                f"fingerprint {want})")
    got = tokenizer_fingerprint(tok)
    if want and got != want:
        raise TokenizerMismatchError(f"{how}: tokenizer {name} has fingerprint {got}, the cache was built with "
                                     f"{want}; give the teacher's own tokenizer")
    return tok


def vocab_match(teacher: TokenBytes, student: TokenBytes) -> np.ndarray:
    """GOLD's vocabulary match: teacher id -> the student id spelling the same bytes (special tokens: the same
    content), -1 where the student has none; ``[V_teacher]``."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(student.table):
        if b and not student.special[i]:
            by_bytes.setdefault(b, i)
    out = np.full(len(teacher.table), -1, np.int64)
    for i, b in enumerate(teacher.table):
        if teacher.special[i]:
            out[i] = student.specials.get(teacher.content_of[i], -1)
        elif b:
            out[i] = by_bytes.get(b, -1)
    return out


class CrossTokenizer:
    """The cross-tokenizer path of one run (module docstring)."""

    def __init__(self, cfg, manifest, student):
        if student.tokenizer is None:
            raise InvalidInputError(f"--cross-tokenizer needs the student's tokenizer: put it beside {cfg.student} "
                                    "or pass --student-tokenizer DIR")
        if len(student.tokenizer) > student.vocab_size:
            raise InvalidInputError(f"student {cfg.student} has {student.vocab_size} embedding rows, its tokenizer "
                                    f"{len(student.tokenizer)} tokens: every token id must fit")
        if cfg.cross_tokenizer == "gold" and (manifest.codec.get("values") == "none" or
                                              manifest.rule.get("rule") == "sample"):
            raise InvalidInputError("--cross-tokenizer gold needs a cache with exact top entries (rules topk, mass, "
                                    "topk_tail); use alm, which needs only the label logprobs")
        self.cfg, self.method = cfg, cfg.cross_tokenizer
        self.tokenizer = student.tokenizer
        self.teacher = TokenBytes.of(load_teacher_tokenizer(manifest, cfg.teacher_tokenizer))
        self.student = TokenBytes.of(student.tokenizer)
        self.bos = _default_bos(student.tokenizer)
        cap = getattr(student.model.config, "max_position_embeddings", None)
        self.max_length = int(cap) if cap else None
        self.match = torch.from_numpy(vocab_match(self.teacher, self.student)) if self.method == "gold" else None
        logger.info("cross-tokenizer %s: teacher %s -> student %s (%d tokens)%s", self.method, self.teacher.name,
                    self.student.name, len(self.student.table),
                    "" if self.match is None else f", {int((self.match >= 0).sum())} teacher ids matched")

    # ------------------------------------------------------------ batches
    def prepare(self, batch: dict) -> dict:
        """The student batch of a teacher batch (``trainers.data`` layout, no packing): student ``input_ids``,
        ``attention_mask``, ``position_ids``, ``segment_ids``, ``target_mask``, ``labels``, ``chunk`` ``[B, S]``
        (predicted-token layout, chunk -1 outside chunks) and per chunk ``[C]``: ``chunk_t_lp`` (teacher chunk
        log-likelihood), ``chunk_bytes``, ``chunk_weight``, ``chunk_first`` (index of its first student token among
        the target positions), ``chunk_single``, and for gold the teacher's entries at its first position."""
        ids, am = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        tgt, lp = batch["target_mask"].numpy(), batch["label_logprob"].numpy().astype(np.float64)
        B, T = ids.shape
        rows, t_lp, nbytes, weight, t_first, n_t = [], [], [], [], [], []
        for b in range(B):
            L = int(am[b].sum())
            target = np.zeros(L, bool)
            target[1:] = tgt[b, :L - 1]
            al = align(self.teacher, self.student, self.tokenizer, ids[b, :L], target, bos=self.bos,
                       max_length=self.max_length)
            c = al.n_chunks
            ct = al.chunk_of_teacher[1:]  # teacher token p is predicted at layout index p - 1
            use = ct >= 0
            t_lp.append(np.bincount(ct[use], weights=lp[b, :L - 1][use], minlength=c))
            n_t.append(np.bincount(ct[use], minlength=c))
            first = np.full(c, T * B, np.int64)
            np.minimum.at(first, ct[use], b * T + np.flatnonzero(use))
            t_first.append(first)
            nbytes.append(al.chunk_bytes)
            weight.append(np.full(c, float(batch["weight"][b, 0])))
            rows.append(al)
        S = max(1, max(len(a.student_ids) for a in rows))
        z = lambda d, fill=0: np.full((B, S), fill, d)  # noqa: E731
        o = dict(input_ids=z(np.int64), attention_mask=z(np.int64), position_ids=z(np.int64),
                 segment_ids=z(np.int64), target_mask=z(bool, False), labels=z(np.int64), chunk=z(np.int64, -1))
        base = 0
        for b, al in enumerate(rows):
            n = len(al.student_ids)
            o["input_ids"][b, :n], o["attention_mask"][b, :n], o["segment_ids"][b, :n] = al.student_ids, 1, 1
            o["position_ids"][b, :n] = np.arange(n)
            cs = al.chunk_of_student[1:]
            o["target_mask"][b, :n - 1], o["labels"][b, :n - 1] = cs >= 0, al.student_ids[1:]
            o["chunk"][b, :n - 1] = np.where(cs >= 0, cs + base, -1)
            base += al.n_chunks
        out = {k: torch.from_numpy(v) for k, v in o.items()}
        flat = out["chunk"][out["target_mask"]]
        cat = lambda x, d: torch.from_numpy(np.concatenate(x).astype(d)) if x else torch.zeros(0)  # noqa: E731
        n_s = torch.bincount(flat, minlength=base)
        out.update(chunk_t_lp=cat(t_lp, np.float64), chunk_bytes=cat(nbytes, np.int64),
                   chunk_weight=cat(weight, np.float32), seq_ids=batch["seq_ids"],
                   chunk_first=_first_index(flat, base), chunk_single=(cat(n_t, np.int64) == 1) & (n_s == 1))
        if self.method == "gold":
            tf = cat(t_first, np.int64)
            get = lambda k: batch[k].reshape(B * T, *batch[k].shape[2:])[tf]  # noqa: E731
            out.update(t_ids=get("topk_ids"), t_valid=get("topk_valid"), t_lp=get("topk_logprobs"),
                       t_tail=get("tail_mass"), t_first_lp=torch.from_numpy(lp.reshape(-1))[tf])
        return out

    # ------------------------------------------------------------ the loss
    def student_logp(self, body, student, sb: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden states at the target positions ``[N, H]``, the student's label logprobs ``[N]``, their chunk sums
        ``[C]``)."""
        h = body(sb)
        sel = sb["target_mask"]
        hs, labels = h[sel], sb["labels"][sel]
        recompute = hs.shape[0] * student.head.vocab_size * 4 > self.cfg.head_memory_mb * 2**20
        view = student_view(hs, student.head, labels[:, None], labels, chunk_size=self.cfg.chunk_size,
                            recompute=recompute)
        lp = view.logp_label
        s_lp = torch.zeros(sb["chunk_t_lp"].shape[0], dtype=lp.dtype, device=lp.device)
        s_lp = s_lp.index_add(0, sb["chunk"][sel], lp)
        return hs, lp, s_lp

    def loss(self, body, student, sb: dict, objective) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one prepared micro-batch and its metrics (``loss``, ``kd``, ``ce``, ``chunks``)."""
        hs, lp, s_lp = self.student_logp(body, student, sb)
        sel = sb["target_mask"]
        w_tok = sb["chunk_weight"][sb["chunk"][sel]]
        ce = reduce(-lp, w_tok)
        metrics = {"ce": float(ce.detach()), "chunks": float(s_lp.shape[0])}
        if self.cfg.loss == "ce" or s_lp.shape[0] == 0:
            total = ce if s_lp.shape[0] else hs.sum() * 0 + student.head.weight.sum() * 0
            return total, {**metrics, "loss": float(total.detach())}
        if self.method == "alm":
            kd_c = alm_kl(sb["chunk_t_lp"], s_lp, self.cfg.alm_temperature)
        else:
            kd_c = self.gold(hs, lp, s_lp, sb, student, objective)
        kd = reduce(kd_c, sb["chunk_weight"].to(kd_c))
        lam = self.cfg.ce_weight
        total = ((1 - lam) * kd + lam * ce.to(kd)).float()
        return total, {**metrics, "kd": float(kd.detach()), "loss": float(total.detach())}

    def gold(self, hs, lp, s_lp, sb: dict, student, objective) -> torch.Tensor:
        """GOLD-style per-chunk loss ``[C]`` (module docstring)."""
        first = sb["chunk_first"]
        logp = torch.log_softmax(student.head(hs[first]).float(), dim=-1)  # [C, V_student]
        labels = sb["labels"][sb["target_mask"]][first]
        t_ids, t_valid, t_lp = sb["t_ids"], sb["t_valid"], sb["t_lp"].float()
        mapped = self.match.to(t_ids.device)[t_ids.clamp(0, self.match.numel() - 1)]
        matched = t_valid & (mapped >= 0)
        sid = mapped.clamp(min=0)
        p = torch.where(matched, t_lp.exp(), 0.0)
        targets = SparseTargets(ids=sid, valid=matched, logprobs=torch.where(matched, t_lp, -math.inf),
                                tail_mass=(1 - p.sum(-1)).clamp(0, 1), labels=labels, vocab_size=logp.shape[1])
        view = StudentView(logp.gather(1, sid), logp.gather(1, labels[:, None]).squeeze(1), None)
        matched_kd = objective.kd(view, targets)
        # ULD on the other chunks: sorted top-K and the rest, each times the continuation's probability
        k = t_ids.shape[1]
        t_scale = torch.exp(sb["chunk_t_lp"].float() - sb["t_first_lp"].float()).clamp(max=1.0)
        s_scale = torch.exp(s_lp - lp[first]).clamp(max=1.0)
        p_top = torch.where(t_valid, t_lp.exp(), 0.0) * t_scale[:, None]
        q_top = torch.topk(logp.exp(), min(k, logp.shape[1]), dim=-1).values
        q_top = torch.nn.functional.pad(q_top, (0, k - q_top.shape[1])) * s_scale[:, None]
        t_rest = sb["t_tail"].float().clamp(0, 1) * t_scale  # the exact tail mass, scaled like the entries
        uld = sorted_l1(p_top, t_rest, q_top, (s_scale - q_top.sum(-1)).clamp(min=0))
        return torch.where(sb["chunk_single"], matched_kd, uld)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, student, loader, device, cfg) -> dict[str, float]:
        """Held-out bits per byte (the student's and the teacher's on the same text), CE per student token."""
        from trainers.evaluation import to_device

        sums = dict(bits=0.0, t_bits=0.0, bytes=0, ce=0.0, tokens=0, chunks=0, alm=0.0, seqs=0)
        for batch in loader:
            sb = to_device(self.prepare(batch), device)
            _, lp, s_lp = self.student_logp(student.hidden, student, sb)
            text = sb["chunk_bytes"] > 0
            sums["bits"] -= float(s_lp[text].double().sum()) / math.log(2)
            sums["t_bits"] -= float(sb["chunk_t_lp"][text].sum()) / math.log(2)
            sums["bytes"] += int(sb["chunk_bytes"].sum())
            sums["ce"] -= float(lp.double().sum())
            sums["tokens"] += int(lp.shape[0])
            sums["chunks"] += int(s_lp.shape[0])
            sums["alm"] += float(alm_kl(sb["chunk_t_lp"], s_lp, cfg.alm_temperature).sum())
            sums["seqs"] += len(sb["seq_ids"])
            if cfg.eval_sequences and sums["seqs"] >= cfg.eval_sequences:
                break
        nb = max(sums["bytes"], 1)
        return {"eval_bpb": sums["bits"] / nb, "eval_teacher_bpb": sums["t_bits"] / nb, "eval_bytes": sums["bytes"],
                "eval_ce": sums["ce"] / max(sums["tokens"], 1), "eval_tokens": sums["tokens"],
                "eval_chunks": sums["chunks"], "eval_alm": sums["alm"] / max(sums["chunks"], 1),
                "eval_sequences": sums["seqs"]}


def _first_index(chunk: torch.Tensor, n: int) -> torch.Tensor:
    """For chunk ids ``[N]`` (each chunk's tokens in order), the index of each chunk's first token, ``[n]``."""
    first = torch.full((n,), chunk.numel(), dtype=torch.long)
    if n:
        first.scatter_reduce_(0, chunk, torch.arange(chunk.numel()), reduce="amin")
    return first


def _default_bos(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text by default (a BOS), as the builders do for the teacher."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return list(with_special[:len(with_special) - len(without)]) if with_special[-len(without):] == without else []

