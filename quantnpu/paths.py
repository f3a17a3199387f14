"""Where quantnpu keeps what it downloads or converts once (model, corpus, QNN layout)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QUANTNPU_CACHE"


def cache_dir() -> Path:
    """`$QUANTNPU_CACHE`, else `$XDG_CACHE_HOME/quantnpu`, else `~/.cache/quantnpu`."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantnpu"
    root.mkdir(parents=True, exist_ok=True)
    return root
