"""GPU benchmark (issue 19): the transformers backend and the trainer at real model shapes, on one GPU.

Random-weight models of real shapes, built from configs on the device (no download), bf16 on CUDA:
a Qwen2.5-1.5B-shaped (V = 151,936) and a Llama-3-8B-shaped (V = 128,256) teacher, and a
Qwen2.5-0.5B-shaped student. Rope and norm constants are left at their defaults: they change no cost.

1. Build throughput: positions/s of ``backend.score`` + ``CacheWriter`` against the bare forward
   ``model(ids, use_cache=False).logits`` on the same batches (16,384 tokens each), T = 4096 and 8192,
   rules ``TopK(32)`` and ``TopKTail(8, 24)``, at each ``--extract-mb``: the backend's default 96, 192 (the
   largest whose buffers fit the memory target) and 1024 (what larger chunks buy at GPU speed). Rounds
   alternate bare and builds; medians. Target >= 0.9x.
2. Extraction memory: peak ``torch.cuda.max_memory_allocated`` of a build (body + extraction of every
   position, one sequence) above the body's own forward pass, at T = 4096 and 8192, V = 151,936; the
   bare ``model(ids).logits`` forward's peak for scale. Target <= 256 MB and flat in T.
3. Writer share: the wall time inside ``CacheWriter`` (open, ``add`` with its flushes, close) over the
   whole build, per build of 1. Target <= 10% (else overlap writing with the next batch).
4. Trainer: a KD step (``trainers.loop.micro_loss`` from a top-32 cache the 1.5B teacher wrote, forward KL,
   backward, AdamW) against transformers' plain CE step of the same student, batch 8 x 2048, bf16
   autocast (the trainer's ``--dtype auto`` on CUDA); medians of alternating steps. Target <= 1.10x.
5. Parity: the ``gpu``-marked test of the transformers backend, run with pytest in a subprocess.

The teacher backends are ``TransformersBackend`` objects around the in-memory models (``backend_around``):
the attributes its constructor sets from a loaded model, so no 16 GB checkpoint is written and read back.
Prints markdown tables; with ``OUT`` set (the device tool's output folder) writes ``$OUT/bench_gpu.json``
(every raw timing, so each ratio can be recomputed) and ``$OUT/bench_gpu.md``. ``--tiny``: the same code
at tiny sizes (fp32 on the CPU, memory as the RSS high-water mark), well under a minute.

    python tools/bench_gpu.py --tiny        # the CPU check
    device tool, one H200 (<= 8 min; timeout_s=600), the command:
    set -o pipefail; PYTHONUNBUFFERED=1 python3 tools/bench_gpu.py 2>&1 | tee $OUT/bench_gpu.log
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
_LAYOUT = dict(model_type="qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               hidden_size=64, intermediate_size=128, max_position_embeddings=1024, tie_word_embeddings=True)
#: name -> (real config, tiny config); the first teacher (V = 151,936) also serves 2 and writes 4's cache
TEACHERS = {
    "Qwen2.5-1.5B shape": (dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                max_position_embeddings=32768, tie_word_embeddings=True),
                           dict(_LAYOUT, vocab_size=4096)),
    "Llama-3-8B shape": (dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=8192, tie_word_embeddings=False),
                         dict(_LAYOUT, model_type="llama", vocab_size=3072, tie_word_embeddings=False)),
}
STUDENT = ("Qwen2.5-0.5B shape", dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                      max_position_embeddings=32768, tie_word_embeddings=True),
           dict(_LAYOUT, hidden_size=32, intermediate_size=64, vocab_size=4096))
PARITY = ("tests/builders/test_backend_hf.py",)  # its gpu-marked test: CUDA against the CPU reference
SECTIONS = ("build", "memory", "trainer", "parity")
_T0 = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    lengths: tuple[int, ...]  # T of the throughput and memory measurements
    batch_tokens: int  # tokens per build batch (batch = batch_tokens // T)
    batches: int  # batches per round
    rounds: int
    train_batch: int
    train_length: int
    train_steps: int  # timed steps of each kind (after 2 warm-up rounds)


FULL = Sizes((4096, 8192), 16384, 2, 3, 8, 2048, 10)
TINY = Sizes((32, 64), 128, 2, 1, 2, 32, 2)
TARGETS = {"build": 0.9, "memory_mb": 256.0, "memory_growth_mb": 64.0, "writer": 0.10, "trainer": 1.10}


def _rules():
    from logitstore.rules import TopK, TopKTail

    return {"topk 32": TopK(32), "topk_tail 8 24": TopKTail(8, 24)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_model(config: dict, device, dtype):
    """A causal LM with random (seeded) weights of ``config``'s shape, built directly on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=dtype)
    return model.eval()


def backend_around(model, device, extract_mb: int):
    """A ``TransformersBackend`` around an in-memory model (no checkpoint written and reloaded)."""
    from builders.backends.hf import TransformersBackend

    dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(model.dtype), "fp32")
    return TransformersBackend.from_model(model, None, {"id": f"random {model.config.model_type}", "dtype": dtype},
                                          name=f"random {model.config.model_type}", device=str(device), dtype=dtype,
                                          extract_mb=extract_mb)


def bare_pass(model, batches, device) -> float:
    """Seconds of the bare forward ``model(ids).logits`` over ``batches`` (the logits are discarded)."""
    import numpy as np
    import torch

    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(input_ids=torch.as_tensor(np.stack(b)).long().to(device), use_cache=False).logits  # noqa: B018
    _sync(device)
    return time.perf_counter() - t0


def build_pass(backend, batches, rule, root: Path) -> tuple[float, float]:
    """(seconds of the whole build, seconds inside the CacheWriter) of scoring and writing ``batches``."""
    import numpy as np
    import torch

    import logitstore as ls

    gen = torch.Generator().manual_seed(0)
    path = Path(tempfile.mkdtemp(dir=root)) / "cache"
    _sync(backend.device)
    t0 = time.perf_counter()
    with ls.CacheWriter(path, vocab_size=backend.vocab_size, rule=rule) as w:
        writer = time.perf_counter() - t0  # open: lock, first manifest
        for b in batches:
            pos = [np.arange(1, len(s)) for s in b]
            scored = backend.score(b, pos, rule, gen)  # ends with the results on the host: synchronised
            t = time.perf_counter()
            for s, p, r in zip(b, pos, scored):
                w.add(ls.SequenceRecord(input_ids=s, positions=p, scored=r))
            writer += time.perf_counter() - t
        t = time.perf_counter()
    writer += time.perf_counter() - t  # close: the last row group, shard commit, manifest
    total = time.perf_counter() - t0
    shutil.rmtree(path.parent)
    return total, writer


def throughput(name: str, model, device, sizes: Sizes, extract_mbs, root: Path) -> list[dict]:
    """Measurements 1 and 3 for one teacher: a row per (T, rule, extract MB) with its raw timings."""
    import numpy as np

    rng, rules, rows = np.random.default_rng(0), _rules(), []
    vocab = model.get_output_embeddings().weight.shape[0]
    for T in sizes.lengths:
        B = max(1, sizes.batch_tokens // T)
        batches = [[rng.integers(0, vocab, T).astype(np.int32) for _ in range(B)] for _ in range(sizes.batches)]
        configs = [(r, mb) for r in rules for mb in extract_mbs]
        backends = {mb: backend_around(model, device, mb) for mb in extract_mbs}
        bare_pass(model, batches[:1], device)  # warm-up: kernels, allocator, cuBLAS workspaces
        for r, mb in configs:
            build_pass(backends[mb], batches[:1], rules[r], root)
        bare, runs = [], {c: ([], []) for c in configs}
        for _ in range(sizes.rounds):
            bare.append(bare_pass(model, batches, device))
            for r, mb in configs:
                total, writer = build_pass(backends[mb], batches, rules[r], root)
                runs[r, mb][0].append(total)
                runs[r, mb][1].append(writer)
        positions = sizes.batches * B * (T - 1)
        for (r, mb), (build_s, writer_s) in runs.items():
            bare_rate, build_rate = positions / statistics.median(bare), positions / statistics.median(build_s)
            rows.append({"teacher": name, "vocab": vocab, "T": T, "batch": B, "rule": r, "extract_mb": mb,
                         "chunk_rows": backends[mb].chunk_rows, "positions": positions, "bare_s": bare,
                         "build_s": build_s, "writer_s": writer_s, "bare_pos_s": bare_rate, "build_pos_s": build_rate,
                         "ratio": build_rate / bare_rate, "writer_share": sum(writer_s) / sum(build_s)})
        print(f"  {name} T={T}: bare {rows[-1]['bare_pos_s']:,.0f} positions/s", file=sys.stderr, flush=True)
    return rows


class Peak:
    """Peak memory above a baseline in MB: CUDA's allocator counters, or on the CPU the RSS high-water mark
    (VmHWM, reset through /proc/self/clear_refs); ``method`` is None where neither is available."""

    def __init__(self, device):
        self.device, self.base = device, 0.0
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else None
        if device.type != "cuda":
            with contextlib.suppress(OSError):
                self._clear()
                self.method = "RSS high-water mark (VmHWM)"

    @staticmethod
    def _clear() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(float(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self._clear()
            self.base = self._status_mb("VmRSS")

    def mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return self._status_mb("VmHWM") - self.base


def memory(name: str, model, device, sizes: Sizes, extract_mbs) -> list[dict]:
    """Measurement 2: per T, the body forward's peak, the bare logits forward's peak, and each build's peak."""
    import numpy as np
    import torch

    peak, rules, rows = Peak(device), _rules(), []
    if peak.method is None:
        return [{"teacher": name, "skipped": "no way to read peak memory on this machine"}]
    vocab = model.get_output_embeddings().weight.shape[0]
    for T in sizes.lengths:
        ids = np.random.default_rng(T).integers(0, vocab, T).astype(np.int32)
        be = backend_around(model, device, extract_mbs[0])
        peak.start()
        be.hidden([ids])
        forward = peak.mb()
        peak.start()
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids[None]).long().to(device), use_cache=False).logits  # noqa: B018
        logits = peak.mb()
        for r, rule in rules.items():
            for mb in extract_mbs:
                peak.start()
                backend_around(model, device, mb).score([ids], [np.arange(1, T)], rule, torch.Generator())
                build = peak.mb()
                rows.append({"teacher": name, "vocab": vocab, "T": T, "rule": r, "extract_mb": mb,
                             "method": peak.method, "forward_peak_mb": forward, "logits_peak_mb": logits,
                             "build_peak_mb": build, "extra_mb": build - forward})
    return rows


def write_train_cache(model, device, path: Path, sizes: Sizes) -> None:
    """The trainer's top-32 cache: ``train_batch`` random sequences of ``train_length`` tokens, scored by ``model``."""
    import numpy as np

    import logitstore as ls

    be, rule = backend_around(model, device, 96), _rules()["topk 32"]
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, be.vocab_size, sizes.train_length).astype(np.int32) for _ in range(sizes.train_batch)]
    pos = [np.arange(1, len(s)) for s in seqs]
    with ls.CacheWriter(path, vocab_size=be.vocab_size, rule=rule) as w:
        for s, p, r in zip(seqs, pos, be.score(seqs, pos, rule)):
            w.add(ls.SequenceRecord(input_ids=s, positions=p, scored=r))


def trainer(cache: Path, device, tiny: bool, sizes: Sizes, root: Path) -> dict:
    """Measurement 4: median KD step against median CE step of one student on one batch."""
    import torch
    from transformers import AutoConfig

    import logitstore as ls
    from trainers.config import TrainConfig
    from trainers.data import StreamingLoader
    from trainers.evaluation import to_device
    from trainers.loop import Body, make_optimizer, micro_loss
    from trainers.losses import Objective
    from trainers.student import load_student

    if not (cache / "manifest.json").is_file():
        raise RuntimeError(f"no training cache at {cache} (its teacher's section failed or was skipped)")
    name, config = STUDENT[0], dict(STUDENT[2] if tiny else STUDENT[1])
    spec = root / "student.json"
    AutoConfig.for_model(config.pop("model_type"), **config).to_json_file(str(spec))
    c = ls.open(cache)
    student = load_student(str(spec), manifest=c.manifest, seed=0)
    plain = copy.deepcopy(student.model).to(device).train()
    student.model.to(device).train()
    student.head = type(student.head).of(student.model)
    cfg = TrainConfig(cache=str(cache), student=str(spec), output="-", batch_size=sizes.train_batch,
                      max_length=sizes.train_length)
    loader = StreamingLoader(str(cache), batch_size=sizes.train_batch, max_length=sizes.train_length, shuffle=False)
    batch = to_device(next(iter(loader)), device)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    body, obj = Body(student), Objective("forward_kl", tail=cfg.resolved_tail(c.manifest.rule["rule"]))
    opt_kd, opt_ce = make_optimizer(student.model, cfg), make_optimizer(plain, cfg)
    # the trainer's --dtype auto: bf16 autocast over float32 weights on CUDA, float32 on the CPU
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    def kd_step():
        with autocast():
            loss, _ = micro_loss(body, student.head, batch, cfg, obj, c.manifest.vocab_size, c.rule)
        loss.backward()
        opt_kd.step()
        opt_kd.zero_grad(set_to_none=True)

    def ce_step():
        with autocast():
            loss = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        opt_ce.step()
        opt_ce.zero_grad(set_to_none=True)

    times = {"kd": [], "ce": []}
    for i in range(sizes.train_steps + 2):
        for kind, fn in (("ce", ce_step), ("kd", kd_step)) if i % 2 else (("kd", kd_step), ("ce", ce_step)):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if i >= 2:  # the first two rounds warm up allocators and kernels
                times[kind].append(time.perf_counter() - t)
    kd, ce = statistics.median(times["kd"]), statistics.median(times["ce"])
    n = int(batch["target_mask"].sum())
    return {"student": name, "vocab": student.head.vocab_size, "batch": sizes.train_batch,
            "length": sizes.train_length, "target_positions": n, "dtype": "bf16 autocast" if device.type == "cuda"
            else "fp32", "head_recomputed": n * student.head.vocab_size * 4 > cfg.head_memory_mb * 2**20,
            "kd_s": times["kd"], "ce_s": times["ce"], "kd_step_s": kd, "ce_step_s": ce, "ratio": kd / ce}


def parity() -> dict:
    """Measurement 5: the gpu-marked test in a pytest subprocess; its outcome and counts."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *PARITY, "-o", "addopts=", "-q", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr  # addopts' -q cleared above: -qq would drop the counts line
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", out)}
    outcome = "passed" if r.returncode == 0 and counts.get("passed") else \
        "skipped" if r.returncode == 0 and counts.get("skipped") else "no test ran" if r.returncode == 5 else \
        "failed" if counts.get("failed") else "error"  # an error: the test could not be set up (its fixtures)
    reasons = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("E ")]
    reason = reasons[-1] if reasons else next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
    return {"command": " ".join(["python", *cmd[1:]]), "rc": r.returncode, "counts": counts, "outcome": outcome,
            "reason": "" if outcome == "passed" else reason[:300], "seconds": time.perf_counter() - t0}


def summary(res: dict, tiny: bool) -> list[dict]:
    """Each target of issue 19 against the worst measured case (None where it was not measured)."""
    rows = []

    def add(n, target, value, fmt, ok):
        met = None if value is None or tiny else bool(ok(value))
        rows.append({"n": n, "target": target, "value": value, "measured": "-" if value is None else fmt(value),
                     "met": met})

    build = res.get("build") or []
    for mb in sorted({r["extract_mb"] for r in build}):
        add(1, f"build / bare forward >= {TARGETS['build']}x (worst case, extract {mb} MB)",
            min(r["ratio"] for r in build if r["extract_mb"] == mb), "{:.3f}x".format, lambda v: v >= TARGETS["build"])
    mem = [r for r in res.get("memory") or [] if "extra_mb" in r]
    if mem:
        top, low = max(r["T"] for r in mem), min(r["T"] for r in mem)
        for mb in sorted({r["extract_mb"] for r in mem}):
            at = {(r["T"], r["rule"]): r["extra_mb"] for r in mem if r["extract_mb"] == mb}
            add(2, f"extraction memory above the body forward at T={top} <= {TARGETS['memory_mb']:.0f} MB "
                f"(extract {mb} MB)", max(v for (T, _), v in at.items() if T == top), "{:+,.0f} MB".format,
                lambda v: v <= TARGETS["memory_mb"])
            add(2, f"growth from T={low} to T={top} <= {TARGETS['memory_growth_mb']:.0f} MB (flat; extract {mb} MB)",
                max(at[top, r] - at[low, r] for (T, r) in at if T == top), "{:+,.0f} MB".format,
                lambda v: v <= TARGETS["memory_growth_mb"])
    add(3, f"writer share of build wall time <= {TARGETS['writer']:.0%} (worst case)",
        max((r["writer_share"] for r in build), default=None), "{:.1%}".format, lambda v: v <= TARGETS["writer"])
    tr = res.get("trainer") or {}
    add(4, f"KD step / CE step <= {TARGETS['trainer']}x", tr.get("ratio"), "{:.3f}x".format,
        lambda v: v <= TARGETS["trainer"])
    par = res.get("parity") or {}
    rows.append({"n": 5, "target": "gpu-marked parity test passes", "value": None,
                 "measured": par.get("outcome", "-"),
                 "met": None if tiny or not par else par.get("outcome") == "passed"})
    return rows


def tables(res: dict) -> str:
    m = res["meta"]
    out = [f"bench_gpu ({'tiny, ' if m['tiny'] else ''}{m['device_name']}, {m['dtype']}, torch {m['torch']}, "
           f"transformers {m['transformers']}): {m['seconds']:.0f} s", "",
           "| teacher | V | T | batch | rule | extract MB | bare pos/s | build pos/s | build / bare | writer share |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['teacher']} | {r['vocab']:,} | {r['T']} | {r['batch']} | {r['rule']} | {r['extract_mb']} | "
            f"{r['bare_pos_s']:,.0f} | {r['build_pos_s']:,.0f} | {r['ratio']:.3f}x | {r['writer_share']:.1%} |"
            for r in res.get("build") or []]
    out += ["", "| teacher | V | T | rule | extract MB | body forward peak MB | build peak MB | extra MB | "
            "model(ids).logits peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['teacher']} | {r['vocab']:,} | {r['T']} | {r['rule']} | {r['extract_mb']} | "
            f"{r['forward_peak_mb']:,.0f} | {r['build_peak_mb']:,.0f} | {r['extra_mb']:+,.0f} | "
            f"{r['logits_peak_mb']:,.0f} |" if "extra_mb" in r else f"| {r['teacher']} | skipped: {r['skipped']} |"
            for r in res.get("memory") or []]
    if mem := [r for r in res.get("memory") or [] if "method" in r]:
        out.append(f"(memory: {mem[0]['method']}{'; at tiny sizes this is noise' if m['tiny'] else ''})")
    if tr := res.get("trainer"):
        out += ["", "| student | V | batch | dtype | CE step ms | KD step ms | KD / CE |",
                "|---|---|---|---|---|---|---|",
                f"| {tr['student']} | {tr['vocab']:,} | {tr['batch']} x {tr['length']} | {tr['dtype']} | "
                f"{tr['ce_step_s'] * 1e3:,.1f} | {tr['kd_step_s'] * 1e3:,.1f} | {tr['ratio']:.3f}x |"]
    if par := res.get("parity"):
        why = f": {par['reason']}" if par["reason"] else ""
        out += ["", f"parity: {par['outcome']} ({par['command']}; {par['counts']}){why}"]
    out += ["", "| # | target | measured | verdict |", "|---|---|---|---|"]
    verdict = {True: "met", False: "**not met**", None: "n/a (tiny)" if m["tiny"] else "not measured"}
    out += [f"| {s['n']} | {s['target']} | {s['measured']} | {verdict[s['met']]} |" for s in res["summary"]]
    out += [f"error in {k}: {v}" for k, v in res["errors"].items()]
    return "\n".join(out)


def _save(res: dict, text: str | None = None) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_gpu.json").write_text(json.dumps(res, indent=1, allow_nan=True))
        if text is not None:
            (Path(out) / "bench_gpu.md").write_text(text + "\n")


def _guarded(res: dict, section: str, fn, *args):
    """``fn(*args)``; an error is recorded (JSON and stderr) and the run goes on to the other sections, then exits 1."""
    print(f"bench_gpu: [{time.perf_counter() - _T0:5.0f} s] {section} ...", file=sys.stderr, flush=True)
    try:
        return fn(*args)
    except Exception as exc:  # not swallowed: recorded, printed, and the exit status is 1
        res["errors"][section] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        res["tracebacks"][section] = traceback.format_exc()
        print(f"bench_gpu: {section} failed: {res['errors'][section]}", file=sys.stderr, flush=True)
        return None
    finally:
        _save(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU check of the same code, < 1 min)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if available")
    ap.add_argument("--extract-mb", help="extraction budgets to compare, MB, comma-separated (default 96,192,1024; "
                    "--tiny: 96,192)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    a = ap.parse_args(argv)
    skip = {s for s in a.skip.split(",") if s}
    a.extract_mb = a.extract_mb or ("96,192" if a.tiny else "96,192,1024")
    mbs = [int(x) for x in a.extract_mb.split(",") if x.strip().isdigit()]
    if unknown := skip - set(SECTIONS):
        return _fail(f"--skip {a.skip}: unknown section(s) {sorted(unknown)}; sections are {', '.join(SECTIONS)}")
    if not mbs or any(v < 1 for v in mbs) or len(mbs) != len(a.extract_mb.split(",")):
        return _fail(f"--extract-mb {a.extract_mb!r}: give positive integers in MB, comma-separated (e.g. 96,192)")
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        return _fail("--device cuda: CUDA is not available on this machine (--tiny --device cpu runs the CPU check)")
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and cuda) else "cpu")
    if device.type == "cpu" and not a.tiny:
        return _fail("the full-size benchmark needs a CUDA GPU; none here (--tiny runs the same code on the CPU)")
    sizes, dtype = (TINY if a.tiny else FULL), (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models on shared cores: a second thread only adds contention
    res = {"meta": {"tiny": a.tiny, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                    "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
                    or "CPU", "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "sizes": asdict(sizes), "extract_mb": mbs,
                    "targets": TARGETS, "argv": sys.argv[1:], "seconds": 0.0},
           "build": [], "memory": [], "trainer": None, "parity": None, "errors": {}, "tracebacks": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root, first = Path(tmp), next(iter(TEACHERS))
        for name, (real, tiny_cfg) in TEACHERS.items():
            if "build" in skip and (name != first or {"memory", "trainer"} <= skip):
                continue
            model = _guarded(res, f"load {name}", make_model, tiny_cfg if a.tiny else real, device, dtype)
            if model is not None and "build" not in skip:
                res["build"] += _guarded(res, f"build {name}", throughput, name, model, device, sizes, mbs, root) or []
            if model is not None and name == first and "memory" not in skip:
                res["memory"] = _guarded(res, "memory", memory, name, model, device, sizes, mbs) or []
            if model is not None and name == first and "trainer" not in skip:
                _guarded(res, "trainer cache", write_train_cache, model, device, root / "train", sizes)
            del model
            _free(device)
        if "trainer" not in skip:
            res["trainer"] = _guarded(res, "trainer", trainer, root / "train", device, a.tiny, sizes, root)
            _free(device)
        if "parity" not in skip:
            res["parity"] = _guarded(res, "parity", parity)
    res["meta"]["seconds"] = time.perf_counter() - t0
    res["summary"] = summary(res, a.tiny)
    text = tables(res)
    print(text, flush=True)
    _save(res, text)
    return 1 if res["errors"] else 0


def _fail(msg: str) -> int:
    print(f"bench_gpu: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
