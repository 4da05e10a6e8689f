"""The vLLM backend (``--backend vllm``): a teacher served by vLLM on GPUs, read through its logprobs.

Scoring runs ``LLM.generate`` over token-id prompts with ``SamplingParams(max_tokens=1,
prompt_logprobs=k)``; the engine is built with ``max_logprobs`` raised to the cache's k
and ``logprobs_mode="raw_logprobs"`` (the log-softmax of the raw logits, before any
temperature or penalty), and asks for ``flat_logprobs`` where the installed vLLM has it
(per-token Python objects are vLLM's known logprob bottleneck, vLLM #28226, #16546).
What vLLM returns per prompt position t >= 1 is a dict ``{token id: Logprob(logprob,
rank)}`` holding the top k (ranks 1..k) *and* the actual token ``input_ids[t]``, which
adds a (k+1)-th entry when it ranks below k. That extra entry is the label logprob, not an
entry; position 0 has no logprobs (nothing predicts it) and is never asked for.

Generation (``--generate N``) samples with ``SamplingParams(n=N, logprobs=k, temperature,
top_p, seed)``. The sample logprobs are raw temperature-1 logprobs of the same kind, so the
responses' positions are stored from them, not scored a second time; anything else (the
prompt under ``--cache-prompt``, or a response no longer held) is scored as above.

What is exact and what is not (the manifest's ``exactness``): the entries' logprobs, the
label logprob, the tail mass ``1 - sum p`` over the entries and the argmax are the model's own
numbers. The full-vocabulary entropy is not available: the cache stores an upper *bound*, the
entropy of the k known probabilities plus the tail mass spread uniformly over the
``V - k`` other ids (a uniform spread maximises the tail's share). Rule ``sample`` needs the
full distribution and is refused.

vLLM needs a CUDA GPU and is an optional extra (``pip install 'logitstore[vllm]'``); this
module imports it only when the backend is chosen, and checks its version.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from logitstore.errors import InvalidInputError, LogitstoreError
from logitstore.identity import model_identity, tokenizer_record
from logitstore.records import Scored
from logitstore.rules import Rule, Sampled, TopKTail, cut

logger = logging.getLogger(__name__)

#: the first vLLM with ``logprobs_mode`` (raw logprobs, vLLM PR #21398)
MIN_VERSION = (0, 10, 0)
#: our dtype names -> vLLM's
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}
#: positions of generated responses kept for scoring (their sample logprobs), beyond which the oldest are dropped
MEMO_POSITIONS = 1 << 20


class VLLMUnavailableError(LogitstoreError, ImportError):
    """vLLM is not installed, too old, or has no GPU to run on."""


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def import_vllm():
    """The ``vllm`` module, or a clear error saying what is missing."""
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailableError(f"--backend vllm: vLLM is not installed ({exc}); pip install 'logitstore[vllm]' "
                                   "on a machine with a CUDA GPU, or use --backend transformers") from exc
    version = getattr(vllm, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise VLLMUnavailableError(f"--backend vllm: vLLM {version} lacks logprobs_mode='raw_logprobs' (added in "
                                   f"{need}); pip install 'vllm>={need}'")
    return vllm


# ---------------------------------------------------------------- vLLM logprobs -> entries


def candidates(position_logprobs: Sequence[Mapping[int, Any]], labels: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's per-position dicts ``{id: Logprob(logprob, rank)}`` -> (top ids ``[N, k]`` int32, their logprobs
    ``[N, k]`` float64 sorted descending, -inf where vLLM gave fewer, label logprobs ``[N]`` float64).

    The top k are the entries ranked 1..k; the label's entry (present at every position) gives its logprob
    and, when ranked below k, is not a top-k entry.
    """
    n = len(position_logprobs)
    ids = np.zeros((n, k), np.int32)
    lps = np.full((n, k), -np.inf)
    label_lp = np.empty(n)
    for i, (d, y) in enumerate(zip(position_logprobs, labels)):
        if not d or int(y) not in d:
            raise LogitstoreError(f"vLLM returned no logprob for the actual token {int(y)} at a requested position "
                                  f"(got {len(d or {})} entries); is prefix-cache reading on for scoring requests?")
        label_lp[i] = d[int(y)].logprob
        top = [(tid, x.logprob) for tid, x in d.items() if x.rank is not None and x.rank <= k]
        top.sort(key=lambda e: (-e[1], e[0]))  # by logprob, ties by id (as the reference sorts)
        top = top[:k]
        if top:
            ids[i, :len(top)] = [t for t, _ in top]
            lps[i, :len(top)] = [lp for _, lp in top]
    return ids, lps, label_lp


def entropy_upper_bound(lps: np.ndarray, vocab_size: int) -> np.ndarray:
    """Entropy bound from the known top logprobs ``[N, C]`` (-inf: unknown): their own share, plus the rest of
    the mass spread uniformly over the ``V - known`` other ids (the largest entropy that mass can carry)."""
    p = np.exp(lps)
    known = np.where(np.isfinite(lps), -p * lps, 0.0).sum(axis=1)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    rest = np.maximum(vocab_size - np.isfinite(lps).sum(axis=1), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(tail > 0, tail * (np.log(rest) - np.log(np.where(tail > 0, tail, 1.0))), 0.0)
    return known + spread


def scored_from_candidates(ids: np.ndarray, lps: np.ndarray, label_lp: np.ndarray, rule: Rule,
                           vocab_size: int) -> Scored:
    """The cache's fields from the top candidates of N positions (see ``candidates``)."""
    e = cut(ids, lps, rule)
    return Scored(ids=e.ids, logprobs=e.logprobs, n_entries=e.n_entries, label_logprob=label_lp.astype(np.float32),
                  entropy=entropy_upper_bound(lps, vocab_size).astype(np.float32),
                  tail_mass=e.tail_mass.astype(np.float32), argmax=e.ids[:, 0].astype(np.int32))


# ---------------------------------------------------------------- the backend


class VLLMBackend:
    """See the module docstring. ``max_logprobs``: the most entries any rule of this build asks for."""

    exactness: dict[str, str] = {"entropy": "bound"}

    def __init__(self, teacher: str, *, dtype: str = "bf16", device: str = "cuda", max_logprobs: int = 64,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 trust_remote_code: bool = False, extract_mb: int | None = None, seed: int = 0, role: str = "teacher"):
        vllm = import_vllm()
        if dtype not in DTYPES:
            raise InvalidInputError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
        if not device.startswith("cuda"):
            raise InvalidInputError(f"--backend vllm runs on CUDA GPUs; --device {device} is not one")
        if max_logprobs < 1:
            raise InvalidInputError(f"max_logprobs={max_logprobs} must be at least 1")
        if Path(teacher).suffix == ".gguf":
            raise InvalidInputError(f"{role} {teacher}: use --backend transformers for .gguf files")
        self.vllm_version = vllm.__version__
        self.max_logprobs = int(max_logprobs)
        self.llm = vllm.LLM(model=teacher, dtype=DTYPES[dtype], seed=seed, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            trust_remote_code=trust_remote_code, max_logprobs=self.max_logprobs,
                            logprobs_mode="raw_logprobs")
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(self.llm.model_config.get_vocab_size())
        engine_len = getattr(self.llm.model_config, "max_model_len", None)  # the engine's, --max-model-len included
        self.max_positions = int(engine_len) if engine_len else None
        self._flat = "flat_logprobs" in getattr(vllm.SamplingParams, "__struct_fields__", ())
        self._vllm = vllm
        self._settings = {"tensor_parallel_size": tensor_parallel_size, "max_logprobs": self.max_logprobs,
                          "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len,
                          "flat_logprobs": self._flat, "vllm": self.vllm_version}
        hf_config = self.llm.model_config.hf_config
        self.identity = {**model_identity(teacher, SimpleNamespace(config=hf_config), dtype),
                         "architecture": (getattr(hf_config, "architectures", None) or ["?"])[0]}
        # sample logprobs of generated responses, by their full token sequence: (first position, ids, lps, label lps)
        self._memo: collections.OrderedDict[tuple[int, ...], tuple[int, np.ndarray, np.ndarray, np.ndarray]] = \
            collections.OrderedDict()
        self._memo_positions = 0

    def describe(self) -> dict[str, Any]:
        return dict(self.identity)

    def options(self) -> dict[str, Any]:
        return {"device": "cuda", **self._settings}

    def tokenizer_record(self) -> dict[str, Any]:
        return tokenizer_record(self.tokenizer)

    def _params(self, **kw):
        if self._flat:
            kw["flat_logprobs"] = True
        return self._vllm.SamplingParams(detokenize=False, **kw)

    def _check_rule(self, rule: Rule) -> int:
        if isinstance(rule, (Sampled, TopKTail)):
            raise InvalidInputError(f"rule {rule.name} (--sample / --tail-draws) draws from the full distribution, "
                                    "which vLLM does not return; use --top-k/--mass, or --backend transformers")
        if rule.k > self.max_logprobs:
            raise InvalidInputError(f"the rule keeps up to {rule.k} entries but this vLLM engine was started with "
                                    f"max_logprobs={self.max_logprobs}")
        return rule.k

    def score(self, input_ids: Sequence[np.ndarray], positions: Sequence[np.ndarray], rule: Rule,
              generator: Any | None = None) -> list[Scored]:
        k = self._check_rule(rule)
        out: list[Scored | None] = [None] * len(input_ids)
        todo = []
        for i, (x, pos) in enumerate(zip(input_ids, positions)):
            got = self._from_memo(x, pos, k)
            if got is not None:
                out[i] = scored_from_candidates(*got, rule, self.vocab_size)
            else:
                todo.append(i)
        if todo:
            prompts = [{"prompt_token_ids": [int(t) for t in input_ids[i]]} for i in todo]
            results = self.llm.generate(prompts, self._params(max_tokens=1, temperature=1.0, prompt_logprobs=k),
                                        use_tqdm=False)
            for i, res in zip(todo, results):
                pos = np.asarray(positions[i], np.int64)
                x = np.asarray(input_ids[i])
                pl = res.prompt_logprobs
                c = candidates([pl[int(t)] for t in pos], x[pos], k)
                out[i] = scored_from_candidates(*c, rule, self.vocab_size)
        return out  # type: ignore[return-value]

    def _from_memo(self, x: np.ndarray, pos: np.ndarray, k: int):
        key = tuple(int(t) for t in x)
        hit = self._memo.get(key)
        if hit is None:
            return None
        start, ids, lps, label_lp = hit
        pos = np.asarray(pos, np.int64)
        if not len(pos) or pos.min() < start or ids.shape[1] < k:
            return None
        del self._memo[key]
        self._memo_positions -= len(label_lp)
        j = pos - start
        return ids[j][:, :k], lps[j][:, :k], label_lp[j]

    def generate(self, prompt: np.ndarray, *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[np.ndarray]:
        """``n`` sampled responses to one prompt; their raw logprobs are kept for ``score``."""
        if not 0 <= temperature <= 2:
            raise InvalidInputError(f"--temperature {temperature}: vLLM accepts 0 to 2")
        greedy = temperature == 0
        params = self._params(n=1 if greedy else n, max_tokens=max_new_tokens, temperature=temperature,
                              top_p=1.0 if greedy else top_p, seed=seed, logprobs=self.max_logprobs)
        res = self.llm.generate([{"prompt_token_ids": [int(t) for t in prompt]}], params, use_tqdm=False)[0]
        responses = []
        for c in res.outputs:
            toks = np.asarray(list(c.token_ids), np.int32)
            responses.append(toks)
            if c.logprobs is not None and len(toks):
                self._remember(np.concatenate([np.asarray(prompt, np.int32), toks]), len(prompt),
                               [c.logprobs[i] for i in range(len(toks))], toks)
        return responses * n if greedy else responses

    def _remember(self, full: np.ndarray, start: int, logprobs: list, toks: np.ndarray) -> None:
        ids, lps, label_lp = candidates(logprobs, toks, self.max_logprobs)
        self._memo[tuple(int(t) for t in full)] = (start, ids, lps, label_lp)
        self._memo_positions += len(toks)
        while self._memo_positions > MEMO_POSITIONS and self._memo:
            _, (_, _, _, old) = self._memo.popitem(last=False)
            self._memo_positions -= len(old)
