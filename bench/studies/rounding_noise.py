#!/usr/bin/env python3
"""How far does a fake-quant ppl move when the 8-bit activations round differently, as HTP's
integer kernels do? The noise floor for comparing a `.pte` with its fake-quant graph.

Each 8-bit activation of the calibrated fake-quant graph is rounded from x/s + U(-d, d) instead of
x/s: the elements within d of a rounding midpoint move to the other neighbour (about d/2 of them),
the kind of one-step flip an integer requantization that is off by less than d steps makes. Same
setting as the `.pte` rows of bench/static.py (rotated, 4 x 128 eval windows, 32 x 128 calibration).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.quantizers.observers import EncodingObserver  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from harness import STATIC_PTE_SETTING, Context, static_config  # noqa: E402  (bench/harness.py)


def jitter_rounding(observers: list[EncodingObserver], amplitude: float, generator: torch.Generator) -> None:
    """Make each observer round x/s + U(-amplitude, amplitude); amplitude 0 restores plain rounding."""
    for observer in observers:
        def forward(x, encoding=observer.encoding):
            if amplitude == 0:
                return encoding.fake_quantize(x)
            jitter = (torch.rand(x.shape, generator=generator) * 2 - 1) * amplitude
            return encoding.fake_quantize(x + jitter * encoding.scale[0])
        observer.forward = forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="8-8-8")
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[0.02, 0.08])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "studies" / "results" / "rounding_noise"))
    args = parser.parse_args()
    context = Context(STATIC_PTE_SETTING)
    windows = context.windows
    fq = context.fake_quant(static_config(args.bits))[0]
    eight_bit = [m for m in fq.modules() if isinstance(m, EncodingObserver) and m.encoding is not None
                 and not m.encoding.per_channel and m.encoding.bits == 8]
    base = perplexity(fq, windows, "fake-quant").ppl
    runs = []
    for amplitude in args.amplitudes:
        for seed in range(args.seeds):
            jitter_rounding(eight_bit, amplitude, torch.Generator().manual_seed(seed))
            ppl = perplexity(fq, windows, f"jitter {amplitude} seed {seed}").ppl
            runs.append({"amplitude": amplitude, "seed": seed, "ppl": ppl, "relative": (ppl - base) / base})
            print(f"d={amplitude} seed={seed}: {ppl:.3f} ({100 * runs[-1]['relative']:+.1f}%)", flush=True)
    results = {"command": "python bench/studies/rounding_noise.py " + shlex.join(sys.argv[1:]), "bits": args.bits,
               "eight_bit_activations": len(eight_bit), "fake_quant_ppl": base, "runs": runs}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    lines = ["# Rounding noise: fake-quant ppl under one-step flips of the 8-bit activations", "",
             f"Command: `{results['command']}`", "",
             f"SmolLM2-135M, rotated {args.bits}, 4 x 128 eval tokens, 32 x 128 calibration; "
             f"{len(eight_bit)} 8-bit activations rounded from x/s + U(-d, d) (about d/2 of their elements flip). "
             f"Fake-quant ppl without jitter: {base:.3f}.", "",
             "| d | seed | ppl | vs fake-quant |", "|---|---|---|---|"]
    lines += [f"| {r['amplitude']} | {r['seed']} | {r['ppl']:.3f} | {100 * r['relative']:+.1f}% |" for r in runs]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
