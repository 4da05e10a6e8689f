"""The ``distill`` subcommand: on-policy distillation in rounds (``tools.distill``).

``logitstore distill TEACHER PROMPTS --student STUDENT --rounds R --generate N -o RUN`` takes the
build's rule, input, teacher, generation, field and storage flags (the same groups as ``build``,
from ``tools.cli.build``), the policy flags but ``--responses-from`` (the student of the previous round
is the policy), and the training flags of ``train`` (``tools.cli.train``) but CACHE and OUT, which each
round sets; four training flags whose names the build already uses are ``--train-temperature``,
``--train-max-length``, ``--train-dtype`` and ``--train-device``, and ``--seed`` seeds both. Each round
prints a line; the end prints a table of the rounds (``RUN/rounds.json``).
"""

from __future__ import annotations

import argparse
import sys

from tools.cli import build as build_flags
from tools.cli.text import format_table
from tools.cli.train import add_config_arguments, config_from_args

#: training flags renamed --train-NAME (the build has --NAME)
PREFIXED = ("temperature", "max_length", "dtype", "device")
#: training fields each round sets itself (or that have no meaning across rounds)
ROUND_FIELDS = ("cache", "output", "resume", "force", "quiet", "seed", "scores")
COLUMNS = ["round", "positions", "pass_rate", "teacher_nll", "reverse_kl_estimate", "train_loss", "eval_ce",
           "eval_kl"]


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill", help="on-policy distillation in rounds: the student samples, the teacher scores, the student trains",
        description="Round r: the student of round r-1 (round 1: STUDENT) samples --generate N responses per prompt "
                    "of PROMPTS, TEACHER scores them into RUN/round-NNN/cache (which also stores the student's own "
                    "logprob and entropy per position), and the student trains --max-steps steps on that cache "
                    "(optionally mixed per batch with --mix-cache at --mix-ratio, GKD's lambda) into "
                    "RUN/round-NNN/student. RUN/rounds.json records every round; all rounds are queryable together: "
                    "logitstore sql RUN \"SELECT round, avg(correct::INT) FROM sequences GROUP BY round\". "
                    "--resume continues a run that was stopped at any point. docs/onpolicy.md")
    p.add_argument("teacher", metavar="TEACHER", help="a local model directory, a hub id, or a .gguf file")
    p.add_argument("prompts", metavar="PROMPTS", help="records with a prompt or messages field (and an answer for "
                                                       "--verifier)")
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="run directory to create (or resume)")
    p.add_argument("--rounds", type=int, required=True, metavar="R", help="sample-score-train rounds")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN (same settings; --rounds may grow)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    build_flags.add_rule_flags(p)
    build_flags.add_input_flags(p)
    build_flags.add_teacher_flags(p)
    build_flags.add_generation_flags(p)
    build_flags.add_policy_flags(p, responses_from=False)
    build_flags.add_field_flags(p)
    build_flags.add_storage_flags(p)
    add_config_arguments(p.add_argument_group("training of each round (as logitstore train)"), skip=ROUND_FIELDS,
                         prefixed=PREFIXED)
    p.set_defaults(func=distill)


def distill(args: argparse.Namespace) -> int:
    from logitstore.errors import InvalidInputError
    from tools.distill import NEED_GENERATE, DistillConfig, run

    if args.generate is None:  # before the build flags are read: --verifier alone would be named instead
        raise InvalidInputError(NEED_GENERATE)
    say = lambda msg: print(f"distill {msg}", file=sys.stderr, flush=True)  # noqa: E731
    cfg = DistillConfig(
        teacher=args.teacher, prompts=args.prompts, student=args.student, output=args.output, rounds=args.rounds,
        build=build_flags.build_config(args), policy=build_flags.policy_config(args, ""), seed=args.seed,
        train=config_from_args(args, prefixed=PREFIXED, cache="", output="", resume=False, force=False,
                               quiet=args.quiet, seed=args.seed, scores=""))
    records = run(cfg, resume=args.resume, progress=not args.quiet, say=say)
    print(format_table(COLUMNS, [[r.get(c) for c in COLUMNS] for r in records], digits=4))
    print(f"\nstudent: {records[-1]['student'] if records else '-'} in {args.output}; rounds: "
          f"{args.output}/rounds.json; SQL: logitstore sql {args.output} \"SELECT round, count(*) FROM sequences "
          "GROUP BY round\"")
    return 0
