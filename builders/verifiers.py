"""Verifiers: mark a generated response correct or not against the record's reference answer.

Built in, by name: ``exact`` (the stripped response equals the stripped answer),
``last-number`` (the last number in the response equals the answer's number) and
``regex:PATTERN`` (PATTERN is searched in the response; with a capture group and an
answer, the first group must equal the answer, otherwise a match is enough). Any other
spec ``package.module:function`` imports a user callable ``f(response, answer) -> bool``;
nothing is imported unless the user names it. A verifier returns None (correct is NULL)
when it needs an answer and the record has none.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from logitstore.errors import InvalidInputError

Verifier = Callable[[str, str | None], bool | None]
BUILT_IN = ("exact", "last-number", "regex:PATTERN")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact(response: str, answer: str | None) -> bool | None:
    return None if answer is None else response.strip() == answer.strip()


def last_number(response: str, answer: str | None) -> bool | None:
    if answer is None:
        return None
    want = _number(answer)
    if want is None:
        raise InvalidInputError(f"last-number verifier: the answer {answer!r} holds no number")
    got = _number(response)
    return got is not None and abs(got - want) <= 1e-9 * max(1.0, abs(want))


def get_verifier(spec: str) -> Verifier:
    """The verifier named by ``spec`` (see the module docstring)."""
    if spec == "exact":
        return exact
    if spec == "last-number":
        return last_number
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as exc:
            raise InvalidInputError(f"--verifier {spec!r}: not a valid regular expression ({exc})") from None

        def regex(response: str, answer: str | None) -> bool:
            m = pattern.search(response)
            if m is None:
                return False
            if pattern.groups and answer is not None:
                return (m.group(1) or "").strip() == answer.strip()
            return True

        return regex
    module, _, name = spec.partition(":")
    if not module or not name:
        raise InvalidInputError(f"--verifier {spec!r}: use one of {', '.join(BUILT_IN)} or package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(f"--verifier {spec!r}: cannot import {name} from {module} ({exc})") from None
    if not callable(fn):
        raise InvalidInputError(f"--verifier {spec!r}: {module}.{name} is not callable")
    return fn
