"""Tokenizers for cross-tokenizer students, made offline: a byte-level one built in code, and a small trained BPE.

Both are real ``transformers`` fast tokenizers saved to a directory (``tokenizer.json`` and its
config), so a student ``config.json`` next to them (or ``--student-tokenizer DIR``) is a complete
cross-tokenizer student, and ``AutoTokenizer.from_pretrained(DIR)`` loads them back.

- ``byte_tokenizer(DIR)``: 256 byte tokens (GPT-2's byte-level alphabet, id = byte value) plus the
  special tokens of SmolLM2's chat format (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``).
- ``bpe_tokenizer(DIR, texts, vocab_size)``: byte-level BPE trained with the ``tokenizers`` library on
  local text, with the same special tokens.

Used by the tests and ``tools/bench_cross.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _save(tok, out: str | Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=list(SPECIALS[1:]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def byte_tokenizer(out: str | Path) -> Path:
    """A byte-level tokenizer (one token per byte, id = byte value, then the special tokens) saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from trainers.align import byte_level_alphabet

    by_byte = {b: c for c, b in byte_level_alphabet().items()}
    vocab = {by_byte[b]: b for b in range(256)}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return _save(tok, out)


def bpe_tokenizer(out: str | Path, texts: Iterable[str], vocab_size: int = 1024) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts``, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _save(tok, out)
