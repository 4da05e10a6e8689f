"""The README's two commands, and the main job (``logitstore demo --quick``) run on the real embedded teacher.

The demo's figures are checked against independent references: the pass rate against the
reference answers read from the shipped data and the responses decoded from the cache, and
the students' held-out cross-entropy against a plain full-vocabulary forward of the saved model.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.teacher


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_gives_the_main_job_and_the_tests_as_two_commands():
    cmds = readme_commands()
    assert cmds == ["bash tools/install.sh && logitstore demo",
                    "bash tools/install.sh && ruff check . && python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci  # CI runs the README's test command verbatim


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    main_job = readme_commands()[0].split("&&")[1].split()  # ["logitstore", "demo"]
    r = subprocess.run([sys.executable, "-m", "tools.cli", *main_job[1:], "--quick", "-o", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_demo_runs_every_step_and_says_where_things_are(demo):
    out, stdout = demo
    for step in range(1, 6):
        assert f"[{step}/5]" in stdout
    for path in ("cache-problems", "cache-text", "report-problems.html", "report-text.html",
                 "train.selection.json", "eval.selection.json", "results.json"):
        assert (out / path).exists(), path
        assert str(out / path) in stdout or path in stdout
    from logitstore.verify import verify

    assert verify(out / "cache-problems") == [] and verify(out / "cache-text") == []


def test_demo_pass_rate_matches_the_reference_answers(demo):
    from transformers import AutoTokenizer

    import logitstore
    from builders.embedded import prepare_embedded_teacher

    out, stdout = demo
    tok = AutoTokenizer.from_pretrained(prepare_embedded_teacher())
    answers = [json.loads(line)["answer"] for line in (out / "data" / "problems.jsonl").read_text().splitlines()]
    cache = logitstore.open(out / "cache-problems")
    right = total = 0
    for seq in cache:
        response = tok.decode(seq.input_ids[seq.pos[seq.loss_mask][0]:], skip_special_tokens=True)
        numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
        ok = bool(numbers) and float(numbers[-1]) == float(answers[seq.record])
        assert seq.correct == ok, (response, answers[seq.record])
        right += ok
        total += 1
    assert total == len(answers) * 2  # --quick: 2 samples per problem
    assert f"pass rate: {100 * right / total:.1f}%" in stdout


def test_demo_students_held_out_ce_matches_a_plain_forward(demo):
    import torch
    from transformers import AutoModelForCausalLM

    import logitstore

    out, stdout = demo
    rows = json.loads((out / "results.json").read_text())
    assert [r["loss"] for r in rows] == ["ce", "forward_kl", "jsd"]
    held = logitstore.open(out / "eval.selection.json")
    for r in rows:
        model = AutoModelForCausalLM.from_pretrained(out / "students" / r["run"], dtype=torch.float32).eval()
        nll = n = 0.0
        for seq in held:
            with torch.no_grad():
                logits = model(torch.tensor(seq.input_ids[None], dtype=torch.long)).logits
                lp = torch.log_softmax(logits[0].double(), -1)
            rows_ = torch.tensor(seq.pos[seq.loss_mask] - 1)
            nll -= float(lp[rows_, torch.tensor(seq.labels[seq.loss_mask], dtype=torch.long)].sum())
            n += len(rows_)
        assert r["eval_ce"] == pytest.approx(nll / n, rel=1e-4), r["run"]
        assert f"{r['eval_ce']:12.4f}" in stdout
