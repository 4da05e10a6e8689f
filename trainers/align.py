"""Aligning two tokenizations of one text by byte offsets: the chunks a cross-tokenizer loss compares.

A cache holds the teacher's token ids. ``TokenBytes.of(tokenizer)`` says what each id spells
in UTF-8 bytes (byte-level BPE as in GPT-2/Llama-3/SmolLM2: the byte-to-unicode table inverted;
SentencePiece: ``▁`` is a space, ``<0xNN>`` a byte; special tokens spell nothing), so a teacher
sequence is turned back into its exact bytes. ``roles`` sorts the teacher tokens into context
text, target text (cached positions with ``loss_mask``) and special tokens; a target run is
trimmed to whole UTF-8 characters at its edges (a byte-level BPE may split a character across
a target and a context token). ``align`` encodes each segment with the student's tokenizer on
its own, so the target text keeps its exact bytes and the student sees the same context, and
cuts every target run into *chunks* at the byte offsets where both tokenizations have a token
boundary: the shortest chunks on which the two tokenizations agree, as in the alignment of
Minixhofer et al., "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching"
(NeurIPS 2025; their ``tokenkit.align.get_alignment_indices`` walks cumulative byte lengths of
both sides and closes a chunk where they are equal). A teacher special token is aligned with the
student's special token of the same content, as its own chunk, or dropped when the student has
none. A chunk's teacher likelihood is the product of its teacher tokens' probabilities, its
student likelihood the product of its student tokens'. ``merge_chunks`` joins consecutive chunks
into longer ones (ALM's ``merge_by_space_prob``: a chunk closes only where the teacher expects a word to
end).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from typing import Any

import numpy as np

from logitstore.errors import InvalidInputError

CONTEXT, TARGET, SPECIAL = 0, 1, 2


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each byte -> the byte.
    Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in order, to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class UnsupportedTokenizerError(InvalidInputError):
    """A tokenizer whose tokens cannot be mapped back to the exact bytes of the text."""


@dataclasses.dataclass
class TokenBytes:
    """What each token id spells: ``table[id]`` its UTF-8 bytes (``b""`` for a special token), ``special[id]``,
    ``length[id]`` the byte count, and for special tokens their content (``specials``: content -> id)."""

    table: list[bytes]
    special: np.ndarray  # [V] bool
    length: np.ndarray  # [V] int64
    specials: dict[str, int]
    prefix_space: bool  # the tokenizer puts a space before each encoded text (SentencePiece "▁" prefix)
    name: str

    @classmethod
    def of(cls, tokenizer: Any) -> TokenBytes:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UnsupportedTokenizerError(f"tokenizer {name}: cross-tokenizer alignment needs a fast tokenizer "
                                            "(tokenizer.json)")
        spec = json.loads(backend.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
            spec.get("pre_tokenizer"))
        alphabet = byte_level_alphabet() if byte_level else None
        vocab = tokenizer.get_vocab()
        size = max(max(vocab.values()) + 1, len(tokenizer))
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        special_ids = set(getattr(tokenizer, "all_special_ids", []) or []) | {i for i, t in added.items()
                                                                            if t.get("special")}
        table, special, specials = [b""] * size, np.zeros(size, bool), {}
        for tok, i in vocab.items():
            if i in special_ids:
                special[i], specials[tok] = True, i
            elif i in added:
                table[i] = added[i]["content"].encode("utf-8")
            elif alphabet is not None:
                try:
                    table[i] = bytes(alphabet[c] for c in tok)
                except KeyError:
                    table[i] = tok.encode("utf-8")
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                table[i] = bytes([int(tok[3:5], 16)])
            else:
                table[i] = tok.replace("\u2581", " ").encode("utf-8")
        out = cls(table, special, np.array([len(b) for b in table], np.int64), specials, False, name)
        out.prefix_space = out._probe(tokenizer)
        return out

    def _probe(self, tokenizer) -> bool:
        """Whether encoding reproduces a text's bytes exactly (False) or with one leading space (True); else refuse."""
        text = "Tokens, caf\u00e9 na\u00efve \u4e2d\u6587 \u00e9t\u00e9\n  x"
        got = self.spell(tokenizer(text, add_special_tokens=False)["input_ids"])
        if got == text.encode("utf-8"):
            return False
        if got == b" " + text.encode("utf-8"):
            return True
        raise UnsupportedTokenizerError(f"tokenizer {self.name}: its tokens do not spell the text byte for byte "
                                        f"({got[:40]!r} for {text[:40]!r}); cross-tokenizer alignment needs a lossless "
                                        "tokenizer (byte-level BPE, or SentencePiece with byte fallback)")

    @property
    def content_of(self) -> dict[int, str]:
        """Special token id -> its content."""
        if not hasattr(self, "_content_of"):
            self._content_of = {i: c for c, i in self.specials.items()}
        return self._content_of

    def space_mask(self) -> np.ndarray:
        """``[V]`` bool: the tokens whose text starts with a space (tokenkit's ``get_space_mask``, mode "space": a
        word begins with them)."""
        return np.array([bool(b) and b[:1] == b" " and not sp for b, sp in zip(self.table, self.special)], bool)

    def first_byte(self) -> np.ndarray:
        """``[V]`` int64: each token's first byte, 256 for a special or empty token."""
        return np.array([256 if sp or not b else b[0] for b, sp in zip(self.table, self.special)], np.int64)

    def extensions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which tokens continue each token's text, CSR: for token v, ``ids[ptr[v]:ptr[v + 1]]`` are the tokens whose
        bytes strictly extend v's, and ``next_byte`` (same slice) the byte of each that follows v's text
        (``extending`` of each token's bytes). Special and empty tokens have none."""
        per = [self.extending(b) if b and not self.special[v] else (np.zeros(0, np.int64), np.zeros(0, np.int64))
               for v, b in enumerate(self.table)]
        ptr = np.concatenate([[0], np.cumsum([x.size for x, _ in per])]).astype(np.int64)
        return (ptr, np.concatenate([x for x, _ in per]).astype(np.int64) if per else np.zeros(0, np.int64),
                np.concatenate([y for _, y in per]).astype(np.int64) if per else np.zeros(0, np.int64))

    def extending(self, prefix: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The tokens whose bytes strictly extend ``prefix`` (any byte string, not only a token's) and the byte of
        each that follows it: ``(ids, next_byte)``, remembered per prefix. Special and empty tokens are none's."""
        memo = self.__dict__.setdefault("_extending", {})
        if prefix not in memo:
            if "_sorted" not in self.__dict__:
                keys = sorted((b, i) for i, b in enumerate(self.table) if b and not self.special[i])
                self._sorted = ([b for b, _ in keys], np.asarray([i for _, i in keys], np.int64))
            texts, order = self._sorted
            lo = bisect.bisect_right(texts, prefix)  # the extensions sort right after the prefix, up to
            hi = bisect.bisect_left(texts, prefix + b"\xff" * (int(self.length.max(initial=0)) + 1))  # this bound
            memo[prefix] = (order[lo:hi], np.asarray([texts[k][len(prefix)] for k in range(lo, hi)], np.int64))
        return memo[prefix]

    def id_of(self, text: bytes) -> int | None:
        """The (lowest) id of the non-special token that spells ``text`` exactly, or None."""
        if "_id_of" not in self.__dict__:
            self._id_of = {}
            for i, b in enumerate(self.table):
                if b and not self.special[i]:
                    self._id_of.setdefault(b, i)
        return self._id_of.get(text)

    def spell(self, ids) -> bytes:
        """The bytes a token sequence spells (special tokens spell nothing)."""
        return b"".join(self.table[int(i)] for i in ids)


def roles(tb: TokenBytes, ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each teacher token's role, [T]: SPECIAL, TARGET (text at a cached target position) or CONTEXT; a run of
    target tokens is trimmed (edge tokens become CONTEXT) until both its edges are whole UTF-8 characters and its
    bytes decode, so target text is always valid text."""
    ids = np.asarray(ids, np.int64)
    role = np.where(tb.special[ids], SPECIAL, np.where(np.asarray(target, bool), TARGET, CONTEXT))
    first = np.array([b[0] if b else 0 for b in (tb.table[i] for i in ids)], np.int64)
    cont = (first & 0xC0) == 0x80  # the token starts inside a character
    for a, b in runs(role == TARGET):
        while a < b and (cont[a] or tb.length[ids[a]] == 0):
            role[a], a = CONTEXT, a + 1
        while a < b and b < len(ids) and cont[b] and role[b] != SPECIAL:
            role[b - 1], b = CONTEXT, b - 1
        if a < b:
            try:
                tb.spell(ids[a:b]).decode("utf-8")
            except UnicodeDecodeError:
                role[a:b] = CONTEXT
    return role


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of True in a 1-d mask."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@dataclasses.dataclass
class Alignment:
    """One sequence on both sides. ``chunk_of_teacher [T]`` / ``chunk_of_student [S]``: the chunk each token
    belongs to (-1: none); ``chunk_bytes [C]``: the bytes a chunk spells (0 for a special token's chunk)."""

    student_ids: np.ndarray  # [S] int64
    chunk_of_teacher: np.ndarray  # [T] int64
    chunk_of_student: np.ndarray  # [S] int64
    chunk_bytes: np.ndarray  # [C] int64

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_bytes.size)


def segments(tb: TokenBytes, ids: np.ndarray, role: np.ndarray) -> list[tuple[int, int, int]]:
    """The teacher sequence as ``(role, a, b)`` segments: each special token alone, text in maximal runs of one role."""
    out, a = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or role[i] != role[a] or role[a] == SPECIAL:
            out.append((int(role[a]), a, i))
            a = i
    return out


def align(teacher: TokenBytes, student: TokenBytes, student_tokenizer, ids: np.ndarray, target: np.ndarray, *,
          bos: list[int] | None = None, max_length: int | None = None) -> Alignment:
    """Encode the text of teacher ``ids [T]`` with the student's tokenizer and chunk its target runs (module
    docstring). ``target [T]``: teacher tokens at cached target positions; ``bos``: ids the student's sequence
    starts with; ``max_length``: the student sequence is cut there (chunks past it are dropped)."""
    ids = np.asarray(ids, np.int64)
    role = roles(teacher, ids, target)
    segs = segments(teacher, ids, role)
    texts = [teacher.spell(ids[a:b]).decode("utf-8", errors="replace") for r, a, b in segs if r != SPECIAL]
    encoded = iter(student_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    s_ids: list[int] = list(bos or [])
    c_t, c_s = np.full(len(ids), -1, np.int64), [-1] * len(s_ids)
    nbytes: list[int] = []
    for r, a, b in segs:
        if r == SPECIAL:
            sid = student.specials.get(teacher.content_of.get(int(ids[a]), ""))
            if sid is None:
                continue  # the student has no such token: it sees nothing here
            s_ids.append(sid)
            if target[a]:
                c_t[a] = len(nbytes)
                c_s.append(len(nbytes))
                nbytes.append(0)
            else:
                c_s.append(-1)
            continue
        enc = np.asarray(next(encoded), np.int64)
        if r == CONTEXT:
            s_ids.extend(enc.tolist())
            c_s.extend([-1] * enc.size)
            continue
        t_len = teacher.length[ids[a:b]]
        s_len = student.length[enc].copy()
        if student.prefix_space and enc.size:
            s_len[0] -= 1  # the space the tokenizer put in front of the segment is not in the text
        if s_len.sum() != t_len.sum() or (s_len < 0).any():
            text = teacher.spell(ids[a:b])[:40]
            raise UnsupportedTokenizerError(f"tokenizer {student.name}: encoding {text!r}... does not reproduce its "
                                            "bytes; cross-tokenizer alignment needs a lossless tokenizer")
        s_ids.extend(enc.tolist())
        t_end, s_end = np.cumsum(t_len), np.cumsum(s_len)
        bounds = np.concatenate([[0], np.intersect1d(t_end, s_end)])  # where both have a token boundary
        base = len(nbytes)
        c_t[a:b] = base + np.searchsorted(bounds, t_end, side="left") - 1
        s_start = s_end - s_len
        key = np.where(s_len > 0, s_end, s_start + 0.5)  # an empty student token joins the chunk it starts
        c_s.extend((base + np.searchsorted(bounds, key, side="left") - 1).tolist())
        nbytes.extend(np.diff(bounds).tolist())
    s_arr, c_s_arr = np.asarray(s_ids, np.int64), np.asarray(c_s, np.int64)
    c = len(nbytes)
    full = np.bincount(c_s_arr[c_s_arr >= 0], minlength=c)
    if max_length is not None and s_arr.size > max_length:
        s_arr, c_s_arr = s_arr[:max_length], c_s_arr[:max_length]
    # a chunk the student cannot predict in full is dropped: one holding its first token (nothing precedes it),
    # or one cut short by max_length; the others are renumbered 0..C-1
    ok = (np.bincount(c_s_arr[c_s_arr >= 0], minlength=c) == full) & (full > 0)
    if c_s_arr.size and c_s_arr[0] >= 0:
        ok[c_s_arr[0]] = False
    new = np.cumsum(ok) - 1

    def remap(x: np.ndarray) -> np.ndarray:
        safe = np.maximum(x, 0)
        return np.where((x >= 0) & ok[safe], new[safe], -1) if c else np.full(x.shape, -1, np.int64)

    return Alignment(s_arr, remap(c_t), remap(c_s_arr), np.asarray(nbytes, np.int64)[ok])


def chunk_ends(al: Alignment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk ``[C]``: its first and last teacher token and its last student token (indices into the sequences)."""
    c = al.n_chunks
    first, last, s_last = np.full(c, np.iinfo(np.int64).max), np.full(c, -1), np.full(c, -1)
    t = np.flatnonzero(al.chunk_of_teacher >= 0)
    np.minimum.at(first, al.chunk_of_teacher[t], t)
    np.maximum.at(last, al.chunk_of_teacher[t], t)
    s = np.flatnonzero(al.chunk_of_student >= 0)
    np.maximum.at(s_last, al.chunk_of_student[s], s)
    return first, last, s_last


def merge_chunks(al: Alignment, close: np.ndarray) -> Alignment:
    """Join each run of consecutive chunks into one, closing a run after chunk c where ``close[c]``; a run also
    closes where the next chunk does not follow on in the teacher's sequence (a context stretch or a dropped chunk
    between them) and around special tokens' chunks (they spell no text), so a merged chunk is always one stretch
    of text on both sides."""
    c = al.n_chunks
    if c == 0:
        return al
    first, last, _ = chunk_ends(al)
    ends = np.asarray(close, bool).copy()
    ends[-1] = True
    special = al.chunk_bytes == 0
    ends[:-1] |= (first[1:] != last[:-1] + 1) | special[1:] | special[:-1]
    group = np.concatenate([[0], np.cumsum(ends[:-1])])

    def remap(x: np.ndarray) -> np.ndarray:
        return np.where(x >= 0, group[np.maximum(x, 0)], -1)

    return Alignment(al.student_ids, remap(al.chunk_of_teacher), remap(al.chunk_of_student),
                     np.bincount(group, weights=al.chunk_bytes, minlength=int(group[-1]) + 1).astype(np.int64))
