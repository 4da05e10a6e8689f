"""tools/bench_gpu.py --tiny end to end (the CPU check of the GPU benchmark of issue 19).

One run in a subprocess with ``OUT`` set, as the device tool runs it. Its JSON is checked for its keys,
for timings that are positive and finite, and for ratios that agree with the raw timings it reports: each
ratio, share and summary value is recomputed here from the raw lists (``statistics.median``, sums), not
taken from the script; the printed table is checked to show the same figures.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_gpu.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu_out")
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout, json.loads((out / "bench_gpu.json").read_text()), (out / "bench_gpu.md").read_text()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_has_every_section_with_positive_finite_timings(tiny):
    _, res, _ = tiny
    assert {"meta", "build", "memory", "trainer", "parity", "summary", "errors"} <= set(res)
    assert res["errors"] == {} and res["meta"]["tiny"] is True and positive(res["meta"]["seconds"])
    sizes, mbs = res["meta"]["sizes"], res["meta"]["extract_mb"]
    assert len(res["build"]) == 2 * len(sizes["lengths"]) * 2 * len(mbs)  # teachers x T x rules x budgets
    assert {r["teacher"] for r in res["build"]} == {"Qwen2.5-1.5B shape", "Llama-3-8B shape"}
    assert {r["rule"] for r in res["build"]} == {"topk 32", "topk_tail 8 24"}
    for r in res["build"]:
        assert len(r["bare_s"]) == len(r["build_s"]) == len(r["writer_s"]) == sizes["rounds"]
        assert all(positive(x) for x in (*r["bare_s"], *r["build_s"], *r["writer_s"], r["bare_pos_s"],
                                         r["build_pos_s"], r["ratio"], r["writer_share"], r["chunk_rows"]))
        assert all(w < b for w, b in zip(r["writer_s"], r["build_s"]))  # the writer's time is part of the build's
        assert r["positions"] == sizes["batches"] * r["batch"] * (r["T"] - 1)
    assert len(res["memory"]) == len(sizes["lengths"]) * 2 * len(mbs)
    for m in res["memory"]:
        assert m["method"] and m["vocab"] == 4096
        assert all(math.isfinite(m[k]) for k in ("forward_peak_mb", "build_peak_mb", "extra_mb", "logits_peak_mb"))
    tr = res["trainer"]
    assert len(tr["kd_s"]) == len(tr["ce_s"]) == sizes["train_steps"]
    assert all(positive(x) for x in (*tr["kd_s"], *tr["ce_s"], tr["kd_step_s"], tr["ce_step_s"], tr["ratio"]))
    assert tr["target_positions"] == sizes["train_batch"] * (sizes["train_length"] - 1)
    # no CUDA here: the gpu-marked test is skipped; with one it must pass
    assert res["parity"]["outcome"] == ("passed" if res["meta"]["device"] == "cuda" else "skipped")
    assert res["parity"]["rc"] == 0 and "-m gpu" in res["parity"]["command"]


def test_ratios_agree_with_the_raw_timings(tiny):
    _, res, _ = tiny
    for r in res["build"]:
        bare = r["positions"] / statistics.median(r["bare_s"])
        build = r["positions"] / statistics.median(r["build_s"])
        assert r["bare_pos_s"] == pytest.approx(bare, rel=1e-9)
        assert r["build_pos_s"] == pytest.approx(build, rel=1e-9)
        assert r["ratio"] == pytest.approx(build / bare, rel=1e-9)
        assert r["writer_share"] == pytest.approx(sum(r["writer_s"]) / sum(r["build_s"]), rel=1e-9)
    # the bare forward is measured once per (teacher, T) and shared by its builds
    for key in {(r["teacher"], r["T"]) for r in res["build"]}:
        assert len({tuple(r["bare_s"]) for r in res["build"] if (r["teacher"], r["T"]) == key}) == 1
    for m in res["memory"]:
        assert m["extra_mb"] == pytest.approx(m["build_peak_mb"] - m["forward_peak_mb"], abs=1e-9)
    tr = res["trainer"]
    assert tr["kd_step_s"] == pytest.approx(statistics.median(tr["kd_s"]), rel=1e-12)
    assert tr["ce_step_s"] == pytest.approx(statistics.median(tr["ce_s"]), rel=1e-12)
    assert tr["ratio"] == pytest.approx(statistics.median(tr["kd_s"]) / statistics.median(tr["ce_s"]), rel=1e-9)

    by = {}
    for s in res["summary"]:
        by.setdefault(s["n"], []).append(s)
    assert sorted(by) == [1, 2, 3, 4, 5] and all(s["met"] is None for s in res["summary"])  # tiny: not judged
    for s, mb in zip(by[1], sorted(res["meta"]["extract_mb"])):
        want = min(r["positions"] / statistics.median(r["build_s"]) / (r["positions"] / statistics.median(r["bare_s"]))
                   for r in res["build"] if r["extract_mb"] == mb)
        assert s["value"] == pytest.approx(want, rel=1e-9) and f"{mb} MB" in s["target"]
    top, low = max(res["meta"]["sizes"]["lengths"]), min(res["meta"]["sizes"]["lengths"])
    for mb, (peak, growth) in zip(sorted(res["meta"]["extract_mb"]), zip(by[2][::2], by[2][1::2])):
        extra = {(m["T"], m["rule"]): m["build_peak_mb"] - m["forward_peak_mb"] for m in res["memory"]
                 if m["extract_mb"] == mb}
        assert peak["value"] == pytest.approx(max(v for (T, _), v in extra.items() if T == top), abs=1e-9)
        assert growth["value"] == pytest.approx(max(extra[top, r] - extra[low, r] for (T, r) in extra if T == top),
                                                abs=1e-9)
    assert by[3][0]["value"] == pytest.approx(max(sum(r["writer_s"]) / sum(r["build_s"]) for r in res["build"]))
    assert by[4][0]["value"] == pytest.approx(statistics.median(tr["kd_s"]) / statistics.median(tr["ce_s"]))


def test_printed_tables_show_the_recomputed_figures(tiny):
    stdout, res, md = tiny
    assert stdout.strip() == md.strip()
    for header in ("| teacher | V | T | batch | rule | extract MB | bare pos/s | build pos/s | build / bare |",
                   "| teacher | V | T | rule | extract MB | body forward peak MB | build peak MB | extra MB |",
                   "| student | V | batch | dtype | CE step ms | KD step ms | KD / CE |",
                   "| # | target | measured | verdict |"):
        assert header in stdout
    lines = stdout.splitlines()
    for r in res["build"]:
        ratio = (r["positions"] / statistics.median(r["build_s"])) / (r["positions"] / statistics.median(r["bare_s"]))
        share = sum(r["writer_s"]) / sum(r["build_s"])
        start = f"| {r['teacher']} | {r['vocab']:,} | {r['T']} | {r['batch']} | {r['rule']} | {r['extract_mb']} |"
        row = [ln for ln in lines if ln.startswith(start)]
        assert len(row) == 1 and row[0].endswith(f"| {ratio:.3f}x | {share:.1%} |"), (start, row)
    tr = res["trainer"]
    assert f"| {statistics.median(tr['kd_s']) / statistics.median(tr['ce_s']):.3f}x |" in stdout
    assert stdout.count("| n/a (tiny) |") == len(res["summary"])
    assert "parity: skipped" in stdout or "parity: passed" in stdout


def test_bad_invocations_are_one_line_errors():
    bad = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--skip", "everything"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--skip" in bad.stderr and "build" in bad.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full-size run would start")
    full = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert full.returncode == 2 and full.stderr.count("\n") == 1 and "CUDA" in full.stderr and "--tiny" in full.stderr
