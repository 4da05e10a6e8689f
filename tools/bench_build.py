"""Build benchmark: extraction overhead and memory of the transformers backend.

1. Throughput: on the embedded SmolLM2-135M teacher (CPU), the same batches of English
   text (``pydoc_data.topics``) through (a) the bare forward pass ``model(ids).logits``,
   the physical limit, and (b) the backend's scoring (body, chunked head, log-softmax,
   top-k, entropy, label logprob, tail mass, and the draws of the sampling rules) plus
   writing the cache, under each rule of ``RULES``. Prints positions/s, the ratio to (a),
   and each sampling rule's ratio to the top-32 build per round.
2. Memory: peak RSS of the body's forward pass alone, and of body + extraction of every
   position, at T = 4096 and 8192, with the teacher's head (V = 49152) and with a
   synthetic 152,064-token head; each measured in a fresh process. Prints the extra MB.

    python tools/bench_build.py [--sequences 32] [--repeats 3] [--skip-memory] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def _batches(tok, n_seq: int, seq_len: int, batch: int):
    import numpy as np

    from tools.teacher_dump import english_text

    ids = np.asarray(tok(english_text())["input_ids"], np.int32)
    seqs = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n_seq)]
    return [seqs[i:i + batch] for i in range(0, n_seq, batch)]


#: the rules whose build throughput is compared with the top-k build of the same data
RULES = ("topk 32", "topk_tail 4 16 2.0", "topk_tail 8 24", "topk_tail 16 16", "topk_tail 8 24 2.0", "sample 50",
         "sample 50 2.0", "sample 24 1.0 systematic")


def _rule(spec: str):
    """``"topk K"``, ``"sample D [T] [systematic]"`` or ``"topk_tail K D [T] [systematic]"``."""
    import logitstore as ls
    from logitstore.rules import TopKTail

    name, *args = spec.split()
    sys_ = args[-1] == "systematic"
    args = args[:-1] if sys_ else args
    if name == "topk":
        return ls.TopK(int(args[0]))
    if name == "sample":
        return ls.Sampled(int(args[0]), proposal_temperature=float(args[1]) if len(args) > 1 else 1.0,
                          systematic=sys_)
    return TopKTail(int(args[0]), int(args[1]), float(args[2]) if len(args) > 2 else 1.0, sys_)


def throughput(n_seq: int, seq_len: int = 256, batch: int = 8, repeats: int = 3, rules=RULES) -> dict:
    """Positions/s of the bare forward and of a build (backend.score + CacheWriter) under each of ``RULES``, on
    the same batches; ``repeats`` interleaved rounds (each rule once per round), so slow phases of a shared
    machine hit every rule alike. Returns per rule the median and the range over the rounds."""
    import numpy as np
    import torch

    import logitstore as ls
    from builders.backends import get_backend
    from builders.embedded import prepare_embedded_teacher

    torch.set_num_threads(2)
    backend = get_backend("transformers")(str(prepare_embedded_teacher()))
    batches = _batches(backend.tokenizer, n_seq, seq_len, batch)
    positions = n_seq * (seq_len - 1)
    times: dict[str, list[float]] = {"bare": [], **{r: [] for r in rules}}
    with torch.inference_mode():
        backend.model(torch.as_tensor(np.stack(batches[0])).long())  # warm-up
    for _ in range(repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in batches:
                # intentional: only the bare forward pass is timed; its logits are discarded
                _ = backend.model(torch.as_tensor(np.stack(b)).long()).logits
            times["bare"].append(time.perf_counter() - t0)
        for spec in rules:
            rule = _rule(spec)
            gen = torch.Generator().manual_seed(0)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                with ls.CacheWriter(Path(tmp) / "c", vocab_size=backend.vocab_size, rule=rule) as w:
                    for b in batches:
                        pos = [np.arange(1, len(s)) for s in b]
                        for s, p, r in zip(b, pos, backend.score(b, pos, rule, gen)):
                            w.add(ls.SequenceRecord(input_ids=s, positions=p, scored=r))
                times[spec].append(time.perf_counter() - t0)
    rate = {k: [positions / t for t in v] for k, v in times.items()}
    return {"positions": positions, "repeats": repeats,
            "pos_s": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in rate.items()},
            "vs_topk": {k: [a / b for a, b in zip(rate[k], rate["topk 32"])] for k in rules}}


def _memory_child(T: int, vocab: int, extract: bool) -> None:
    """Runs in a fresh process: peak RSS (MB) of one forward (and extraction) at length T."""
    import numpy as np
    import torch

    from builders.backends import get_backend
    from builders.embedded import prepare_embedded_teacher
    from builders.extract import chunk_rows_for
    from builders.extract import extract as run_extract
    from logitstore.head import Head
    from logitstore.rules import TopK

    torch.set_num_threads(2)
    backend = get_backend("transformers")(str(prepare_embedded_teacher()))
    head = backend.head
    if vocab != backend.vocab_size:  # a synthetic head of another vocabulary size, same hidden size
        head = Head(weight=torch.randn(vocab, backend.model.config.hidden_size) * 0.05)
    ids = np.random.default_rng(0).integers(0, backend.vocab_size, T).astype(np.int32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        h = backend.hidden([ids])[0, :-1]
        if extract:
            labels = torch.as_tensor(ids[1:]).long() % vocab
            run_extract(h, head, labels, TopK(32), chunk_rows=chunk_rows_for(vocab))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024}))


def memory(T: int, vocab: int) -> dict:
    out = {}
    for extract in (False, True):
        r = subprocess.run([sys.executable, __file__, "--_child", str(T), str(vocab), str(int(extract))],
                           capture_output=True, text=True, check=True, cwd=ROOT)
        out["extract" if extract else "forward"] = json.loads(r.stdout.strip().splitlines()[-1])
    return {"T": T, "vocab": vocab, "forward_peak_mb": out["forward"]["peak_mb"],
            "extract_peak_mb": out["extract"]["peak_mb"],
            "extra_mb": out["extract"]["peak_mb"] - out["forward"]["peak_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32, help="sequences of 256 tokens for the throughput test")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the throughput test (default 3)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--rules", help="';'-separated rules of the throughput test besides 'topk 32' (default all: "
                                    + "; ".join(RULES[1:]) + ")")
    ap.add_argument("--_child", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        _memory_child(*a._child[:2], bool(a._child[2]))
        return
    print("build benchmark: SmolLM2-135M-Instruct (embedded teacher), CPU, 2 threads\n")
    if not a.skip_throughput:
        rules = RULES if not a.rules else ("topk 32", *(s.strip() for s in a.rules.split(";") if s.strip()))
        for spec in rules:
            _rule(spec)  # a bad spec fails here, before any work
        r = throughput(a.sequences, repeats=a.repeats, rules=rules)
        print(f"throughput, {r['positions']} positions in batches of 8 x 256, {r['repeats']} interleaved rounds "
              "(median, [min, max] over rounds):")
        bare = r["pos_s"]["bare"]
        print(f"  bare forward model(ids).logits: {bare['median']:,.0f} positions/s [{bare['min']:,.0f}, "
              f"{bare['max']:,.0f}]")
        print("| rule | build positions/s | vs bare forward | vs the top-32 build (per round) |")
        print("|---|---|---|---|")
        for spec in rules:
            x = r["pos_s"][spec]
            ratios = ", ".join(f"{v:.3f}" for v in r["vs_topk"][spec])
            print(f"| {spec} | {x['median']:,.0f} [{x['min']:,.0f}, {x['max']:,.0f}] | "
                  f"{x['median'] / bare['median']:.3f}x | {ratios} |", flush=True)
        print()
    if not a.skip_memory:
        print("peak memory (fresh process each; RSS high-water mark):")
        print("| T | V | body forward peak MB | forward + extraction peak MB | extra MB |")
        print("|---|---|---|---|---|")
        for vocab in (49152, 152064):
            for T in (4096, 8192):
                m = memory(T, vocab)
                print(f"| {T} | {vocab} | {m['forward_peak_mb']:,.0f} | {m['extract_peak_mb']:,.0f} | "
                      f"{m['extra_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
