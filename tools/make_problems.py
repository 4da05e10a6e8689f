"""A larger arithmetic problem set with worked reference solutions, generated offline (for bench_onpolicy.py).

Every record is a chat whose last turn is the reference solution, plus the answer::

    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 23 + 48?"},
                  {"role": "assistant", "content": "23 + 48 = 71. The answer is 71."}],
     "answer": "71", "kind": "add"}

so one file serves both modes: ``build --generate`` drops the trailing assistant turn and samples from
the prompt; plain ``build`` scores the solution (the data-generated, off-policy responses). Kinds: ``add``
and ``sub`` of two-digit numbers, ``mul`` (a one-digit by a one- or two-digit number), ``two_step``
(``a + b * c``, with the product worked first). The wording of the questions varies; the answers are
computed from the same numbers that are written into the question. A fixed seed gives the same file.

    python tools/make_problems.py -n 1000 -o problems.jsonl [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SYSTEM = "Solve the problem. End with: The answer is N."
ASK = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "Work out {q}.", "What is the value of {q}?")


def problem(rng: random.Random) -> tuple[str, str, str, str]:
    """(kind, question, worked solution, answer)."""
    kind = rng.choice(("add", "sub", "mul", "two_step"))
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q, r, work = f"{a} + {b}", a + b, ""
    elif kind == "sub":
        a = rng.randint(20, 99)
        b = rng.randint(10, a)
        q, r, work = f"{a} - {b}", a - b, ""
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 30)
        q, r, work = f"{a} * {b}", a * b, ""
    else:
        a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 9)
        q, r = f"{a} + {b} * {c}", a + b * c
        work = f"First, {b} * {c} = {b * c}. Then {a} + {b * c} = {r}. "
    solution = (work or f"{q} = {r}. ") + f"The answer is {r}."
    return kind, rng.choice(ASK).format(q=q), solution, str(r)


def make(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct problems (by question text)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        kind, question, solution, answer = problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                 {"role": "assistant", "content": solution}], "answer": answer, "kind": kind})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    rows = make(a.n, a.seed)
    Path(a.output).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{a.output}: {len(rows)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
