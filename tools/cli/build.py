"""The builders' subcommands: ``build`` (teacher inference into a cache) and ``score`` (a student's view of one).

``add_build`` registers the flags (DESIGN.md fixes the names ``--top-k``, ``--resume``,
``--max-length``, ``--sample``, ``--generate``, ``--verifier``, ``--responses-from``) in groups that
``logitstore distill`` registers too (``add_rule_flags``, ``add_input_flags``, ``add_teacher_flags``,
``add_generation_flags``, ``add_policy_flags``, ``add_field_flags``, ``add_storage_flags``);
``build_config`` turns them into one ``builders.config.BuildConfig``, which ``build`` hands to the one
driver, ``builders.driver.build``, which runs in this process or, with ``--ray``, over a pool of Ray actors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from logitstore.errors import InvalidInputError
from tools.cli.text import size


def add_build(sub) -> None:
    b = sub.add_parser(
        "build", help="batch teacher inference into a cache",
        description="Score DATA with TEACHER and write the sparse next-token distributions of every target "
                    "position to the cache CACHE. TEACHER: a local model directory, a hub id, or a .gguf file. "
                    "DATA: .jsonl (.jsonl.gz, .jsonl.zst), .json, .parquet, or a dataset saved with datasets' "
                    "save_to_disk, whose records have text, messages (chat; assistant turns are targets) or "
                    "prompt + response (response tokens are targets).")
    b.add_argument("teacher", metavar="TEACHER")
    b.add_argument("data", metavar="DATA")
    b.add_argument("-o", "--output", required=True, metavar="CACHE", help="cache directory to create (or resume)")
    add_rule_flags(b)
    b.add_argument("--resume", action="store_true",
                   help="continue an interrupted build of CACHE (same teacher, data, rule; with no rule flag, the "
                        "rule CACHE was started with)")
    add_input_flags(b)
    add_teacher_flags(b)
    _ray_flags(b)
    add_generation_flags(b)
    add_policy_flags(b)
    add_field_flags(b)
    add_storage_flags(b)
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=build)


def add_input_flags(b) -> None:
    b.add_argument("--max-length", type=int, metavar="N", help="longest sequence in tokens (default: no limit)")
    b.add_argument("--on-long", choices=["truncate", "skip"], default="truncate",
                   help="records over --max-length (default: truncate)")
    b.add_argument("--on-bad", choices=["error", "skip"], default="error",
                   help="bad records: stop with an error naming file, line and field (default), or skip and count")
    b.add_argument("--cache-prompt", action="store_true", help="also cache non-target positions (loss_mask false)")


def add_rule_flags(b) -> None:
    from builders.config import default_rule

    r = b.add_argument_group("entries per position (one rule)",
                             f"without a rule flag: {_flags_of(default_rule('transformers'))}, the cache the quality "
                             f"benchmark recommends (--backend vllm: {_flags_of(default_rule('vllm'))}); "
                             "see docs/choosing-a-cache.md")
    r.add_argument("--top-k", type=int, metavar="K",
                   help="keep the K most likely tokens (with --mass/--sample: the cap)")
    r.add_argument("--mass", type=float, metavar="P",
                   help="keep the smallest prefix with mass >= P (cap: --top-k, default 64)")
    r.add_argument("--sample", type=int, metavar="DRAWS", help="keep the unique ids of DRAWS samples with their counts")
    r.add_argument("--tail-draws", type=int, metavar="D",
                   help="with --top-k K: the exact top K plus D draws from the rest of the distribution (the tail), "
                        "kept as unique ids with counts and exact logprobs: an unbiased estimate of the whole "
                        "distribution")
    r.add_argument("--proposal-temperature", type=float, metavar="T",
                   help="--sample / --tail-draws draw from q ∝ p^(1/T) instead of p (T > 1: more distinct tokens per "
                        "draw); importance weights from the stored logprobs keep the estimate unbiased (default 1)")
    r.add_argument("--systematic", action="store_true",
                   help="--sample / --tail-draws make systematic draws: D evenly spaced points of the proposal's CDF "
                        "at one random offset, so each token is drawn floor(D q) or ceil(D q) times (independent "
                        "draws: anywhere from 0 to D); the same unbiased estimates with less variance")


def add_teacher_flags(b) -> None:
    t = b.add_argument_group("teacher")
    t.add_argument("--backend", default="transformers",
                   help="teacher backend: transformers (CPU or GPU, every field exact) or vllm (CUDA GPUs; the "
                        "entropy is stored as an upper bound, see FORMAT.md); default transformers")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="model dtype (default fp32; bf16 with --backend vllm)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu; cuda with --backend vllm)")
    t.add_argument("--token-budget", type=int, default=8192, help="padded tokens per teacher batch (default 8192)")
    t.add_argument("--window", type=int, default=4096, metavar="N",
                   help="records sorted by length together before batching (default 4096); with --ray, the records "
                        "of one block, the unit of work of an actor")
    t.add_argument("--extract-mb", type=int, default=96, help="memory for the LM head/softmax chunks, MiB (default 96)")
    t.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code to run")
    t.add_argument("--seed", type=int, default=0, help="seed of the sampled responses (--generate) and of the --sample "
                                                      "and --tail-draws draws (default 0)")
    v = b.add_argument_group("vLLM backend (--backend vllm; pip install 'logitstore[vllm]')")
    v.add_argument("--max-logprobs", type=int, metavar="K", help="the engine's max_logprobs (default: the rule's k)")
    v.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="GPUs per model (default 1)")
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="share of GPU memory vLLM may take (default 0.9)")
    v.add_argument("--max-model-len", type=int, metavar="N", help="context length (default: the model's)")


def _ray_flags(b) -> None:
    d = b.add_argument_group("distributed builds (Ray Data; pip install 'logitstore[ray]')")
    d.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="score with a pool of Ray actors, each with its own teacher, writing its own part of CACHE; "
                        "ADDRESS: omitted = a local Ray instance (or $RAY_ADDRESS), auto = the running cluster, "
                        "ray://HOST:10001 (write --ray=ADDRESS, or put --ray after TEACHER DATA). CACHE must be on a "
                        "filesystem every node sees at the same path; docs/scale.md")
    d.add_argument("--ray-actors", type=int, default=1, metavar="N", help="teacher replicas (default 1)")
    d.add_argument("--ray-gpus-per-actor", type=float, default=0, metavar="G",
                   help="GPUs per actor (default 0; with --backend vllm: its tensor-parallel size)")
    d.add_argument("--ray-cpus-per-actor", type=float, default=1, metavar="C", help="CPUs per actor (default 1)")


def add_generation_flags(b) -> None:
    g = b.add_argument_group("generation mode (sequence-level KD, correctness)")
    g.add_argument("--generate", type=int, metavar="N",
                   help="sample N responses per prompt (prompt field or chat) and cache them instead of the records")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response length limit (default 256)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1; 0 = greedy). The cache stores temperature-1 logprobs anyway")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    g.add_argument("--verifier", metavar="SPEC",
                   help="mark responses correct against the answer field: exact, last-number, regex:PATTERN, "
                        "or package.module:function")


def add_policy_flags(b, *, responses_from: bool = True) -> None:
    """The model the responses are sampled from (``--responses-from``; ``distill`` sets it per round itself)."""
    g = b.add_argument_group("responses from another model (on-policy distillation)")
    if responses_from:
        g.add_argument("--responses-from", metavar="POLICY",
                       help="with --generate N: sample the responses from POLICY (a local model directory with the "
                            "teacher's tokenizer, e.g. a logitstore train output) instead of the teacher, which "
                            "scores them; the cache also stores the policy's own logprob and entropy per position "
                            "(policy_logprob, policy_entropy)")
    g.add_argument("--policy-backend", choices=["transformers", "vllm"], default="transformers",
                   help="the policy's backend (default transformers)")
    g.add_argument("--policy-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="the policy's dtype (default fp32; bf16 with --policy-backend vllm)")
    g.add_argument("--policy-device", default=None,
                   help="the policy's device (default: the teacher's --device); docs/onpolicy.md shows how teacher and "
                        "policy share or split GPUs")
    g.add_argument("--policy-gpu-memory-utilization", type=float, default=0.3, metavar="F",
                   help="--policy-backend vllm: its share of GPU memory (default 0.3; on the teacher's GPU the two "
                        "shares must fit together)")


def add_field_flags(b) -> None:
    f = b.add_argument_group("record fields")
    for name in ("text", "messages", "prompt", "response", "answer"):
        f.add_argument(f"--{name}-field", default=name, metavar="NAME", help=f"the {name} field (default {name})")


def add_storage_flags(b) -> None:
    s = b.add_argument_group("storage (FORMAT.md)")
    s.add_argument("--values", choices=["qdelta", "fp16", "fp32", "none"], default="qdelta",
                   help="entry logprobs: quantised deltas (default, max error 0.0195 nats), fp16, fp32 (lossless), "
                        "none (--sample only)")
    s.add_argument("--logprob-step", type=float, help="qdelta step in nats (default 5/128)")
    s.add_argument("--ids", choices=["ranked", "raw"], default="ranked",
                   help="entry ids as ranked codes (default) or raw")
    s.add_argument("--scalars", choices=["fp32", "fp16"], default="fp32", help="label logprob/entropy/tail mass dtype")
    s.add_argument("--zstd-level", type=int, default=1, help="zstd level (default 1; 19 is ~1%% smaller, much slower)")
    s.add_argument("--shard-mb", type=float, default=256, help="shard size limit in MiB (default 256)")
    s.add_argument("--row-group-positions", type=int, default=65536,
                   help="positions per Parquet row group: the unit of reading and shuffling (default 65536)")


def _rule(args: argparse.Namespace):
    """The sparse-entry rule the flags name, each flag checked by name (what was given, what is allowed)."""
    from logitstore.rules import MassTopK, Sampled, TopK, TopKTail

    given = [f for f, v in (("--mass", args.mass), ("--sample", args.sample), ("--tail-draws", args.tail_draws))
             if v is not None]
    if len(given) > 1:
        raise InvalidInputError(f"{' and '.join(given)} are different rules; give at most one")
    for flag, v in (("--top-k", args.top_k), ("--sample", args.sample), ("--tail-draws", args.tail_draws)):
        if v is not None and not 1 <= v <= 65535:
            raise InvalidInputError(f"{flag} {v}: must be an integer in [1, 65535]")
    t = args.proposal_temperature
    if t is not None and not (math.isfinite(t) and t > 0):
        raise InvalidInputError(f"--proposal-temperature {t}: must be a finite number > 0 (draws from q ∝ p^(1/T))")
    if t is not None and args.sample is None and args.tail_draws is None:
        raise InvalidInputError("--proposal-temperature shapes the draws of --sample or --tail-draws; give one of them")
    sys_ = args.systematic
    if sys_ and args.sample is None and args.tail_draws is None:
        raise InvalidInputError("--systematic shapes the draws of --sample or --tail-draws; give one of them")
    t = 1.0 if t is None else t
    if args.sample is not None:
        return Sampled(args.sample, args.top_k or 0, t, sys_)
    if args.tail_draws is not None:
        if args.top_k is None:
            raise InvalidInputError(f"--tail-draws {args.tail_draws} draws from the tail of an exact top-k head: give "
                                    "--top-k K too (e.g. --top-k 16 --tail-draws 16)")
        return TopKTail(args.top_k, args.tail_draws, t, sys_)
    if args.mass is not None:
        return MassTopK(args.mass, args.top_k or 64)
    if args.top_k is None:
        from builders.config import default_rule

        kept = _rule_of_cache(args.output) if args.resume else None
        if kept is not None:  # a cache started with another default (or another rule) goes on with its own
            print(f"--resume with no rule flag: the cache's own rule, {_flags_of(kept)}", file=sys.stderr)
            return kept
        rule = default_rule(args.backend)
        print(f"no rule flag given: the default, {_flags_of(rule)} (docs/choosing-a-cache.md)", file=sys.stderr)
        return rule
    return TopK(args.top_k)


def _rule_of_cache(path: str):
    """The rule recorded by the cache at ``path`` (complete or cut short), or None where there is no readable one
    (a new output; the build's own checks then say what is wrong)."""
    from logitstore.errors import LogitstoreError
    from logitstore.manifest import load_manifest
    from logitstore.rules import rule_from_dict

    try:
        return rule_from_dict(load_manifest(path).rule)
    except (LogitstoreError, OSError, ValueError, TypeError, KeyError):
        return None


def _flags_of(rule) -> str:
    """The build flags that name a rule."""
    from logitstore.rules import MassTopK, Sampled, TopKTail

    t = f" --proposal-temperature {rule.proposal_temperature:g}" if rule.proposal_temperature != 1 else ""
    s = " --systematic" if rule.systematic else ""
    if isinstance(rule, TopKTail):
        return f"--top-k {rule.k} --tail-draws {rule.tail_draws}{t}{s}"
    if isinstance(rule, Sampled):
        return f"--sample {rule.draws}" + (f" --top-k {rule.k}" if rule.k != rule.draws else "") + t + s
    if isinstance(rule, MassTopK):
        return f"--mass {rule.p:g} --top-k {rule.k}"
    return f"--top-k {rule.k}"


def _backend_options(args: argparse.Namespace, rule) -> dict:
    """The chosen backend's options from the command line."""
    opts = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    if args.backend == "vllm":
        return {**opts, "dtype": "bf16" if args.dtype is None else args.dtype,
                "device": "cuda" if args.device is None else args.device, "max_logprobs": args.max_logprobs or rule.k,
                "tensor_parallel_size": args.tensor_parallel_size,
                "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len}
    return {**opts, "dtype": "fp32" if args.dtype is None else args.dtype,
            "device": "cpu" if args.device is None else args.device, "extract_mb": args.extract_mb}


def policy_config(args: argparse.Namespace, path: str, round_index: int | None = None):
    """The ``PolicyConfig`` of the policy flags, sampling from ``path``."""
    from builders.config import PolicyConfig

    vllm = args.policy_backend == "vllm"
    device = args.policy_device or args.device or ("cuda" if vllm else "cpu")
    opts = {"dtype": args.policy_dtype or ("bf16" if vllm else "fp32"), "device": device,
            "trust_remote_code": args.trust_remote_code}
    opts.update({"max_logprobs": 1, "gpu_memory_utilization": args.policy_gpu_memory_utilization} if vllm
                else {"extract_mb": args.extract_mb})
    return PolicyConfig(path=path, backend=args.policy_backend, backend_options=opts, round=round_index)


def build_config(args: argparse.Namespace):
    """The ``BuildConfig`` the flags describe."""
    from builders.config import BuildConfig, RayOptions
    from builders.data import Fields
    from builders.generate import GenerationConfig
    from logitstore.codec import Codec

    rule = _rule(args)
    codec = Codec(values=args.values, ids=args.ids, scalars=args.scalars, zstd_level=args.zstd_level,
                  **({"logprob_step": args.logprob_step} if args.logprob_step else {}))
    generation = None
    if args.generate is not None:
        generation = GenerationConfig(n=args.generate, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, verifier=args.verifier)
    elif args.verifier:
        raise InvalidInputError("--verifier judges generated responses: it needs --generate N")
    ray = None
    if getattr(args, "ray", None) is not None:
        ray = RayOptions(address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
                         gpus_per_actor=args.ray_gpus_per_actor, cpus_per_actor=args.ray_cpus_per_actor)
    policy = None
    if getattr(args, "responses_from", None):
        if generation is None:
            raise InvalidInputError(f"--responses-from {args.responses_from}: responses are sampled in generation "
                                    "mode; give --generate N as well")
        policy = policy_config(args, args.responses_from)
    return BuildConfig(
        rule=rule, codec=codec, backend=args.backend, generation=generation, ray=ray, policy=policy,
        backend_options=_backend_options(args, rule),
        fields=Fields(text=args.text_field, messages=args.messages_field, prompt=args.prompt_field,
                      response=args.response_field, answer=args.answer_field),
        max_length=args.max_length, on_long=args.on_long, on_bad=args.on_bad, token_budget=args.token_budget,
        window=args.window, cache_prompt=args.cache_prompt, shard_mb=args.shard_mb,
        row_group_positions=args.row_group_positions, seed=args.seed, lock=not getattr(args, "no_lock", False),
    )


def build(args: argparse.Namespace) -> int:
    from builders.driver import build as run_build

    config = build_config(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    m = run_build(args.teacher, args.data, args.output, config, resume=args.resume, progress=not args.quiet,
                  argv=sys.argv[1:])
    skipped = (m.build.get("skipped") or {}).get("counts") or {}
    print(f"{args.output}: {m.sequences:,} sequences, {m.positions:,} positions, {size(m.bytes)}"
          + (f", {m.bytes / m.positions:.1f} bytes/position" if m.positions else ""))
    lim = m.build.get("length_limit") or {}
    if lim.get("by") == "teacher":
        given = "no --max-length given" if lim["max_length"] is None else f"below --max-length {lim['max_length']}"
        print(f"length limit: {lim['applied']} tokens, the teacher's context length ({given}); longer records: "
              f"--on-long {lim['on_long']}")
    if skipped:
        print("skipped or changed: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if m.duplicates_skipped:
        print(f"duplicates: {m.duplicates_skipped} records with the same tokens as an earlier one were written once")
    return 0


# ---------------------------------------------------------------- score


def add_score(sub) -> None:
    p = sub.add_parser(
        "score", help="run a student over the cache: per-position entropy, label logprob, divergence to the teacher",
        description="Run STUDENT (a local HF model directory or hub id with the teacher's tokenizer) over every "
                    "cached sequence and write SCORES/scores.parquet, one row per cached position: seq_id, pos, "
                    "student_label_logprob, student_entropy, student_top1, kl_teacher_student, kl_student_teacher, "
                    "tvd (divergences over the teacher's stored support plus one other bucket; NULL for a cache "
                    "without logprobs). Join it with the tokens view: ... FROM tokens t JOIN "
                    "read_parquet('SCORES/scores.parquet') s USING (seq_id, pos).")
    p.add_argument("cache", metavar="CACHE", help="cache directory or selection file")
    p.add_argument("student", metavar="STUDENT", help="student model: a local directory or a hub id")
    p.add_argument("-o", "--output", required=True, metavar="SCORES", help="directory to create (new or empty)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="student dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per student batch (default 8192)")
    p.add_argument("--extract-mb", type=int, default=96, help="memory for the LM head/softmax chunks, MiB (default 96)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code to run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=score)


def score(args: argparse.Namespace) -> int:
    """Score, then print one summary line."""
    from builders.score import score_cache
    from logitstore.scores import INFO_FILE

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = score_cache(args.cache, args.student, args.output, dtype=args.dtype, device=args.device,
                      token_budget=args.token_budget, extract_mb=args.extract_mb, progress=not args.quiet,
                      trust_remote_code=args.trust_remote_code)
    info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
    s = info["summary"]
    fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"  # noqa: E731
    print(f"{out}: {info['rows']:,} positions of {info['sequences']:,} sequences; student nll {fmt(s['student_nll'])}, "
          f"entropy {fmt(s['student_entropy'])}, accuracy {fmt(s['student_accuracy'])}, "
          f"KL(teacher||student) {fmt(s['kl_teacher_student'])} nats")
    return 0
