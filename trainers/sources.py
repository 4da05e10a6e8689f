"""What a training run reads: the damaged-cache check before training, and the train / held-out split.

``check_cache`` runs ``verify`` without decoding (checksums, schema, counts) and refuses a
damaged cache, or (``--skip-bad-shards``) returns the seq ids of its sound shards.
``train_and_eval_sources`` gives the loader its sources: the cache or selection itself, a
selection of the sound shards, or a seeded hash split (``--holdout``) that is the same for
every ``--seed``, so runs with different seeds evaluate on the same sequences. ``check_mix_cache``
refuses a ``--mix-cache`` whose batches the objective could not take like CACHE's.
"""

from __future__ import annotations

import logging

from logitstore.errors import CorruptCacheError, InvalidInputError
from logitstore.selection import Selection, cache_fingerprint, in_fraction
from logitstore.verify import remote_listing, verify
from trainers.config import TrainConfig

logger = logging.getLogger(__name__)

HOLDOUT_SEED = 0x401D  # fixed, so runs with different --seed evaluate on the same held-out sequences


def check_cache(cache, *, skip_bad: bool, what: str = "CACHE") -> list[str] | None:
    """Refuse a damaged cache before training (``verify`` without decoding: checksums, schema, counts).

    Returns None when it is sound, else (with ``skip_bad``) the seq ids of its sound shards, after
    logging which shards are left out and why. Files the manifest does not list (a stray or
    temporary file) are ignored: readers never look at them."""
    listed = {s.file: i for i, s in enumerate(cache.manifest.shards)}
    problems = [p for p in (verify(cache.path, deep=False) if cache.mirror is None else remote_listing(cache))
                if "not listed in the manifest" not in p.message]
    if not problems:
        return None
    bad = {listed[p.file] for p in problems if p.file in listed}
    fatal = [p for p in problems if p.file not in listed]
    text = "; ".join(str(p) for p in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    if fatal or not skip_bad or len(bad) == len(listed):
        hint = "" if fatal else " (or pass --skip-bad-shards to train on the sound shards)"
        raise CorruptCacheError(f"{what} {cache.location} is damaged, refusing to train: {text}; run `logitstore "
                                f"verify {cache.location}` for the full list; restore the damaged shards from a copy "
                                f"or rebuild the cache into a new directory{hint}")
    logger.warning("skipping %d damaged shard(s) of %s: %s", len(bad), cache.location, text)
    keep = set()
    for i in range(len(listed)):
        if i not in bad:
            keep.update(cache.read(i, None, ["seq_id"], restrict=False).column(0).to_pylist())
    return [sid for sid in cache.scalars(["seq_id"]).column(0).to_pylist() if sid in keep] if cache.selection \
        else sorted(keep)


def check_mix_cache(cache, mix) -> None:
    """Refuse a ``--mix-cache`` that differs from CACHE in what the loss reads: the vocabulary, the tokenizer, the
    rule (its k may differ: each batch is padded to its own k) or whether logprobs are stored."""
    a, b = cache.manifest, mix.manifest
    rule_a = {k: v for k, v in a.rule.items() if k != "k"}
    rule_b = {k: v for k, v in b.rule.items() if k != "k"}
    diffs = [f"{what}: CACHE has {x!r}, --mix-cache has {y!r}" for what, x, y in (
        ("vocab_size", a.vocab_size, b.vocab_size),
        ("tokenizer fingerprint", (a.tokenizer or {}).get("fingerprint"), (b.tokenizer or {}).get("fingerprint")),
        ("rule (k aside)", rule_a, rule_b),
        ("logprobs stored", a.codec.get("values") != "none", b.codec.get("values") != "none")) if x != y]
    if diffs:
        raise InvalidInputError(f"--mix-cache {mix.location} cannot be mixed with {cache.location}: "
                                + "; ".join(diffs))


def check_usable(cache, what: str, allow_incomplete: bool) -> None:
    """Refuse to train on an unfinished build (a writer still running, or one that crashed: its manifest says
    ``complete: false``) unless ``allow_incomplete``, which trains on what is committed with a warning; and refuse a
    cache or selection with no sequence at all."""
    m = cache.manifest
    if not m.complete:
        if not allow_incomplete:
            raise InvalidInputError(
                f"{what} {cache.location} is an unfinished build (complete: false in its manifest: still being built, "
                f"or interrupted): it holds only the {m.sequences} sequences committed so far; finish it with "
                "`logitstore build ... --resume`, or pass --allow-incomplete to train on what is committed")
        logger.warning("%s %s is an unfinished build: training on the %d sequences committed so far "
                       "(--allow-incomplete)", what, cache.location, m.sequences)
    if len(cache) == 0:
        raise InvalidInputError(f"{what} {cache.location if cache.selection is None else 'selection'} holds no "
                                "sequence to train on")


def train_and_eval_sources(cfg: TrainConfig, cache, only: list[str] | None = None, eval_cache=None):
    """(train source, eval source or None): the cache/selection itself (as opened and checked: ``Cache.source``),
    or a seeded hash split of it, restricted to the seq ids ``only`` when given (the sound shards of a damaged
    cache)."""
    eval_source = None if eval_cache is None else eval_cache.source
    if not cfg.holdout and only is None:
        return cache.source, eval_source
    ids = only if only is not None else cache.scalars(["seq_id"]).column(0).to_pylist()
    w = cache.weights
    if not cfg.holdout:
        return Selection(cache=cache.location, cache_fingerprint=cache_fingerprint(cache.manifest), seq_ids=ids,
                         weights=[w[x] for x in ids] if w else None, query="sound shards"), eval_source
    parts: dict[bool, list[str]] = {True: [], False: []}
    for sid in ids:
        parts[in_fraction(sid, HOLDOUT_SEED, cfg.holdout)].append(sid)
    if not parts[True] or not parts[False]:
        raise InvalidInputError(f"--holdout {cfg.holdout} leaves {len(parts[False])} training and "
                                f"{len(parts[True])} held-out sequences of {len(ids)}; both must be non-empty")
    fp = cache_fingerprint(cache.manifest)
    sel = {held: Selection(cache=cache.location, cache_fingerprint=fp, seq_ids=s,
                           weights=[w[x] for x in s] if w and not held else None, query=f"holdout {cfg.holdout}")
           for held, s in parts.items()}
    return sel[False], sel[True]
