"""`quantnpu export` (tools/export.py): a causal LM's fixed-length graph to `.pt2`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from quantnpu.cli.common import check_positive, run_quietly
from quantnpu.errors import QuantNpuError

EXPORT_MODELS = ("smollm2", "gemma3-270m", "tiny-llama", "tiny-qwen2")
SMOLLM2_VOCAB = 49152


def _export(args: argparse.Namespace) -> int:
    if args.hf is None and args.model not in EXPORT_MODELS:
        raise QuantNpuError(f"unknown model {args.model!r}: choose one of {', '.join(EXPORT_MODELS)}")
    check_positive("--seq-len", args.seq_len)
    output = Path(args.output)
    if output.suffix != ".pt2":
        raise QuantNpuError(f"{output}: the output must end in .pt2")
    if output.exists() and not args.force:
        print(f"reusing {output} (use --force to export again)")
        return 0
    from quantnpu.models.export import export_causal_lm, save_pt2

    name = args.hf or args.model
    if args.hf is not None:
        from quantnpu.models.export import load_hf_model

        model = load_hf_model(args.hf)
    elif args.model == "smollm2":
        from quantnpu.models.smollm2 import load_smollm2

        model, _ = load_smollm2()
    elif args.model == "gemma3-270m":
        from quantnpu.models.gemma3 import load_gemma3

        model, _ = load_gemma3()
    else:
        from quantnpu.models import tiny

        # SmolLM2's vocabulary, so the default tokenizer and corpus work with the tiny models.
        maker = tiny.tiny_llama if args.model == "tiny-llama" else tiny.tiny_qwen2
        model = maker(vocab=SMOLLM2_VOCAB)
    start = time.perf_counter()
    save_pt2(export_causal_lm(model, args.seq_len), output)
    print(f"exported {name} (seq_len {args.seq_len}) to {output} in {time.perf_counter() - start:.1f} s")
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantnpu-export", description="Export a causal LM's prefill graph to .pt2.")
    parser.add_argument("--model", default="smollm2", help=f"one of {', '.join(EXPORT_MODELS)}")
    parser.add_argument("--hf", metavar="DIR", help="export this local Hugging Face model folder (config.json, safetensors) instead; "
                        "lower it with --tokenizer DIR when its tokenizer is not SmolLM2's")
    parser.add_argument("--seq-len", type=int, default=128, help="static sequence length")
    parser.add_argument("-o", "--output", required=True, help="the .pt2 to write")
    parser.add_argument("--force", action="store_true", help="export again even if the output exists")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own log lines")
    return run_quietly(_export, parser.parse_args(argv))
