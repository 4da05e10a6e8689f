"""``logitstore build --top-k K --tail-draws D [--proposal-temperature T]`` and ``--sample D`` end to end.

The head entries, label logprob and entropy are checked against the plain full-vocabulary
reference of the tiny teacher; the tail draws are outside the head, carry the reference's
logprobs, and are reproducible for a seed; bad flags are refused with one line and nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest

import logitstore
from logitstore.rules import MassTopK, Sampled, TopK, TopKTail
from logitstore.verify import verify
from tests.builders.conftest import reference_logprobs
from tests.builders.test_driver import write_jsonl
from tests.conftest import FP32_ATOL
from tools.cli import main
from tools.cli.build import _flags_of
from tools.cli.build import _rule as _rule_of_args


def student_config(tmp_path):
    """A one-layer student with the tiny teacher's vocabulary, as a config.json to initialise from."""
    from transformers import LlamaConfig

    cfg = tmp_path / "student" / "config.json"
    cfg.parent.mkdir()
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True).to_json_file(str(cfg))
    return cfg


def tail_cache(tiny_teacher, tmp_path, sequences: int):
    """A ``--top-k 4 --tail-draws 8`` cache of ``sequences`` records."""
    data = tmp_path / "d.jsonl"
    write_jsonl(data, sequences)
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "--tail-draws", "8",
                 "-q"]) == 0
    return out


def test_a_tail_draw_build_matches_the_reference(tiny_teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 6)
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "6", "--tail-draws", "20",
                 "--proposal-temperature", "1.5", "--values", "fp32", "-q"]) == 0
    assert verify(out) == []
    cache = logitstore.open(out)
    assert cache.manifest.rule == {"rule": "topk_tail", "k": 6, "tail_draws": 20, "proposal_temperature": 1.5}
    assert cache.manifest.exactness["tail_logprobs"] == "exact"
    for seq in cache:
        ref = reference_logprobs(tiny_teacher, seq.input_ids)[seq.pos - 1]
        head = np.sort(ref, -1)[:, ::-1][:, :6]
        np.testing.assert_allclose(seq.logprobs, head, atol=FP32_ATOL)
        for i in range(len(seq.pos)):
            n = int(seq.n_tail[i])
            assert n >= 1 and int(seq.tail_counts[i, :n].sum()) == 20
            ids = seq.tail_ids[i, :n]
            np.testing.assert_allclose(seq.tail_logprobs[i, :n], ref[i, ids], atol=FP32_ATOL)
            assert ref[i, ids].max() <= head[i, -1] + 2 * FP32_ATOL  # tail draws are no head entry
            rest = np.ones(ref.shape[1], bool)
            rest[np.argsort(-ref[i])[:6]] = False
            want = np.log(np.exp(ref[i][rest] / 1.5).sum())
            assert abs(float(seq.proposal_log_norm[i]) - want) < 10 * FP32_ATOL


def test_draws_are_reproducible_for_a_seed_and_change_with_it(tiny_teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 4)

    def tails(out, seed):
        assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "--tail-draws", "8",
                     "--seed", str(seed), "-q"]) == 0
        return {s.seq_id: (s.tail_ids.tolist(), s.tail_counts.tolist()) for s in logitstore.open(out)}

    a, b, c = tails(tmp_path / "a", 1), tails(tmp_path / "b", 1), tails(tmp_path / "c", 2)
    assert a == b and a != c


@pytest.mark.parametrize("flags, message", [
    (["--tail-draws", "8"], "--tail-draws 8 draws from the tail of an exact top-k head: give --top-k K too"),
    (["--top-k", "4", "--tail-draws", "0"], "--tail-draws 0: must be an integer in [1, 65535]"),
    (["--top-k", "4", "--tail-draws", "-2"], "--tail-draws -2: must be an integer in [1, 65535]"),
    (["--top-k", "4", "--tail-draws", "8", "--proposal-temperature", "0"], "--proposal-temperature 0.0: must be"),
    (["--top-k", "4", "--tail-draws", "8", "--proposal-temperature", "-1"], "--proposal-temperature -1.0: must be"),
    (["--sample", "8", "--proposal-temperature", "nan"], "--proposal-temperature nan: must be"),
    (["--top-k", "4", "--proposal-temperature", "2"], "--proposal-temperature shapes the draws of --sample"),
    (["--mass", "0.9", "--tail-draws", "4"], "--mass and --tail-draws are different rules"),
    (["--top-k", "4", "--tail-draws", "4", "--values", "none"], "only allowed under rule sample"),
    (["--top-k", "4", "--tail-draws", "4", "--backend", "vllm"], None),  # vLLM is refused before any engine starts
    (["--top-k", "4", "--systematic"], "--systematic shapes the draws of --sample or --tail-draws"),
])
def test_bad_rule_flags_are_refused_with_one_line_and_nothing_written(tiny_teacher, tmp_path, capsys, flags,
                                                                        message):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, 2)
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "-q", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("logitstore build: ")
    if message is not None:
        assert message in err, err
    assert not out.exists()


def test_a_systematic_build_records_its_design_and_trains_with_either_estimator(tiny_teacher, tmp_path):
    """``--systematic``: the manifest's rule says ``design: systematic``; every tail id is drawn floor(D q) or
    ceil(D q) times for q the reference proposal; the cache verifies and trains with both estimators."""

    data = tmp_path / "d.jsonl"
    write_jsonl(data, 4)
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "--top-k", "4", "--tail-draws", "24",
                 "--proposal-temperature", "2", "--systematic", "--values", "fp32", "-q"]) == 0
    assert verify(out) == []
    cache = logitstore.open(out)
    assert cache.manifest.rule == {"rule": "topk_tail", "k": 4, "tail_draws": 24, "proposal_temperature": 2.0,
                                   "design": "systematic"}
    assert cache.rule.systematic
    for seq in cache:
        ref = reference_logprobs(tiny_teacher, seq.input_ids)[seq.pos - 1]
        for i in range(len(seq.pos)):
            rest = np.ones(ref.shape[1], bool)
            rest[np.argsort(-ref[i])[:4]] = False
            q = np.where(rest, np.exp(ref[i] / 2.0), 0.0)
            q /= q.sum()
            n = int(seq.n_tail[i])
            got = np.zeros(ref.shape[1])
            got[seq.tail_ids[i, :n]] = seq.tail_counts[i, :n]
            assert ((got >= np.floor(24 * q - 1e-3)) & (got <= np.ceil(24 * q + 1e-3))).all()
    cfg = student_config(tmp_path)
    for est in ("counts", "inclusion"):
        run = tmp_path / f"s-{est}"
        assert main(["train", str(out), "--student", str(cfg), "--estimator", est, "--max-steps", "2",
                     "--batch-size", "2", "--tokenizer", str(tiny_teacher), "--quiet", "-o", str(run)]) == 0, est
        assert (run / "model.safetensors").is_file()


def test_a_run_from_before_the_estimator_option_resumes_with_counts(tiny_teacher, tmp_path):
    """A checkpoint whose config has no ``estimator`` (written before the option, when draws were weighed by their
    counts) resumes under the default ``auto`` with counts: it ends where the same run resumed with ``--estimator
    counts`` ends, and not where one resumed with inclusion weights would."""
    import torch
    from safetensors.torch import load_file

    from trainers import checkpoint as ckpt

    out = tail_cache(tiny_teacher, tmp_path, 6)
    cfg = student_config(tmp_path)
    common = ["--student", str(cfg), "--batch-size", "2", "--tokenizer", str(tiny_teacher), "--quiet",
              "--save-every", "2"]
    models = {}
    for name, est in (("counts", "counts"), ("old", "counts"), ("inclusion", "inclusion")):
        run = tmp_path / name
        assert main(["train", str(out), *common, "--max-steps", "2", "--estimator", est, "-o", str(run)]) == 0
        resume = ["--estimator", est]
        if name == "old":
            _, path = ckpt.latest(run)
            state = torch.load(path / ckpt.STATE_FILE, weights_only=False)
            del state["config"]["estimator"]  # as an older logitstore wrote it
            torch.save(state, path / ckpt.STATE_FILE)
            resume = []  # the default, auto
        assert main(["train", str(out), *common, "--max-steps", "4", "--resume", *resume, "-o", str(run)]) == 0
        models[name] = load_file(str(run / "model.safetensors"))
    same = lambda a, b: all(torch.equal(models[a][k], models[b][k]) for k in models[a])  # noqa: E731
    assert same("old", "counts") and not same("inclusion", "counts")  # the estimator changes a run: this can fail


def test_the_vllm_backend_refuses_the_tail_rule():
    from builders.backends.vllm import VLLMBackend
    from logitstore.errors import InvalidInputError

    backend = VLLMBackend.__new__(VLLMBackend)  # only the rule check, no engine
    backend.max_logprobs = 64
    with pytest.raises(InvalidInputError, match="rule topk_tail .* draws from the full distribution"):
        backend._check_rule(TopKTail(4, 8))


def test_a_student_trains_from_a_tail_draw_cache_with_each_tail_policy(tiny_teacher, tmp_path):

    out = tail_cache(tiny_teacher, tmp_path, 8)
    cfg = student_config(tmp_path)
    for tail in ("sampled", "other", "label", "renormalize"):
        run = tmp_path / f"s-{tail}"
        assert main(["train", str(out), "--student", str(cfg), "--loss", "forward_kl", "--tail", tail,
                     "--max-steps", "2", "--batch-size", "2", "--tokenizer", str(tiny_teacher), "--quiet",
                     "-o", str(run)]) == 0, tail
        assert (run / "model.safetensors").is_file()


def test_a_build_without_a_rule_flag_uses_the_recommended_default(tiny_teacher, tmp_path, capsys):
    from builders.config import DEFAULT_RULE, default_rule

    data = tmp_path / "d.jsonl"
    write_jsonl(data, 3)
    out = tmp_path / "c"
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "-q"]) == 0
    assert logitstore.open(out).manifest.rule == DEFAULT_RULE.to_dict()
    assert verify(out) == []
    err = capsys.readouterr().err
    assert f"the default, {_flags_of(DEFAULT_RULE)} (docs/choosing-a-cache.md)" in err
    # the vLLM backend cannot draw from the full distribution: its default is an exact top-k head
    assert isinstance(default_rule("vllm"), TopK)


def test_resume_without_a_rule_flag_keeps_the_caches_rule(tiny_teacher, tmp_path, capsys):
    """A cache started with another rule than today's default (an older default, here 24 draws) resumes without a
    rule flag on its own rule; a rule flag that differs from it is still refused."""
    from builders.config import DEFAULT_RULE

    data, out = tmp_path / "d.jsonl", tmp_path / "c"
    write_jsonl(data, 3)
    old = Sampled(24, systematic=True)
    assert old != DEFAULT_RULE
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "-q", *_flags_of(old).split()]) == 0
    capsys.readouterr()
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "-q", "--resume"]) == 0
    assert f"the cache's own rule, {_flags_of(old)}" in capsys.readouterr().err
    assert logitstore.open(out).manifest.rule == old.to_dict() and verify(out) == []
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["build", str(tiny_teacher), str(data), "-o", str(out), "-q", "--resume", "--top-k", "8"]) == 2
    assert "rule" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_from_another_working_directory(tiny_teacher, tmp_path, monkeypatch):
    """A build started with relative paths resumes from another directory naming the same teacher, data and cache
    otherwise: the tokenizer is recorded by its absolute directory and compared by fingerprint."""
    import shutil

    shutil.copytree(tiny_teacher, tmp_path / "teacher")
    write_jsonl(tmp_path / "d.jsonl", 3)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["build", "../teacher", "../d.jsonl", "-o", "../c", "--top-k", "4", "-q"]) == 0
    rec = logitstore.open(tmp_path / "c").manifest.tokenizer
    assert rec["name"] == str((tmp_path / "teacher").resolve())
    n = len(logitstore.open(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    assert main(["build", "teacher", "d.jsonl", "-o", "c", "--top-k", "4", "-q", "--resume"]) == 0
    assert len(logitstore.open(tmp_path / "c")) == n > 0 and verify(tmp_path / "c") == []


@pytest.mark.parametrize("rule", [TopK(32), TopKTail(4, 16, 2.0), TopKTail(4, 8, 1.0, systematic=True), Sampled(24),
                                  Sampled(24, systematic=True), Sampled(50, 20, 2.0, True), MassTopK(0.9, 16)], ids=str)
def test_the_flags_printed_for_a_rule_name_that_rule(rule):
    """What `build --help` and the no-flag message print for a rule (the default's) builds exactly that rule."""
    from tools.cli import build_parser

    args = build_parser().parse_args(["build", "T", "D", "-o", "C", *_flags_of(rule).split()])
    assert _rule_of_args(args) == rule
