#!/usr/bin/env python3
"""The paper's Fig. 4 on SmolLM2-135M-Instruct: fake-quant perplexity against the fraction of
down_proj inputs promoted to 16 bits by sensitivity (AssignBitWidths), {0, 10, 20, 50, 100}%.

Rows `METHOD:BITS:FRACTION` with METHOD in bench/table1.py's notation: `quarot` (random Hadamard
R1/R2, static encodings) or `quantnpu-paper` (the paper's method: stage one, then static; the paper
promotes before optimizing). 16 x 512-token Brown evaluation windows, calibration 8 x 512 (the
setting of bench/results/stage_one.md). One row per process through bench/harness.py
(bench/results/fig4.{json,md,png}); a row that bench/table1.py or bench/ablation.py already measured
with the same config in this setting (quantnpu-paper at 10% is Table 1's p10, at 0% the ablation's
+selective) is taken from there, marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import Bench, Context, RowConfig, Setting, main, perplexity  # noqa: E402
from table1 import row_config  # noqa: E402  (bench/ is the script's directory)

FRACTIONS = (0.0, 0.1, 0.2, 0.5, 1.0)
METHODS = ("quarot", "quantnpu-paper")
LABELS = {"quarot": "rotated, static", "quantnpu-paper": "the paper's method (stage one + static)"}
SETTING = Setting(seq_len=512, eval_windows=16, calib_windows=8, steps=32)


def parse_row(row: str) -> tuple[str, str, float]:
    parts = row.split(":")
    try:
        method, bits, fraction = parts[0], parts[1], float(parts[2])
    except (IndexError, ValueError):
        method, bits, fraction = "", "", -1.0
    if method not in METHODS or not 0.0 <= fraction <= 1.0 or len(parts) != 3:
        raise ValueError(f"row {row!r}: write METHOD:BITS:FRACTION with METHOD one of {', '.join(METHODS)} and 0 <= FRACTION <= 1")
    return method, bits, fraction


def fig4_config(row: str, setting: Setting) -> RowConfig:
    """Table 1's row of the method with the promoted fraction set (100% is AssignBitWidths promoting
    every input, not Table 1's p100 override: the two are checked against each other rather than
    assumed equal)."""
    method, bits, fraction = parse_row(row)
    config = row_config(f"{method}:{bits}:p10", setting)
    return config.replace(recipe=config.recipe.replace(promote_fraction=fraction))


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    from quantnpu.memory import release_freed_memory
    from quantnpu.passes import AssignBitWidths
    from quantnpu.pipeline import find_pass

    float_ppl = perplexity(context.float_graph(), context.windows, "float")
    release_freed_memory()
    fq, passes, seconds = context.fake_quant(config)
    assign = find_pass(passes, AssignBitWidths)
    promoted = [s.role for s in assign.sensitivities if s.promoted] if assign is not None else []
    ppl = perplexity(fq, context.windows, f"fake-quant {row}")
    return {"ppl": ppl, "float": float_ppl, "promoted": promoted, "seconds": round(seconds, 1)}


def ordered(rows: list[dict]) -> list[tuple[tuple[str, str, float], dict]]:
    return sorted(((parse_row(r["row"]), r) for r in rows), key=lambda pr: (METHODS.index(pr[0][0]), pr[0][1], pr[0][2]))


def body(results: dict) -> list[str]:
    rows = ordered(results["rows"])
    float_ppl = next((r["float"] for _, r in rows if "float" in r), None)
    s = results["setting"]
    lines = ["The most sensitive down_proj inputs (8-bit Max-Min error on the calibration set) promoted first; `quarot`: random "
             "Hadamard R1/R2, static encodings; `quantnpu-paper`: the paper's method (promotion, then stage one, "
             f"{s['steps']} steps, then static). Fake-quant ppl over {s['eval_windows']} x {s['seq_len']} Brown evaluation tokens, "
             f"calibration {s['calib_windows']} x {s['seq_len']}.", "",
             "![ppl against promoted fraction](fig4.png)", "",
             "| method | W-A-KV | promoted | down_proj inputs at 16 bits | ppl | x float | pipeline s |", "|---|---|---|---|---|---|---|"]
    for (method, bits, fraction), r in rows:
        if "promoted" not in r:  # taken from another table, which does not record them
            layers = ("none " if fraction == 0 else "") + f"(measured as {r['same_as']})"
        else:
            layers = ", ".join(p.split(".")[1] for p in r["promoted"]) if 0 < len(r["promoted"]) < 30 else ("all" if r["promoted"] else "none")
        ratio = f"{r['ppl'] / float_ppl:.2f}" if float_ppl else ""
        lines.append(f"| {method} | {bits} | {fraction:.0%} | {layers} | {r['ppl']:.3f} | {ratio} | {r['seconds']:.0f} |")
    return lines


def figure(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantnpu.fileio import atomic_path

    rows = ordered(results["rows"])
    float_ppl = next((r["float"] for _, r in rows if "float" in r), None)
    s = results["setting"]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for method, bits in dict.fromkeys((m, b) for (m, b, _), _ in rows):
        mine = [(f, r) for (m, b, f), r in rows if (m, b) == (method, bits)]
        axis.plot([100 * f for f, _ in mine], [r["ppl"] for _, r in mine], marker="o", label=f"{bits}, {LABELS[method]}")
    if float_ppl:
        axis.axhline(float_ppl, color="gray", linestyle="--", label="float")
    axis.set_xlabel("down_proj inputs promoted to 16 bits (%)")
    axis.set_ylabel(f"perplexity ({s['eval_windows']} x {s['seq_len']} Brown tokens)")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("SmolLM2-135M-Instruct, fake-quant")
    figure.tight_layout()
    with atomic_path(out.with_suffix(".png"), suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


BENCH = Bench(name="fig4", script=__file__,
              title="Fig. 4: perplexity against the fraction of down_proj inputs at 16 bits (SmolLM2-135M-Instruct)",
              setting=SETTING, default_rows=[f"{m}:4-8-8:{f:g}" for m in METHODS for f in FRACTIONS], config=fig4_config,
              measure=measure, body=body, reuse=("table1", "ablation"), after_write=figure, description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
