"""Cross-tokenizer students (``train --cross-tokenizer alm|gold|nextbyte``): the piece the training loop plugs in.

``CrossTokenizer(cfg, manifest, student)`` turns each teacher batch of the streaming loader into
a student batch (``prepare``): per sequence, the text is rebuilt from the teacher's tokens, encoded
with the student's tokenizer and cut into aligned chunks (``trainers.align``); then it gives the
loss of a micro-batch (``loss``) and the held-out evaluation (``evaluate``). The student's body and
head run as for any student (``trainers.view.student_view``, chunked).

- ``alm``: per chunk ``alm_kl(t_c, s_c)`` (``trainers.xlosses``), t_c the sum of the teacher's exact
  ``label_logprob`` over the chunk's teacher tokens (stored for every cached position), s_c the
  student's; ``loss = (1 - ce_weight) mean_c alm_kl + ce_weight mean_u CE_u`` over student tokens u.
  ``--loss ce``: the student's cross-entropy alone (the baseline on the same text and tokens).
  ``--alm-mode`` adds the two refinements of the ALM authors' recommended configuration (``tokenkit``'s
  ``alm_mode=merge_by_space_prob+append_space``): ``append_space`` compares, per chunk, the likelihood of
  "this text, then a token starting with a space" (both chunk log-likelihoods plus the log-probability
  of a space-initial token at the position after the chunk: the teacher's summed over its cached entries
  there, the student's over its full vocabulary), which says how likely a word ends there; chunks whose
  next teacher position is not cached (a sequence's last) keep the plain likelihood.
  ``merge_by_space_prob`` joins consecutive chunks until one whose teacher space probability is at least
  ``--alm-space-threshold`` (``trainers.align.merge_chunks``), so chunks are whole words.
  ``--gradmag`` (with ``--ce-weight`` lambda in (0, 1)) weighs the two terms by GradMag: per micro-batch,
  ``w_kd = (1 - lambda) / |dKD/dh|``, ``w_ce = lambda / |dCE/dh|`` (h the student's final hidden states; the
  paper takes the last layer's parameters), ``loss = (w_kd KD + w_ce CE) / (w_kd + w_ce)`` with the weights
  held constant, so each term's gradient has its share of one magnitude.
- ``gold`` (after TRL's GOLD trainer, which matches vocabularies by token string and falls back to
  ULD; Boizard et al. 2024): on a one-token chunk (one teacher token and one student token, so the
  same bytes), the cached entries are mapped to student ids by a vocabulary match on token bytes
  (special tokens by content) and ``--loss`` (default forward KL) is taken over the matched ids plus
  one bucket for the rest (``trainers.losses.buckets``); on every other chunk, ULD's sorted L1
  between the teacher's distribution at the chunk's first position (top K and tail mass) and the
  student's, each scaled by the probability of the rest of the chunk along the text (GOLD's merge of
  a multi-token group: the first marginal times the actual continuation's probability).
- ``nextbyte``: at the start of every chunk (a byte offset i where both tokenizations start a token) both
  models say which *byte* comes next, in 257 buckets (the 256 byte values and one for special tokens)
  whatever their vocabularies, and ``--loss`` (default forward KL) is taken over the buckets. It takes the
  place of the CE at the chunk's first student token, ``(1 - lambda) KD + lambda CE`` there with lambda
  the ``--ce-weight``, and every other token keeps its CE; the loss is the weighted mean over tokens.
  (A mean over chunks mixed with a mean over tokens, as for ``alm`` and ``gold``, weighs the chunk starts
  several times each other token, and Adam's normalisation then slows the learning of the rest: on the
  benchmark a byte student ended far worse than with CE alone even with the actual next bytes as targets;
  BENCHMARKS.md, "Cross-tokenizer students".) A model's next-token distribution at i summed by first byte is not
  its next-byte distribution: it is conditioned on a token boundary at i, which leaks the future (after
  the token " the", a boundary says the word ended, while the text " the" goes on to " then", " there"
  as often). So each side's next-byte distribution after the text is taken one token back, from the
  distribution at the start j of the token v that ends at i (Phan et al., "Exact Byte-Level
  Probabilities from Tokenized Language Models", 2024, truncated to one token):
  ``P(b) = [P_j(v) P_i(first byte b) + sum_{u extends v, next byte b} P_j(u)] / [P_j(v) + sum_{u extends v} P_j(u)]``.
  The student's side is exact over its vocabulary (``TokenBytes.extensions``); the teacher's uses its cached
  entries at j and i and the exact label logprob ``P_j(v)``, and spreads each position's exact tail mass
  evenly over the vocabulary's tokens outside its entries, so every byte that some token starts with keeps
  some mass. (Renormalising over the entries instead gives 0 to the bytes no entry starts with, at every
  boundary of the benchmark's top-32 cache, 1.7% of the exact mass on average, and the student is taught
  they never come; ``python tools/bench_cross.py --target-check``.) A chunk whose token before it is not
  predicted on both sides (the text's first) gets no KD term. ``--nextbyte-at tokens`` adds a site at every
  other student token of a chunk (its byte offset lies inside a teacher token v, after v's first bytes w):
  the teacher's side is the same formula at the start j of v with w in place of v, ``P(b) = [P_j(w) X(b) +
  sum_{u extends w, next byte b} P_j(u)] / [P_j(w) + sum_{u extends w} P_j(u)]``, with ``P_j(v)`` exact (its
  label logprob), ``P_j(w)`` from the entries (or the tail's share; 0 where no token spells w) and X the first
  byte at the position after v, the nearest distribution the cache holds to the one after w.

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
from trainers.align import TokenBytes, align, chunk_ends, merge_chunks
from trainers.losses import reduce
from trainers.targets import SparseTargets
from trainers.view import StudentView, student_view
from trainers.xlosses import ALM_EPS, alm_kl, sorted_l1

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
        # every rule stores exact logprobs for its entries (the top k, or the drawn ids of a sampled cache) and the
        # exact mass outside them, which is all gold, nextbyte and the space probability read
        exact_entries = manifest.codec.get("values") != "none"
        if cfg.cross_tokenizer in ("gold", "nextbyte") and not exact_entries:
            raise InvalidInputError(f"--cross-tokenizer {cfg.cross_tokenizer} needs the entries' logprobs; this cache "
                                    "stores ids only (built with --values none): use alm, which needs only the label "
                                    "logprobs")
        if cfg.alm_mode != "plain" and not exact_entries:
            raise InvalidInputError(f"--alm-mode {cfg.alm_mode} needs the entries' logprobs for the teacher's space "
                                    "probability; this cache stores ids only (built with --values none): use "
                                    "--alm-mode plain")
        self.cfg, self.method = cfg, cfg.cross_tokenizer
        self.tokenizer = student.tokenizer
        self.teacher = TokenBytes.of(load_teacher_tokenizer(manifest, cfg.teacher_tokenizer))
        self.student = TokenBytes.of(student.tokenizer)
        self.bos = _default_bos(student.tokenizer)
        cap = getattr(student.model.config, "max_position_embeddings", None)
        self.max_length = int(cap) if cap else None
        self.match = torch.from_numpy(vocab_match(self.teacher, self.student)) if self.method == "gold" else None
        if self.method == "nextbyte":  # token id -> bucket: its first byte, or 256 for a special or empty token
            self.byte_t = self.teacher.first_byte()
            self.byte_s = torch.from_numpy(self.student.first_byte())
            self.ext_s = self.student.extensions()  # the teacher side: TokenBytes.extending, per prefix
            self.count_t = np.bincount(self.byte_t, minlength=NEXT_BYTE_BUCKETS).astype(np.float64)
        mode = cfg.alm_mode if self.method == "alm" else "plain"
        self.merge, self.append = "merge_by_space_prob" in mode, "append_space" in mode
        if self.merge or self.append:
            self.space_t = self.teacher.space_mask()
            self.space_s = torch.from_numpy(self.student.space_mask())
            if not (self.space_t.any() and bool(self.space_s.any())):
                side = "teacher" if not self.space_t.any() else "student"
                raise InvalidInputError(f"--alm-mode {mode}: the {side}'s tokenizer has no token starting with a "
                                        "space")
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
        rows, t_lp, nbytes, weight, t_first, n_t, space, s_last = [], [], [], [], [], [], [], []
        for b in range(B):
            L = int(am[b].sum())
            target = np.zeros(L, bool)
            target[1:] = tgt[b, :L - 1]
            al = align(self.teacher, self.student, self.tokenizer, ids[b, :L], target, bos=self.bos,
                       max_length=self.max_length)
            if self.merge:
                p_space = self.teacher_space(batch, b, al, tgt)
                al = merge_chunks(al, p_space >= self.cfg.alm_space_threshold)
            if self.append:
                space.append(self.teacher_space(batch, b, al, tgt))
                s_last.append(chunk_ends(al)[2])
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
        if self.append:  # per chunk: the teacher's space log-probability after it, where cached, and where the
            # student's distribution after it sits in the flattened [B, S] layout
            p = np.concatenate(space) if space else np.zeros(0)
            nxt = np.concatenate([b * S + x for b, x in enumerate(s_last)]) if s_last else np.zeros(0, np.int64)
            has = p >= 0
            out.update(chunk_space=torch.from_numpy(has), chunk_next=torch.from_numpy(np.where(has, nxt, 0)),
                       chunk_t_space=torch.from_numpy(np.where(has, np.log(np.maximum(p, ALM_EPS)), 0.0)))
        if self.method == "nextbyte":
            out.update(self.next_byte_inputs(batch, rows, np.concatenate(t_first) if t_first else np.zeros(0, int), S))
        if self.method == "gold":
            tf = cat(t_first, np.int64)
            get = lambda k: batch[k].reshape(B * T, *batch[k].shape[2:])[tf]  # noqa: E731
            out.update(t_ids=get("topk_ids"), t_valid=get("topk_valid"), t_lp=get("topk_logprobs"),
                       t_tail=get("tail_mass"), t_first_lp=torch.from_numpy(lp.reshape(-1))[tf])
        return out

    def teacher_space(self, batch: dict, b: int, al, tgt: np.ndarray) -> np.ndarray:
        """Per chunk of ``al`` ``[C]``: the teacher's probability that the token after the chunk starts with a space,
        summed over the cached entries at that position; -1 where that position is not cached."""
        _, last, _ = chunk_ends(al)
        ok = last >= 0
        ok[ok] = tgt[b, last[ok]]  # layout index p predicts teacher token p + 1: the token after the chunk's last
        pos = np.where(ok, last, 0)
        t_ids = batch["topk_ids"][b].numpy()[pos]
        valid = batch["topk_valid"][b].numpy()[pos] & (t_ids >= 0) & (t_ids < self.space_t.size)
        spaced = valid & self.space_t[np.clip(t_ids, 0, self.space_t.size - 1)]
        lp = batch["topk_logprobs"][b].numpy()[pos].astype(np.float64)
        p = np.where(spaced, np.exp(np.where(spaced, lp, 0.0)), 0.0).sum(-1)
        return np.where(ok, np.minimum(p, 1.0), -1.0)

    # ------------------------------------------------------------ the loss
    def student_logp(self, body, student, sb: dict, *, with_hidden: bool = False):
        """(hidden states at the target positions ``[N, H]``, the student's label logprobs ``[N]``, their chunk sums
        ``[C]``), and with ``with_hidden`` the body's output ``[B, S, H]`` last."""
        h = body(sb)
        sel = sb["target_mask"]
        hs, labels = h[sel], sb["labels"][sel]
        recompute = hs.shape[0] * student.head.vocab_size * 4 > self.cfg.head_memory_mb * 2**20
        view = student_view(hs, student.head, labels[:, None], labels, chunk_size=self.cfg.chunk_size,
                            recompute=recompute)
        lp = view.logp_label
        s_lp = torch.zeros(sb["chunk_t_lp"].shape[0], dtype=lp.dtype, device=lp.device)
        s_lp = s_lp.index_add(0, sb["chunk"][sel], lp)
        return (hs, lp, s_lp, h) if with_hidden else (hs, lp, s_lp)

    def student_space(self, h: torch.Tensor, student, sb: dict) -> torch.Tensor:
        """The student's log-probability of a space-initial token after each chunk with ``chunk_space`` ``[C']``."""
        hn = h.reshape(-1, h.shape[-1])[sb["chunk_next"][sb["chunk_space"]]]
        logp = torch.log_softmax(student.head(hn).float(), dim=-1)
        mask = self.space_s.to(logp.device)[:logp.shape[1]]
        return torch.logsumexp(logp[:, :mask.numel()].masked_fill(~mask, -math.inf), dim=-1).clamp(max=0.0)

    def loss(self, body, student, sb: dict, objective) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one prepared micro-batch and its metrics (``loss``, ``kd``, ``ce``, ``chunks``; with
        ``--gradmag`` also ``gradmag_kd``, the KD term's weight share)."""
        hs, lp, s_lp, h = self.student_logp(body, student, sb, with_hidden=True)
        sel = sb["target_mask"]
        w_tok = sb["chunk_weight"][sb["chunk"][sel]]
        ce = reduce(-lp, w_tok)
        metrics = {"ce": float(ce.detach()), "chunks": float(s_lp.shape[0])}
        if self.cfg.loss == "ce" or s_lp.shape[0] == 0:
            total = ce if s_lp.shape[0] else hs.sum() * 0 + student.head.weight.sum() * 0
            return total, {**metrics, "loss": float(total.detach())}
        if self.method == "alm":
            t_c, s_c = sb["chunk_t_lp"], s_lp
            if self.append:
                t_c = t_c + sb["chunk_t_space"].to(t_c)
                s_c = s_c.to(torch.float64).index_add(0, torch.nonzero(sb["chunk_space"]).squeeze(1),
                                                      self.student_space(h, student, sb).to(torch.float64))
            kd_c = alm_kl(t_c, s_c, self.cfg.alm_temperature)
        elif self.method == "nextbyte":
            return self.nextbyte_total(hs, h, lp, w_tok, sb, student, objective, metrics)
        else:
            kd_c = self.gold(hs, lp, s_lp, sb, student, objective)
        kd = reduce(kd_c, sb["chunk_weight"].to(kd_c))
        lam = self.cfg.ce_weight
        if self.cfg.gradmag and torch.is_grad_enabled() and h.requires_grad:
            norm = lambda x: torch.autograd.grad(x, h, retain_graph=True)[0].double().norm() + 1e-12  # noqa: E731
            n_kd, n_ce = norm(kd), norm(ce)
            w_kd = (1 - lam) / n_kd if n_kd > 1e-12 else n_kd * 0  # a KD term without gradient: CE alone
            w_ce = lam / n_ce
            total = ((w_kd * kd + w_ce * ce.to(kd)) / (w_kd + w_ce)).float()
            metrics["gradmag_kd"] = float(w_kd / (w_kd + w_ce))
        else:
            total = ((1 - lam) * kd + lam * ce.to(kd)).float()
        return total, {**metrics, "kd": float(kd.detach()), "loss": float(total.detach())}

    def nextbyte_total(self, hs, h, lp, w_tok, sb: dict, student, objective, metrics: dict):
        """``nextbyte``'s loss per student token (module docstring): at a chunk's first token with a KD term,
        ``(1 - lambda) KD + lambda CE``; at every other token, CE; ``sum_u w_u loss_u / sum_u w_u``."""
        kd_c = self.nextbyte(hs, h, sb, student, objective)
        ok = sb["nb_ok"]
        at = sb["nb_site"][ok]  # the sites' tokens among the target positions
        a = torch.zeros_like(lp).index_fill(0, at, 1 - self.cfg.ce_weight)
        kd_tok = torch.zeros(lp.shape[0], dtype=kd_c.dtype, device=lp.device).index_copy(0, at, kd_c[ok])
        w = w_tok.to(kd_c)
        total = ((w * (a.to(kd_c) * kd_tok + (1 - a.to(kd_c)) * -lp.to(kd_c))).sum() / w.sum().clamp(min=1e-30))
        kd = reduce(kd_c[ok], sb["chunk_weight"][sb["nb_chunk"][ok]].to(kd_c)) if bool(ok.any()) else kd_c.sum() * 0
        return total.float(), {**metrics, "kd": float(kd.detach()), "loss": float(total.detach())}

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

    def next_byte_inputs(self, batch: dict, rows: list, t_first: np.ndarray, S: int) -> dict:
        """What ``nextbyte`` needs per *site* ``[N]``, a student token before which the two models' next-byte
        distributions are compared: every chunk's first token, and with ``--nextbyte-at tokens`` every other text
        token of a chunk too. ``nb_target [N, 257]``: the teacher's next-byte distribution; ``nb_ok``: both sides
        take it one token back (at a chunk's first token: both predict the token before the chunk; an inner site
        always); ``nb_site``: the token's index among the target positions; ``nb_chunk``: its chunk; ``nb_tpos``: the
        flattened ``[B, T]`` teacher position whose first bytes follow the teacher token v the site is inside or
        after (v is predicted one position earlier), ``nb_wlen``: how many of v's bytes precede the site; the student's
        token before it (``nb_prev_id``) and where its prediction sits in the flattened ``[B, S]`` layout
        (``nb_prev_pos``); the student tokens extending that token (``nb_ext_row``, ``nb_ext_id``, ``nb_ext_byte``:
        site, token, next byte)."""
        n = NEXT_BYTE_BUCKETS
        ids, tgt = batch["input_ids"].numpy(), batch["target_mask"].numpy()
        T = ids.shape[1]
        t_ids, t_valid = batch["topk_ids"].numpy(), batch["topk_valid"].numpy()
        t_lp, label_lp = batch["topk_logprobs"].numpy().astype(np.float64), batch["label_logprob"].numpy()
        tail = batch["tail_mass"].numpy().astype(np.float64)
        V, table = len(self.teacher.table), self.teacher.table
        entries, heads = {}, {}

        def at(b: int, p: int) -> dict[int, float]:  # the cached entries at layout p
            if (b, p) not in entries:
                entries[b, p] = self._entries(t_ids[b, p], t_valid[b, p], t_lp[b, p])
            return entries[b, p]

        def first_byte(b: int, p: int) -> np.ndarray:  # the next token's first byte at layout p, the tail spread
            if (b, p) not in heads:  # evenly over the tokens outside the entries
                head = at(b, p)
                hid = np.fromiter(head, np.int64, len(head))
                h = np.zeros(n)
                np.add.at(h, self.byte_t[hid], np.fromiter(head.values(), np.float64, len(head)))
                rest = self.count_t - np.bincount(self.byte_t[hid], minlength=n)
                h += tail[b, p] * rest / max(rest.sum(), 1.0)
                heads[b, p] = h / max(h.sum(), 1e-300)
            return heads[b, p]

        def extensions(b: int, j: int, v: int, w: bytes) -> tuple[np.ndarray, float]:
            """At layout j (which predicts teacher token v): the mass of the tokens strictly extending the bytes w (v's
            first bytes) by their next byte ``[257]``, and log P_j(w as a whole token). Entries exact, v exact (its
            label logprob), every other token an even share of the tail mass."""
            head = at(b, j)
            spread = tail[b, j] / max(V - len(head), 1)
            k = len(w)
            ext = spread * np.bincount(self.teacher.extending(w)[1], minlength=n).astype(np.float64)
            for x, px in head.items():
                if len(table[x]) > k and table[x].startswith(w):
                    ext[table[x][k]] += px - spread
            if len(table[v]) == k:
                return ext, float(label_lp[b, j])
            if v not in head:
                ext[table[v][k]] += math.exp(float(label_lp[b, j])) - spread
            wid = self.teacher.id_of(w)
            p_w = 0.0 if wid is None else head.get(wid, spread)
            return ext, math.log(p_w) if p_w > 0 else -math.inf

        x_rows, e_rows, v_lp, ok, site, chunk, prev_pos, prev_id, tpos, wlen = [], [], [], [], [], [], [], [], [], []

        def add(x, e, lv, good, u, k, b, al, p, n_w):
            tpos.append(b * T + p)
            wlen.append(n_w)
            x_rows.append(x)
            e_rows.append(e)
            v_lp.append(lv)
            ok.append(good)
            site.append(base + int(np.searchsorted(toks, u)))
            chunk.append(c0 + k)
            prev_pos.append(b * S + u - 2 if good else 0)
            prev_id.append(int(al.student_ids[u - 1]) if good else 0)

        c0 = base = 0
        zero = np.zeros(n)
        for b, al in enumerate(rows):
            cs = al.chunk_of_student
            toks = np.flatnonzero(cs >= 0)  # the student's target tokens; token u is predicted at layout u - 1
            u0 = np.full(al.n_chunks, np.iinfo(np.int64).max)
            np.minimum.at(u0, cs[toks], toks)  # each chunk's first student token
            if self.cfg.nextbyte_at == "tokens":
                t_len = self.teacher.length[ids[b, :al.chunk_of_teacher.size]]
                t_end = np.cumsum(t_len)
                t_start = t_end - t_len
                _, last_t, _ = chunk_ends(al)
            for k in range(al.n_chunks):
                i = int(t_first[c0 + k] % T)  # layout i predicts the chunk's first teacher token, i + 1
                if i >= 1 and tgt[b, i - 1] and u0[k] >= 2:  # both sides predict the token before the chunk
                    v = int(ids[b, i])
                    add(first_byte(b, i), *extensions(b, i - 1, v, table[v]), True, int(u0[k]), k, b, al, i,
                        len(table[v]))
                else:
                    add(first_byte(b, i), zero, 0.0, False, int(u0[k]), k, b, al, i, 0)
                if self.cfg.nextbyte_at != "tokens" or al.chunk_bytes[k] == 0:
                    continue
                us = toks[cs[toks] == k]
                lens = self.student.length[al.student_ids[us]]
                starts = t_end[last_t[k]] - np.cumsum(lens[::-1])[::-1]  # from the chunk's end: the first token may
                for u, i_b, ln in zip(us[1:].tolist(), starts[1:].tolist(), lens[1:].tolist()):  # carry a space
                    tv = int(np.searchsorted(t_end, i_b, side="right"))  # the teacher token holding byte i_b
                    if ln == 0 or not (1 <= tv < t_end.size and t_start[tv] < i_b and tgt[b, tv - 1] and tgt[b, tv]):
                        continue  # an empty token, or the teacher's distribution before or after v is not cached
                    v, n_w = int(ids[b, tv]), i_b - int(t_start[tv])
                    add(first_byte(b, tv), *extensions(b, tv - 1, v, table[v][:n_w]), True, u, k, b, al, tv, n_w)
            c0 += al.n_chunks
            base += toks.size
        N = len(site)
        x_t = torch.from_numpy(np.asarray(x_rows, np.float64).reshape(N, n))
        ok_a = np.asarray(ok, bool)
        target = torch.where(torch.from_numpy(ok_a)[:, None],
                             one_token_back(x_t, torch.from_numpy(np.asarray(e_rows, np.float64).reshape(N, n)),
                                            torch.tensor(v_lp, dtype=torch.float64)), x_t)
        ptr, e_ids, e_byte = self.ext_s
        prev = np.asarray(prev_id, np.int64)
        lo, hi = ptr[prev], ptr[prev + 1]
        cnt = np.where(ok_a, hi - lo, 0)
        row = np.repeat(np.arange(N), cnt)
        at_ = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo, cnt)
        as_t = lambda x: torch.from_numpy(np.asarray(x, np.int64))  # noqa: E731
        return dict(nb_target=target, nb_ok=torch.from_numpy(ok_a), nb_site=as_t(site), nb_chunk=as_t(chunk),
                    nb_tpos=as_t(tpos), nb_wlen=as_t(wlen), nb_prev_pos=as_t(prev_pos), nb_prev_id=as_t(prev),
                    nb_ext_row=torch.from_numpy(row),
                    nb_ext_id=torch.from_numpy(e_ids[at_]), nb_ext_byte=torch.from_numpy(e_byte[at_]))

    def _entries(self, ids: np.ndarray, valid: np.ndarray, logprobs: np.ndarray) -> dict[int, float]:
        """The cached entries of one position as {teacher id: probability}."""
        V = len(self.teacher.table)
        return {int(t): float(np.exp(x)) for t, ok, x in zip(ids.tolist(), valid.tolist(), logprobs.tolist())
                if ok and 0 <= t < V}

    def nextbyte(self, hs, h, sb: dict, student, objective) -> torch.Tensor:
        """The per-site loss ``[N]`` over next-byte buckets (``next_byte_inputs``; module docstring)."""
        n = NEXT_BYTE_BUCKETS
        first = sb["nb_site"]
        C = first.shape[0]
        fb = self.byte_s.to(hs.device)

        def buckets(logits: torch.Tensor) -> torch.Tensor:
            """The buckets' probabilities ``[C, 257]``, float64, each a logsumexp over its tokens so that none
            underflows."""
            logp = torch.log_softmax(logits.float(), dim=-1)
            idx = torch.cat([fb, fb.new_full((max(0, logp.shape[1] - fb.numel()),), n - 1)])[:logp.shape[1]]
            ix = idx.expand(logp.shape[0], -1)
            top = logp.new_full((logp.shape[0], n), -math.inf).scatter_reduce(1, ix, logp.detach(), "amax")
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            total = logp.new_zeros(logp.shape[0], n).scatter_add(1, ix, (logp - top.gather(1, ix)).exp())
            return (total.double().log() + top.double()).exp()

        q_i = buckets(student.head(hs[first]))
        logp_prev = torch.log_softmax(student.head(h.reshape(-1, h.shape[-1])[sb["nb_prev_pos"]]).float(), dim=-1)
        row = sb["nb_ext_row"]
        ext = q_i.new_zeros(C * n).index_add_(0, row * n + sb["nb_ext_byte"],
                                              logp_prev[row, sb["nb_ext_id"]].exp().double()).view(C, n)
        v_lp = logp_prev.gather(1, sb["nb_prev_id"][:, None]).squeeze(1).double()
        q = torch.where(sb["nb_ok"][:, None], one_token_back(q_i, ext, v_lp), q_i)
        p = sb["nb_target"].to(q)
        labels = fb[sb["labels"][sb["target_mask"]][first]]
        targets = SparseTargets(ids=torch.arange(n, device=q.device).expand(C, n), valid=p > 0,
                                logprobs=torch.where(p > 0, p.log(), -math.inf),
                                tail_mass=torch.zeros(C, device=q.device, dtype=q.dtype), labels=labels, vocab_size=n)
        logq = q.clamp(min=1e-300).log()  # float64: the buckets' targets reach down to ~1e-16 (the tail's share)
        return objective.kd(StudentView(logq, logq.gather(1, labels[:, None]).squeeze(1), None), targets)

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


NEXT_BYTE_BUCKETS = 257  # the 256 byte values and one for special tokens


def one_token_back(p_i: torch.Tensor, ext: torch.Tensor, v_logprob: torch.Tensor) -> torch.Tensor:
    """``[P_j(v) p_i + ext] / [P_j(v) + sum(ext)]`` per row (the ``nextbyte`` docstring), stably: ``p_i``, ``ext``
    ``[..., 257]`` probabilities, ``v_logprob [...]`` the log of ``P_j(v)``."""
    z = ext.sum(-1)
    mix = torch.where(z > 0, torch.sigmoid(v_logprob - z.clamp(min=1e-300).log()), torch.ones_like(z))
    return mix[..., None] * p_i + (1 - mix[..., None]) * ext / z.clamp(min=1e-300)[..., None]


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

