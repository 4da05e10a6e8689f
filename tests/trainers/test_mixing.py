"""Mixing two caches per batch at ratio lambda (GKD's lambda): which batch comes from where, each stream's order,
resume, and the trainer with --mix-cache. References: the coin re-derived here from its documented definition,
and plain ``StreamingLoader`` streams of each cache alone."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import logitstore
from logitstore import TopK
from logitstore.errors import InvalidInputError
from logitstore.selection import save_selection
from logitstore.subset import make_selection
from tests.conftest import make_sequences, write_cache
from trainers.config import TrainConfig
from trainers.data import StreamingLoader
from trainers.mixing import MixedLoader


def coin(seed: int, i: int, ratio: float) -> bool:
    """trainers/mixing.py: blake2b-64 of "mix/<seed>/<i>" as a little-endian integer, below ratio * 2^64."""
    return int.from_bytes(hashlib.blake2b(f"mix/{seed}/{i}".encode(), digest_size=8).digest(), "little") \
        < ratio * 2**64


@pytest.fixture(scope="module")
def halves(text_cache, tmp_path_factory):
    """Two disjoint selections of the text cache: the 'on-policy' and the 'off-policy' data."""
    d = tmp_path_factory.mktemp("halves")
    out = {}
    for name, where in (("a", "substr(seq_id, 1, 1) < '8'"), ("b", "substr(seq_id, 1, 1) >= '8'")):
        sel = make_selection(text_cache, where=where)
        save_selection(d / f"{name}.json", sel)
        out[name] = (d / f"{name}.json", set(sel.seq_ids))
    assert out["a"][1] and out["b"][1]
    return out


def loader(src, seed):
    return StreamingLoader(src, batch_size=3, max_length=48, seed=seed, buffer_size=16)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_each_batch_comes_from_the_stream_the_seeded_coin_names(halves):
    (a, ids_a), (b, ids_b) = halves["a"], halves["b"]
    mixed = take(iter(MixedLoader(loader(a, 1), loader(b, 2), ratio=0.3, seed=7)), 40)
    want = [coin(7, i, 0.3) for i in range(40)]
    assert 4 <= sum(want) <= 20  # a ratio of 0.3 over 40 batches (the coin is fixed: 0.3 * 40 = 12 expected)
    for batch, from_a in zip(mixed, want):
        assert set(batch["seq_ids"]) <= (ids_a if from_a else ids_b)
        assert batch["mixed_from"] == ("primary" if from_a else "other")
    # each stream keeps its own order: the batches of each source are that stream's batches alone, in order
    plain_a, plain_b = take(iter(loader(a, 1)), sum(want)), take(iter(loader(b, 2)), 40 - sum(want))
    assert [x["seq_ids"] for x, w in zip(mixed, want) if w] == [x["seq_ids"] for x in plain_a]
    assert [x["seq_ids"] for x, w in zip(mixed, want) if not w] == [x["seq_ids"] for x in plain_b]
    for x, y in zip([x for x, w in zip(mixed, want) if w], plain_a):
        np.testing.assert_array_equal(x["topk_logprobs"].numpy(), y["topk_logprobs"].numpy())


def test_ratio_one_and_zero_read_one_stream_only(halves):
    (a, ids_a), (b, ids_b) = halves["a"], halves["b"]
    for ratio, ids in ((1.0, ids_a), (0.0, ids_b)):
        for batch in take(iter(MixedLoader(loader(a, 1), loader(b, 2), ratio=ratio, seed=0)), 12):
            assert set(batch["seq_ids"]) <= ids


def test_resume_continues_the_same_mixed_stream(halves):
    (a, _), (b, _) = halves["a"], halves["b"]
    whole = [x["seq_ids"] for x in take(iter(MixedLoader(loader(a, 1), loader(b, 2), ratio=0.5, seed=3)), 30)]
    first = MixedLoader(loader(a, 1), loader(b, 2), ratio=0.5, seed=3)
    head = [x["seq_ids"] for x in take(iter(first), 13)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    again = MixedLoader(loader(a, 1), loader(b, 2), ratio=0.5, seed=3)
    again.load_state_dict({**state, "rank": 0})
    assert head + [x["seq_ids"] for x in take(iter(again), 17)] == whole
    other = MixedLoader(loader(a, 1), loader(b, 2), ratio=0.4, seed=3)
    with pytest.raises(InvalidInputError, match="ratio 0.5"):
        other.load_state_dict(state)


def train_cfg(cache, student, out, **kw):
    base = dict(cache=str(cache), student=str(student), output=str(out), max_steps=10, batch_size=3, max_length=48,
                lr=3e-3, quiet=True, log_every=1, seed=4, trace_data=True)
    base.update(kw)
    return TrainConfig(**base)


def test_training_with_a_mix_cache_draws_batches_as_the_coin_says(halves, student_config, tmp_path):
    from trainers.loop import train

    (a, ids_a), (b, ids_b) = halves["a"], halves["b"]
    out = tmp_path / "run"
    summary = train(train_cfg(a, student_config, out, mix_cache=str(b), mix_ratio=0.6))
    assert summary["steps"] == 10
    rows = [json.loads(x) for x in (out / "data-rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))
    for r in rows:
        assert set(r["seq_ids"]) <= (ids_a if coin(4, r["step"], 0.6) else ids_b)
    assert {coin(4, i, 0.6) for i in range(10)} == {True, False}  # this seed does mix both


def test_a_resumed_mixed_run_ends_with_the_same_weights(halves, student_config, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from trainers.loop import train

    (a, _), (b, _) = halves["a"], halves["b"]
    kw = dict(mix_cache=str(b), save_every=3, keep_checkpoints=5)
    train(train_cfg(a, student_config, tmp_path / "whole", **kw))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # as if killed after the step-6 checkpoint
    for name in ("checkpoints/step-0000009", "checkpoints/step-0000010"):
        shutil.rmtree(tmp_path / "cut" / name, ignore_errors=True)
    for f in ("model.safetensors", "summary.json"):
        (tmp_path / "cut" / f).unlink()
    train(train_cfg(a, student_config, tmp_path / "cut", resume=True, **kw))
    w, c = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert w.keys() == c.keys() and all(torch.equal(w[k], c[k]) for k in w)
    assert (tmp_path / "whole" / "data-rank0.jsonl").read_text() == (tmp_path / "cut" / "data-rank0.jsonl").read_text()


def test_incompatible_mix_caches_and_epochs_are_refused(text_cache, student_config, tmp_path):
    from trainers.loop import train

    rng = np.random.default_rng(0)
    write_cache(tmp_path / "small", make_sequences(rng, 3, vocab=60, rule=TopK(4), max_tokens=8, min_tokens=2),
                vocab=60, rule=TopK(4))
    with pytest.raises(InvalidInputError, match="vocab_size: CACHE has 49152, --mix-cache has 60"):
        train(train_cfg(text_cache, student_config, tmp_path / "r", mix_cache=str(tmp_path / "small")))
    with pytest.raises(InvalidInputError, match="--epochs counts passes over one cache"):
        train(train_cfg(text_cache, student_config, tmp_path / "r", mix_cache=str(text_cache), epochs=1.0))
    with pytest.raises(InvalidInputError, match="--mix-ratio 1.5"):
        train(train_cfg(text_cache, student_config, tmp_path / "r", mix_cache=str(text_cache), mix_ratio=1.5))
    assert not (tmp_path / "r").exists()
    assert logitstore.open(text_cache).manifest.complete
