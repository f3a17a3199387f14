#!/usr/bin/env python3
"""The paper's Table 2 ablation on SmolLM2-135M-Instruct, one config (4-8-8 by default).

Rows, each adding one component to the one before (as in the paper):
- `D+R`: rotations learned under dynamic per-token activation quantization (SpinQuant's way),
  scales Max-Min, then static encodings;
- `S+R`: rotations learned under the static encodings;
- `S+R+scales`: rotations and every encoding learned jointly (`optimize=joint`), Max-Min init;
- `+init`: the same with the rotation-and-bit-width-aware init rule;
- `+selective`: only the rotated linear inputs and the weights learned (the paper's method);
- `+10%`: and the 10% most sensitive down_proj inputs at 16 bits;
- `+100%`: every down_proj input at 16 bits;
- `down16`: every down_proj input at 16 bits, static encodings, no learning.
Side row, off the chain: `joint+10%`, `+init` with the 10% promotion, read against `+10%` (selective
against joint once the down_proj inputs that carry most of the 8-bit error are at 16 bits).
Same measurement as bench/table1.py (fake-quant ppl on 16 x 512 Brown tokens, lm-eval last-word
accuracy), one row per process, merged into bench/results/ablation.{json,md}; a row Table 1 already
measured with the same pipeline arguments and setting (+10%, +100%, down16) is taken from it, marked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from table1 import bench_main, last_word_text, row_setup, rotation_lr  # noqa: E402  (bench/ is the script's directory)

STEPS = ("D+R", "S+R", "S+R+scales", "+init", "+selective", "+10%", "+100%", "down16")
# row -> (optimize, simulate, init, promotion) ; None: no stage one
ABLATION = {"D+R": ("rotations", "dynamic", "maxmin", "p0"), "S+R": ("rotations", "static", "maxmin", "p0"),
            "S+R+scales": ("joint", "static", "maxmin", "p0"), "+init": ("joint", "static", "rule", "p0"),
            "+selective": ("selective", "static", "rule", "p0"), "+10%": ("selective", "static", "rule", "p10"),
            "+100%": ("selective", "static", "rule", "p100"), "down16": (None, None, None, "p100"),
            "joint+10%": ("joint", "static", "rule", "p10")}
# side rows: not a step of the chain; each is read against the chain row named here (the paper expects that row lower)
SIDE_ROWS = {"joint+10%": ("+10%", "selective beats joint, with 10% promotion")}
# what each step is expected to do in the paper's direction: lower ppl than the row before
PAPER_DIRECTION = {"S+R": "static simulation beats dynamic", "S+R+scales": "learning scales too helps",
                   "+init": "the init rule helps", "+selective": "selective beats joint", "+10%": "10% promotion helps",
                   "+100%": "100% is within 5% of 10%", "down16": "the method at 10% beats 100% 16-bit without learning"}


def ablation_setup(row: str, calibration, steps: int) -> dict:
    from quantnpu.passes.learn_encodings import StageOneConfig
    from quantnpu.quantizers.bit_plan import BitPlan

    bits, _, name = row.partition(":")
    if name not in ABLATION:
        raise ValueError(f"row {row!r}: write BITS:STEP with STEP one of {', '.join(ABLATION)}")
    optimize, simulate, init, promotion = ABLATION[name]
    setup = {"plan": BitPlan.parse(bits, ("*.down_proj.input=16",) if promotion == "p100" else ()), "rotate": "hadamard",
             "promote_fraction": 0.1 if promotion == "p10" else 0.0}
    if optimize is not None:
        setup["stage_one"] = StageOneConfig(steps=steps, optimize=optimize, simulate=simulate, init=init, lr_rotation=rotation_lr(bits))
    return setup


def write(results: dict, out: Path) -> None:
    from quantnpu.fileio import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    lines = ["# Table 2 ablation: SmolLM2-135M-Instruct", "", "Commands:", "", *[f"    {c}" for c in results["commands"]], "",
             f"Fake-quant ppl over {s['eval_windows']} x {s['seq_len']} Brown evaluation tokens, calibration {s['calib_windows']} x "
             f"{s['seq_len']}, stage one {s['steps']} steps; last-word accuracy through lm-eval on {s['last_word_documents']} passages.", "",
             "| config | step | ppl | last word: accuracy / word ppl | the paper's claim | holds here |", "|---|---|---|---|---|---|"]
    for bits in sorted({r["row"].split(":")[0] for r in results["rows"]}):
        previous = None
        for name in STEPS:
            r = by_row.get(f"{bits}:{name}")
            if r is None:
                continue
            claim = PAPER_DIRECTION.get(name, "")
            holds = ""
            if name == "down16":  # the paper's "high precision alone" row, read against its 10% row
                ten = by_row.get(f"{bits}:+10%")
                holds = "" if ten is None else "yes" if ten["ppl"] < r["ppl"] else "no"
            elif claim and previous is not None:
                holds = "yes" if (abs(r["ppl"] - previous["ppl"]) <= 0.05 * previous["ppl"] if name == "+100%" else r["ppl"] < previous["ppl"]) else "no"
            acc = last_word_text(r)
            same = f" (Table 1's {r['same_as'].split()[-1]})" if r.get("same_as") else ""
            lines.append(f"| {bits} | {name}{same} | {r['ppl']:.3f} | {acc} | {claim} | {holds} |")
            if name != "down16":
                previous = r
        for name, (against, claim) in SIDE_ROWS.items():
            r, chain_row = by_row.get(f"{bits}:{name}"), by_row.get(f"{bits}:{against}")
            if r is None:
                continue
            holds = "" if chain_row is None else "yes" if chain_row["ppl"] < r["ppl"] else "no"
            lines.append(f"| {bits} | {name} (side row, against {against}) | {r['ppl']:.3f} | {last_word_text(r)} | {claim} | {holds} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(bench_main(__file__, __doc__.splitlines()[0], [f"4-8-8:{name}" for name in STEPS], ablation_setup, write, "ablation",
                        reuse=[(ROOT / "bench" / "results" / "table1.json", row_setup)]))
