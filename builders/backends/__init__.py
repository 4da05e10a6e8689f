"""Teacher backends, chosen by name from an explicit registry and imported lazily.

A backend only turns a batch of token sequences into sparse distributions
(``builders.backends.base.Backend``); batching, resume, progress and writing live
once, in ``builders.driver``. Optional backends (vLLM) import their heavy
dependencies only when chosen, and an unknown name lists the valid ones. There is
no silent fallback from one backend to another.
"""

from __future__ import annotations

import importlib

from logitstore.errors import InvalidInputError

#: name -> "module:Class"
REGISTRY = {
    "transformers": "builders.backends.hf:TransformersBackend",
    "vllm": "builders.backends.vllm:VLLMBackend",
}


def get_backend(name: str):
    """The backend class registered under ``name``."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise InvalidInputError(f"unknown backend {name!r}; available: {', '.join(sorted(REGISTRY))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
