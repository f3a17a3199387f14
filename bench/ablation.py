#!/usr/bin/env python3
"""The paper's Table 2 ablation on SmolLM2-135M-Instruct, one config (4-8-8 by default).

Rows `BITS:STEP`, each step adding one component to the one before (as in the paper), every one the
STATIC recipe with stage one set (quantnpu.pipeline):
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
accuracy), one row per process through bench/harness.py (bench/results/ablation.{json,md}); a row
Table 1 already measured with the same config and setting (+10%, +100%, down16) is taken from it.

Whether a claim holds is read against the measured noise band: bench/studies/results/rounding_noise.json
(one-step rounding flips of the 8-bit activations move the ppl by up to its largest |change|). A
difference inside the band is "within noise", neither holds nor fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import Bench, RowConfig, Setting, main, rotation_lr  # noqa: E402
from table1 import SETTING, check_bits, last_word_text, measure  # noqa: E402  (bench/ is the script's directory)

NOISE_SOURCE = ROOT / "bench" / "studies" / "results" / "rounding_noise.json"
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
CLOSE = 0.05  # "+100% is within 5% of 10%"


def ablation_config(row: str, setting: Setting) -> RowConfig:
    from quantnpu.passes.learn_encodings import StageOneConfig
    from quantnpu.pipeline import STATIC

    bits, _, name = row.partition(":")
    if name not in ABLATION:
        raise ValueError(f"row {row!r}: write BITS:STEP with STEP one of {', '.join(ABLATION)}")
    check_bits(row, bits)
    optimize, simulate, init, promotion = ABLATION[name]
    stage_one = None if optimize is None else StageOneConfig(steps=setting.steps, optimize=optimize, simulate=simulate, init=init,
                                                             lr_rotation=rotation_lr(bits))
    return RowConfig(bits, ("*.down_proj.input=16",) if promotion == "p100" else (),
                     STATIC.replace(promote_fraction=0.1 if promotion == "p10" else 0.0, stage_one=stage_one))


def noise_band(source: Path = NOISE_SOURCE) -> dict:
    """The relative ppl band that rounding jitter alone spans: the largest |relative change| over the
    runs of bench/studies/rounding_noise.py (its setting is named: it is not this bench's)."""
    study = json.loads(source.read_text())
    runs = study["runs"]
    band = max(abs(r["relative"]) for r in runs)
    return {"relative": band, "source": str(source.relative_to(ROOT)),
            "how": f"largest |ppl change| over the {len(runs)} jittered runs of {study['command'].strip()} "
                   f"(rotated {study['bits']}, 4 x 128 evaluation tokens: a smaller setting than this table's, applied as is)",
            "runs": [round(r["relative"], 4) for r in runs]}


def verdict(relative: float, band: float, kind: str = "lower") -> str:
    """yes / no / within noise for a claim about a relative difference `relative` (the row against the
    one it is read against): `lower` claims the row is lower; `close` claims |relative| <= CLOSE."""
    if kind == "close":
        return "no" if abs(relative) > CLOSE + band else "within noise"
    if abs(relative) <= band:
        return "within noise"
    return "yes" if relative < 0 else "no"


def claim_cell(r: dict, against: dict | None, band: float, kind: str = "lower") -> str:
    if against is None:
        return ""
    relative = r["ppl"] / against["ppl"] - 1
    return f"{verdict(relative, band, kind)} ({100 * relative:+.1f}%)"


def derived(results: dict) -> dict:
    return {"noise_band": noise_band()}


def body(results: dict) -> list[str]:
    s = results["setting"]
    band = results["noise_band"]["relative"]
    by_row = {r["row"]: r for r in results["rows"]}
    lines = [f"Fake-quant ppl over {s['eval_windows']} x {s['seq_len']} Brown evaluation tokens, calibration {s['calib_windows']} x "
             f"{s['seq_len']}, stage one {s['steps']} steps; last-word accuracy through lm-eval on {s['last_word']} passages.", "",
             f"\"Holds here\" is decided outside the noise band of +-{100 * band:.1f}%: {results['noise_band']['how']} "
             f"({results['noise_band']['source']}). A difference inside it is \"within noise\". In brackets: the row's ppl "
             "against the row it is read against (the step before; down16 against +10%, where the method is the row read; "
             "a side row against its chain row).", "",
             "| config | step | ppl | last word: accuracy / word ppl | the paper's claim | holds here |", "|---|---|---|---|---|---|"]
    for bits in sorted({r["row"].split(":")[0] for r in results["rows"]}):
        previous = None
        for name in STEPS:
            r = by_row.get(f"{bits}:{name}")
            if r is None:
                continue
            claim = PAPER_DIRECTION.get(name, "")
            holds = ""
            if name == "down16":  # the paper's "high precision alone" row: the method at 10% should be lower than it
                ten = by_row.get(f"{bits}:+10%")
                holds = "" if ten is None else claim_cell(ten, r, band)
            elif name == "+100%":
                holds = claim_cell(r, previous, band, "close") if previous is not None and previous["row"].endswith("+10%") else ""
            elif claim and previous is not None:
                holds = claim_cell(r, previous, band)
            same = f" (Table 1's {r['same_as'].split()[-1]})" if r.get("same_as") else ""
            lines.append(f"| {bits} | {name}{same} | {r['ppl']:.3f} | {last_word_text(r)} | {claim} | {holds} |")
            if name != "down16":
                previous = r
        for name, (against, claim) in SIDE_ROWS.items():
            r, chain_row = by_row.get(f"{bits}:{name}"), by_row.get(f"{bits}:{against}")
            if r is None:
                continue
            holds = "" if chain_row is None else claim_cell(chain_row, r, band)
            lines.append(f"| {bits} | {name} (side row, against {against}) | {r['ppl']:.3f} | {last_word_text(r)} | {claim} | {holds} |")
    return lines


BENCH = Bench(name="ablation", script=__file__, title="Table 2 ablation: SmolLM2-135M-Instruct", setting=SETTING,
              default_rows=[f"4-8-8:{name}" for name in [*STEPS, *SIDE_ROWS]], config=ablation_config, measure=measure,
              body=body, reuse=("table1",), derived=derived, description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
