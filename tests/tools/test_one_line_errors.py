"""Inputs that once escaped as tracebacks (issue 14): each is now a one-line error naming the input, exit 2 (``verify``:
exit 1 with the problem named), and nothing half-written. Through the real command line."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import read_manifest, write_manifest
from tools.cli import main


def _err_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("logitstore ")]
    assert len(lines) == 1 and lines[0].startswith(f"logitstore {command}: ") and "Traceback" not in err, err
    return lines[0]


def _sign(path, edit):
    m = read_manifest(path)
    edit(m)
    write_manifest(path, m)  # a consistent rewrite (checksum recomputed): the deeper checks must catch it


DAMAGED_MANIFESTS = {
    "a shard path '.'": lambda p: _sign(p, lambda m: m["shards"][0].update(file=".")),
    "an id map path ''": lambda p: _sign(p, lambda m: m["id_map"].update(file="")),
    "JSON nested 100,000 deep": lambda p: (p / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
    "a 5,000-digit integer": lambda p: (p / "manifest.json").write_text(
        re.sub(r'"vocab_size": \d+', '"vocab_size": ' + "7" * 5000, (p / "manifest.json").read_text())),
}


@pytest.mark.parametrize("damage", list(DAMAGED_MANIFESTS.values()), ids=list(DAMAGED_MANIFESTS))
def test_a_damaged_manifest_is_one_line_in_every_command(ranked_cache, student_config_path, tmp_path, capsys,
                                                         damage):
    c = ranked_cache.copy_to(tmp_path / "c").path
    damage(c)
    runs = [["info", str(c)], ["sql", str(c), "SELECT count(*) FROM sequences"],
            ["select", str(c), "--where", "true", "-o", str(tmp_path / "s.json")],
            ["report", str(c), "-o", str(tmp_path / "r.html")],
            ["train", str(c), "--student", str(student_config_path), "-o", str(tmp_path / "out"), "--quiet"]]
    for argv in runs:
        assert main(argv) == 2, argv
        assert "manifest.json" in _err_line(capsys, argv[0]), argv
    assert main(["verify", "-q", str(c)]) == 1  # verify never raises: the problem is reported
    out = capsys.readouterr().out
    assert "FAIL manifest.json" in out and "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing written anywhere


@pytest.fixture
def student_config_path(tmp_path_factory):
    from tests.trainers.conftest import write_student_config

    return write_student_config(tmp_path_factory.mktemp("st") / "config.json")


def test_a_teacher_whose_head_is_smaller_than_its_tokenizer_is_refused(embedded_tokenizer, tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = tmp_path / "small-head"
    LlamaForCausalLM(LlamaConfig(vocab_size=49000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(teacher)
    embedded_tokenizer.save_pretrained(teacher)  # 49152 tokens
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the tokens near the end of the vocabulary"}) + "\n")
    assert main(["build", str(teacher), str(data), "--top-k", "4", "-o", str(tmp_path / "c"), "-q"]) == 2
    err = _err_line(capsys, "build")
    assert "49152 tokens" in err and "only 49000 rows" in err
    assert not (tmp_path / "c").exists()


def _saved_dataset(path, split: bool):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a first line of text", "and a second one"]})
    (datasets.DatasetDict({"train": ds}) if split else ds).save_to_disk(str(path))
    return path


DAMAGED_DATASETS = {
    "junk state.json": (False, lambda d: (d / "state.json").write_text("junk")),
    "state.json of the wrong shape": (False, lambda d: (d / "state.json").write_text('{"_data_files": 5}')),
    "a missing .arrow file": (False, lambda d: [f.unlink() for f in d.glob("*.arrow")]),
    "a non-JSON dataset_dict.json": (True, lambda d: (d / "dataset_dict.json").write_text("{not json")),
    "a missing split directory": (True, lambda d: [f.unlink() for f in (d / "train").iterdir()]),
}


@pytest.mark.parametrize("split,damage", list(DAMAGED_DATASETS.values()), ids=list(DAMAGED_DATASETS))
def test_a_damaged_saved_dataset_is_one_line(tiny_teacher, tmp_path, capsys, split, damage):
    d = _saved_dataset(tmp_path / "ds", split)
    damage(d)
    assert main(["build", str(tiny_teacher), str(d), "--top-k", "4", "-o", str(tmp_path / "c"), "-q"]) == 2
    err = _err_line(capsys, "build")
    assert str(d) in err and ("saved dataset" in err or "not a readable" in err or "cannot read" in err), err
    assert not (tmp_path / "c").exists()


def test_an_output_that_names_a_file_is_refused_by_every_command(ranked_cache, tiny_teacher, tmp_path, capsys):
    f = tmp_path / "precious.txt"
    f.write_text("keep")
    c = str(ranked_cache.path)
    for argv in (["diff", c, c, "-o", str(f)], ["score", c, str(tiny_teacher), "-o", str(f)],
                 ["select", c, "--where", "true", "--materialize", "-o", str(f)]):
        assert main(argv) == 2, argv
        assert str(f) in _err_line(capsys, argv[0])
        assert f.read_text() == "keep"


@pytest.mark.parametrize("command,module,hint", [("info", "store", False), ("build", "build", True)])
def test_ctrl_c_is_one_line_with_exit_130(monkeypatch, capsys, command, module, hint):
    """Ctrl-C in any command: exit 130 and one line, which names --resume for the commands that have it (the
    resumed results themselves: tests/trainers/test_train_reliability.py, tests/logitstore/test_crash.py)."""
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"tools.cli.{module}"), command, interrupted)
    argv = {"info": ["info", "CACHE"], "build": ["build", "T", "D", "-o", "C"]}[command]
    assert main(argv) == 130
    line = _err_line(capsys, command)
    assert line.startswith(f"logitstore {command}: interrupted") and ("--resume" in line) == hint
