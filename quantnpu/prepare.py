"""`python -m quantnpu.prepare`: fetch and convert everything once (model, corpus, QNN layout).

Each step reuses its cache: a second run downloads and converts nothing.
"""

from __future__ import annotations

import sys
import time

from quantnpu.errors import QuantNpuError


def prepare() -> None:
    import torch  # noqa: F401  (before any QNN library is loaded)

    from quantnpu.lowering.qnn_sdk import prepare_qnn_sdk
    from quantnpu.models.corpus import split_tokens
    from quantnpu.models.smollm2 import ensure_smollm2_cache, load_tokenizer

    steps = [
        ("SmolLM2-135M float32 cache", lambda: ensure_smollm2_cache()),
        ("Brown corpus tokens", lambda: {s: split_tokens(load_tokenizer(), s).numel() for s in ("calibration", "evaluation")}),
        ("QNN SDK layout", lambda: prepare_qnn_sdk()),
    ]
    for name, step in steps:
        start = time.perf_counter()
        result = step()
        print(f"[prepare] {name}: {result} ({time.perf_counter() - start:.1f} s)", flush=True)


def main() -> int:
    try:
        prepare()
    except QuantNpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
