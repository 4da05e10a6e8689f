"""Backend throughput: positions/s of the transformers and the vLLM backend on one model and one GPU.

Both backends score the same token sequences (English text from ``pydoc_data.topics``, cut to
``--length`` tokens) under ``TopK(k)``; the time covers scoring only (the engines are loaded and
warmed up first), not writing. Prints one line per backend and the ratio. Needs a CUDA GPU and
vLLM (``pip install 'logitstore[vllm]'``).

    python tools/bench_backends.py MODEL_DIR [--sequences 256] [--length 1024] [--top-k 32] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--token-budget", type=int, default=16384, help="padded tokens per transformers batch")
    a = ap.parse_args()
    import torch

    from builders.backends import get_backend
    from builders.plan import batches
    from logitstore.rules import TopK

    rule = TopK(a.top_k)
    backends = {"transformers": get_backend("transformers")(a.model, dtype=a.dtype, device="cuda"),
                "vllm": get_backend("vllm")(a.model, dtype=a.dtype, max_logprobs=a.top_k)}
    ids = np.asarray(backends["transformers"].tokenizer(texts())["input_ids"], np.int32)
    n = min(a.sequences, len(ids) // a.length)
    seqs = [ids[i * a.length:(i + 1) * a.length] for i in range(n)]
    pos = [np.arange(1, a.length) for _ in seqs]
    rate = {}
    for name, be in backends.items():
        be.score(seqs[:2], pos[:2], rule)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if name == "transformers":  # the driver's token-budget batches
            items = [SimpleNamespace(ex=SimpleNamespace(input_ids=s)) for s in seqs]
            for b in batches(items, a.token_budget):
                be.score([it.ex.input_ids for it in b], [np.arange(1, len(it.ex.input_ids)) for it in b], rule)
        else:  # vLLM schedules its own batches
            be.score(seqs, pos, rule)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rate[name] = n * (a.length - 1) / dt
        print(f"{name:13s} {rate[name]:12,.0f} positions/s  ({n} x {a.length} tokens, top-{a.top_k}, {a.dtype}, "
              f"{dt:.1f} s)")
    print(f"vllm / transformers: {rate['vllm'] / rate['transformers']:.2f}x on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
