"""Alignment of two tokenizations by byte offsets, on hand-made texts whose chunkings are known."""

from __future__ import annotations

import numpy as np
import pytest

from trainers.align import CONTEXT, SPECIAL, TARGET, TokenBytes, UnsupportedTokenizerError, align, roles

#: merges of the hand-made BPE student, applied in this order (GPT-2 byte-level symbols: Ġ space, Ċ newline)
HAND_MERGES = [("Ġ", "Ġ"), ("Ċ", "Ċ"), ("ä", "¸"), ("ä¸", "Ń"), ("H", "e"), ("l", "l"), ("ll", "o"), ("Ġ", "w"),
               ("o", "r"), ("Ġw", "or")]


def hand_bpe(tmp_path, specials=("<|im_start|>", "<|im_end|>")):
    """A byte-level BPE student with a few known merges (no regex pre-split, so merges cross whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from trainers.align import byte_level_alphabet

    vocab = {c: b for c, b in byte_level_alphabet().items()}
    for a, b in HAND_MERGES:
        vocab[a + b] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=HAND_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if specials:
        tok.add_special_tokens(list(specials))
    out = tmp_path / f"hand{len(specials)}"
    PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=list(specials)).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def teacher(embedded_tokenizer):
    return TokenBytes.of(embedded_tokenizer)


@pytest.fixture(scope="module")
def byte_student(tmp_path_factory):
    from transformers import AutoTokenizer

    from tools.student_tokenizers import byte_tokenizer

    tok = AutoTokenizer.from_pretrained(byte_tokenizer(tmp_path_factory.mktemp("bytes")))
    return tok, TokenBytes.of(tok)


def chunks(al):
    """The chunking as lists: per chunk, (teacher token indices, student token indices, bytes)."""
    return [(np.flatnonzero(al.chunk_of_teacher == c).tolist(), np.flatnonzero(al.chunk_of_student == c).tolist(),
             int(al.chunk_bytes[c])) for c in range(al.n_chunks)]


def ids_of(tok, tokens):
    return np.array(tok.convert_tokens_to_ids(tokens), np.int64)


@pytest.mark.parametrize("text", ["Hello world", "na\u00efve caf\u00e9 \u4e2d\u6587", "a  b\n\n\tc", "\U0001f600!"])
def test_token_bytes_spell_the_text(embedded_tokenizer, teacher, byte_student, text):
    ids = embedded_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert teacher.spell(ids) == text.encode("utf-8")
    tok, tb = byte_student
    assert tb.spell(tok(text, add_special_tokens=False)["input_ids"]) == text.encode("utf-8")
    assert len(tok) == 259 and tb.special.sum() == 3 and not tb.prefix_space


def test_byte_student_chunks_are_the_teacher_tokens(embedded_tokenizer, teacher, byte_student):
    tok, tb = byte_student
    ids = np.array(embedded_tokenizer("Hello world", add_special_tokens=False)["input_ids"])  # Hello | Ġworld
    al = align(teacher, tb, tok, ids, np.array([False, True]))
    assert al.student_ids.tolist() == list(b"Hello world")
    assert chunks(al) == [([1], list(range(5, 11)), 6)]  # "Hello" is context: the teacher never predicts it


def test_whitespace_merges_make_multi_token_chunks(tmp_path, embedded_tokenizer, teacher):
    tok = hand_bpe(tmp_path)
    tb = TokenBytes.of(tok)
    ids = ids_of(embedded_tokenizer, ["a", "Ġ", "Ġb"])  # "a  b"
    al = align(teacher, tb, tok, ids, np.array([False, True, True]))
    assert tok.convert_ids_to_tokens(al.student_ids.tolist()) == ["a", "ĠĠ", "b"]
    assert chunks(al) == [([1, 2], [1, 2], 3)]  # the teacher's boundary after the first space is not common
    ids = ids_of(embedded_tokenizer, ["x", "Ċ", "Ċ", "y"])  # "x\n\ny"
    al = align(teacher, tb, tok, ids, np.array([False, True, True, True]))
    assert tok.convert_ids_to_tokens(al.student_ids.tolist()) == ["x", "ĊĊ", "y"]
    assert chunks(al) == [([1, 2], [1], 2), ([3], [2], 1)]
    ids = np.array(embedded_tokenizer("Hello world", add_special_tokens=False)["input_ids"])
    al = align(teacher, tb, tok, ids, np.array([False, True]))
    assert tok.convert_ids_to_tokens(al.student_ids.tolist()) == ["He", "llo", "Ġwor", "l", "d"]
    assert chunks(al) == [([1], [2, 3, 4], 6)]


def test_multi_byte_characters(tmp_path, embedded_tokenizer, teacher, byte_student):
    ids = ids_of(embedded_tokenizer, ["a", "ä", "¸", "Ń"])  # "a中": the teacher spells 中 in three byte tokens
    assert teacher.spell(ids) == "a\u4e2d".encode()
    tok = hand_bpe(tmp_path)
    al = align(teacher, TokenBytes.of(tok), tok, ids, np.array([False, True, True, True]))
    assert tok.convert_ids_to_tokens(al.student_ids.tolist()) == ["a", "ä¸Ń"]
    assert chunks(al) == [([1, 2, 3], [1], 3)]
    btok, btb = byte_student
    al = align(teacher, btb, btok, ids, np.array([False, True, True, True]))
    assert chunks(al) == [([1], [1], 1), ([2], [2], 1), ([3], [3], 1)]  # bytes: every boundary is common
    # a target run starting or ending inside a character is trimmed to whole characters (here: to nothing)
    for target in ([False, False, True, True], [False, True, True, False]):
        r = roles(teacher, ids, np.array(target))
        assert (r == CONTEXT).all()
        assert align(teacher, btb, btok, ids, np.array(target)).n_chunks == 0


def test_special_tokens_align_by_content_or_drop(tmp_path, embedded_tokenizer, teacher, byte_student):
    ids = np.array(embedded_tokenizer("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"])
    target = np.array([False, True, True, True, True])
    assert roles(teacher, ids, target).tolist() == [SPECIAL, TARGET, TARGET, TARGET, SPECIAL]
    tok, tb = byte_student
    al = align(teacher, tb, tok, ids, target)
    assert al.student_ids.tolist() == [tb.specials["<|im_start|>"], *b"user\nHi", tb.specials["<|im_end|>"]]
    assert chunks(al) == [([1], [1, 2, 3, 4], 4), ([2], [5], 1), ([3], [6, 7], 2), ([4], [8], 0)]
    bare = hand_bpe(tmp_path, specials=())  # no such special tokens: the student sees the text alone
    al = align(teacher, TokenBytes.of(bare), bare, ids, target)
    assert bare.convert_ids_to_tokens(al.student_ids.tolist()) == list("user") + ["Ċ", "H", "i"]
    # "user" holds the student's first token, which nothing predicts: that chunk is dropped
    assert chunks(al) == [([2], [4], 1), ([3], [5, 6], 2)]


def test_max_length_drops_cut_chunks(embedded_tokenizer, teacher, byte_student):
    tok, tb = byte_student
    ids = np.array(embedded_tokenizer("Hello world again", add_special_tokens=False)["input_ids"])
    full = align(teacher, tb, tok, ids, np.arange(len(ids)) > 0)
    cut = align(teacher, tb, tok, ids, np.arange(len(ids)) > 0, max_length=14)  # inside " again"
    assert cut.student_ids.tolist() == full.student_ids.tolist()[:14]
    assert chunks(cut) == chunks(full)[:1]


def test_a_lossy_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")} | {"[UNK]": 26},
                                     unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lossy = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(UnsupportedTokenizerError, match="byte for byte"):
        TokenBytes.of(lossy)


@pytest.mark.parametrize("prefix", [b"", b" th", b" the", b"ing", b"\xe4\xb8", b"\xff", b"zzzzzzzzqq"])
def test_extending_and_id_of_equal_a_scan_of_the_vocabulary(teacher, prefix):
    """The tokens strictly extending a byte string (any, not only a token's) and their next bytes, and the id that
    spells a string, against a plain scan of every token's bytes."""
    want = sorted((i, b[len(prefix)]) for i, b in enumerate(teacher.table)
                  if not teacher.special[i] and len(b) > len(prefix) and b.startswith(prefix))
    ids, nxt = teacher.extending(prefix)
    assert sorted(zip(ids.tolist(), nxt.tolist())) == want
    assert (len(want) > 0) == (prefix not in (b"\xff", b"zzzzzzzzqq"))
    spelled = [i for i, b in enumerate(teacher.table) if b == prefix and not teacher.special[i]]
    assert teacher.id_of(prefix) == (min(spelled) if spelled else None)
