"""Real teacher distributions for the store benchmark, computed once and saved.

Runs the embedded SmolLM2-135M teacher over English text that ships with Python
(``pydoc_data.topics``) and saves, per position, the top-256 entries of the full
temperature-1 distribution, the exact entropy, the label and its logprob, and 50
token ids drawn from the full distribution (for sampled caches). The teacher runs
at a few hundred positions/s on CPU, so the result is cached as an ``.npz``.

    python tools/teacher_dump.py --positions 50000 [-o PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOP = 256
DRAWS = 50


def default_path(positions: int) -> Path:
    from logitstore.identity import home_dir

    return home_dir() / f"bench-teacher-dump-v2-{positions}.npz"


def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def compute(positions: int, seq_len: int = 256, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builders.embedded import prepare_embedded_teacher

    torch.manual_seed(seed)
    path = prepare_embedded_teacher()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(english_text(), return_tensors="np")["input_ids"][0]
    n_seq = -(-positions // (seq_len - 1))
    if n_seq * seq_len > len(ids):
        raise SystemExit(f"not enough text: {len(ids)} tokens for {n_seq} x {seq_len}")
    seqs = ids[: n_seq * seq_len].reshape(n_seq, seq_len)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {k: [] for k in ("top_ids", "top_lp", "entropy", "label", "label_lp", "draws", "draw_lp",
                                            "first")}
    t0 = time.time()
    with torch.inference_mode():
        for i in range(0, n_seq, batch):
            x = torch.from_numpy(seqs[i : i + batch]).long()
            lp = model(x).logits[:, :-1].float().log_softmax(-1).flatten(0, 1)
            labels = x[:, 1:].flatten()
            top = lp.topk(TOP, dim=-1)
            p = lp.exp()
            out["top_ids"].append(top.indices.int().numpy())
            out["top_lp"].append(top.values.numpy())
            out["entropy"].append(-(p * lp).sum(-1).numpy())
            out["label"].append(labels.int().numpy())
            out["label_lp"].append(lp.gather(1, labels[:, None])[:, 0].numpy())
            draws = torch.multinomial(p, DRAWS, replacement=True, generator=gen)
            out["draws"].append(draws.int().numpy())
            out["draw_lp"].append(lp.gather(1, draws).numpy())
            out["first"].append(np.repeat(x[:, 0].int().numpy(), seq_len - 1))
            done = (i + len(x)) * (seq_len - 1)
            print(f"\r{done} positions, {done / (time.time() - t0):.0f}/s", end="", file=sys.stderr)
    print(file=sys.stderr)
    arrays = {k: np.concatenate(v)[:positions] for k, v in out.items()}
    arrays["seq_len"] = np.array(seq_len - 1)
    return arrays


def load_or_compute(positions: int, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    path = Path(path) if path else default_path(positions)
    if not path.is_file():
        arrays = compute(positions)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=50_000)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    d = load_or_compute(a.positions, a.output)
    print({k: v.shape for k, v in d.items()})
