#!/usr/bin/env python3
"""Why rotation matters, on SmolLM2-135M-Instruct (Brown corpus).

Rows (the STATIC recipe with `rotate` none or hadamard, through `quantnpu.pipeline.pipeline`):
- `float:none` / `float:hadamard`: float ppl of the unrotated graph and of the rotated one
  (UntieEmbeddings, FoldNorms, FuseRotations with random Hadamard R1/R2, BakeRotations): they must
  agree within 0.1%;
- `stats:none` / `stats:hadamard`: per linear-input activation statistics (max/std ratio, kurtosis)
  over the first `--stats-windows` evaluation windows, and the figure of both;
- `et-8a8w:ROTATION`, `et-16a8w:ROTATION`: ExecuTorch's stock QnnQuantizer fake-quant ppl on either graph;
- `pte:et-16a8w:hadamard`: the rotated graph at `--pte-seq-len` tokens lowered to QNN HTP (SM8650)
  and run on the x86 HTP simulator.
One row per process through bench/harness.py (bench/results/rotation.{json,md},
bench/results/rotation_activations.png).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import Bench, Context, RowConfig, Setting, main  # noqa: E402

KINDS = ("q_proj", "o_proj", "gate_proj", "down_proj")  # q/k/v and gate/up share their input
ROTATIONS = ("none", "hadamard")
CONFIGS = ("et-8a8w", "et-16a8w")
PTE = "pte:"
DEFAULT_ROWS = ([f"float:{r}" for r in ROTATIONS] + [f"stats:{r}" for r in ROTATIONS] + [f"{c}:{r}" for c in CONFIGS for r in ROTATIONS]
                + [f"{PTE}et-16a8w:hadamard"])
SETTING = Setting(seq_len=512, eval_windows=40, calib_windows=32, stats_windows=4, pte_seq_len=128, pte_windows=4, pte_calib_windows=32)


def row_config(row: str, setting: Setting) -> RowConfig:
    from quantnpu.pipeline import STATIC

    what, _, rotate = row.removeprefix(PTE).partition(":")
    if rotate not in ROTATIONS or (what not in ("float", "stats") and not what.startswith("et-")) or (row.startswith(PTE) and not what.startswith("et-")):
        raise ValueError(f"row {row!r}: write float:ROTATION, stats:ROTATION, et-<config>:ROTATION or {PTE}et-<config>:ROTATION "
                         f"(ROTATION one of {', '.join(ROTATIONS)})")
    return RowConfig(what if what.startswith("et-") else None, recipe=STATIC.replace(rotate=rotate))


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    from quantnpu.passes import PassManager
    from quantnpu.runtime_harness.activation_stats import linear_input_stats
    from quantnpu.runtime_harness.perplexity import perplexity

    what, _, rotate = row.removeprefix(PTE).partition(":")
    if what in ("float", "stats"):
        manager = PassManager(config.passes())
        start = time.perf_counter()
        gm = manager.run(context.program.module())
        seconds = round(time.perf_counter() - start, 2)
        print(manager.report(), flush=True)
        if what == "float":
            return {**perplexity(gm, context.windows, f"float ({rotate})").as_dict(), "passes_seconds": seconds}
        return {"stats": linear_input_stats(gm, context.windows[: context.setting.stats_windows], f"stats ({rotate})")}
    if not row.startswith(PTE):
        start = time.perf_counter()
        quantized = PassManager(config.passes(context.calibration)).run(context.program.module())
        result = perplexity(quantized, context.windows, f"{what} fake-quant ({rotate})")
        return {**result.as_dict(), "calibrate_convert_eval_seconds": round(time.perf_counter() - start, 1)}
    import tempfile

    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    s = context.setting
    short = context.export_at(s.pte_seq_len)
    windows, calibration = context.pte_windows, context.pte_calibration
    gm = PassManager(RowConfig(None, recipe=config.recipe).passes()).run(short.module())
    quantized = PassManager(config.passes(calibration)).run(short.module())
    with tempfile.TemporaryDirectory() as work:
        lowered = lower_to_qnn(quantized, (calibration[0],), Path(work) / "row.pte")
        pte = perplexity(PteModel(lowered.pte_path), windows, ".pte on HTP simulator (rotated)")
    fake = perplexity(quantized, windows, "fake-quant (rotated, pte windows)")
    flt = perplexity(gm, windows, "float (rotated, pte windows)")
    return {"et_config": what.removeprefix("et-"), "rotate": rotate, "soc": "SM8650", "delegates": lowered.delegates,
            "outside_delegates": lowered.outside_delegates, "lowering_seconds": round(lowered.seconds, 1),
            "pte_mib": round(lowered.size_bytes / 2**20, 1), "float_ppl": flt.ppl, "fake_quant_ppl": fake.ppl, "pte_ppl": pte.ppl,
            "pte_vs_fake_quant_relative": abs(pte.ppl - fake.ppl) / fake.ppl, "simulator_tokens_per_second": round(pte.tokens / pte.seconds, 2),
            "qnn_sdk": {"version": context.sdk.version_text, "bridged": context.sdk.bridged}}


FIGURE = "rotation_activations.png"


def figure(results: dict, out: Path) -> None:
    by_row = {r["row"]: r for r in results["rows"]}
    if all(f"stats:{r}" in by_row for r in ROTATIONS):
        plot({r: by_row[f"stats:{r}"]["stats"] for r in ROTATIONS}, out.with_name(FIGURE))


def plot(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantnpu.fileio import atomic_path

    figure, axes = plt.subplots(2, len(KINDS), figsize=(4 * len(KINDS), 7), sharex=True)
    for column, kind in enumerate(KINDS):
        for row, metric in enumerate(("max_over_std", "kurtosis")):
            axis = axes[row][column]
            for rotate, style in (("none", "o-"), ("hadamard", "s-")):
                layers = sorted(int(r.split(".")[1]) for r in stats[rotate] if r.endswith(kind) and r.startswith("layers."))
                values = [stats[rotate][f"layers.{i}.{kind}"][metric] for i in layers]
                axis.plot(layers, values, style, markersize=3, label="unrotated" if rotate == "none" else "rotated (Hadamard R1/R2)")
            axis.set_yscale("log")
            axis.set_title(f"{kind} input: {'max|x| / std' if metric == 'max_over_std' else 'kurtosis'}", fontsize=10)
            if row == 1:
                axis.set_xlabel("layer")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M: linear-input activations before and after R1/R2 (Brown eval windows)")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def body(results: dict) -> list[str]:
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    lines = [f"Evaluation: {s['eval_windows']} windows x {s['seq_len']} tokens of the Brown evaluation split; calibration: "
             f"{s['calib_windows']} windows x {s['seq_len']} tokens of the calibration split. 2-core CPU.", ""]
    if all(f"float:{r}" in by_row for r in ROTATIONS):
        unrotated, rotated = by_row["float:none"]["ppl"], by_row["float:hadamard"]["ppl"]
        lines += ["| graph | float ppl |", "|---|---|", f"| unrotated | {unrotated:.4f} |", f"| rotated (random Hadamard R1/R2, baked) | {rotated:.4f} |",
                  f"| relative difference | {100 * abs(rotated - unrotated) / unrotated:.4f}% |", ""]
    lines += ["| ExecuTorch QnnQuantizer, fake-quant ppl | unrotated | rotated |", "|---|---|---|"]
    for config in CONFIGS:
        cells = [f"{by_row[f'{config}:{r}']['ppl']:,.3f}" if f"{config}:{r}" in by_row else "" for r in ROTATIONS]
        if any(cells):
            lines.append(f"| {config.removeprefix('et-')} | {' | '.join(cells)} |")
    if all(f"stats:{r}" in by_row for r in ROTATIONS):
        stats = {r: by_row[f"stats:{r}"]["stats"] for r in ROTATIONS}
        lines += ["", f"## Linear-input activations ({s['stats_windows']} windows), mean over layers", "",
                  "| input of | max/std unrotated | max/std rotated | kurtosis unrotated | kurtosis rotated |", "|---|---|---|---|---|"]
        for kind in KINDS + ("lm_head",):
            def mean(rotate, metric):
                values = [v[metric] for role, v in stats[rotate].items() if role.endswith(kind)]
                return sum(values) / len(values)
            lines.append(f"| {kind} | {mean('none', 'max_over_std'):.1f} | {mean('hadamard', 'max_over_std'):.1f} | "
                         f"{mean('none', 'kurtosis'):.1f} | {mean('hadamard', 'kurtosis'):.1f} |")
        lines += ["", f"![activations]({FIGURE})"]
    for p in [r for r in results["rows"] if r["row"].startswith(PTE)]:
        lines += ["", f"## Rotated `.pte` on the HTP simulator ({p['et_config']}, {p['soc']}, {s['pte_windows']} windows x {s['pte_seq_len']} tokens; "
                  f"calibration {s['pte_calib_windows']} x {s['pte_seq_len']})", "",
                  "| float | fake-quant | `.pte` | `.pte` vs fake-quant |", "|---|---|---|---|",
                  f"| {p['float_ppl']:.3f} | {p['fake_quant_ppl']:.3f} | {p['pte_ppl']:.3f} | {100 * p['pte_vs_fake_quant_relative']:.2f}% |", "",
                  f"{p['delegates']} QNN delegate(s), {len(p['outside_delegates'])} op(s) outside; {p['pte_mib']} MiB; lowering {p['lowering_seconds']} s; "
                  f"simulator {p['simulator_tokens_per_second']} tokens/s."]
    seconds = [f"{r['row']} {r[k]}" for r in results["rows"] for k in ("passes_seconds", "calibrate_convert_eval_seconds") if k in r]
    if seconds:
        lines += ["", "Seconds (passes; calibrate + convert + eval): " + ", ".join(seconds) + "."]
    return lines


BENCH = Bench(name="rotation", script=__file__, title="Rotation: SmolLM2-135M-Instruct on the Brown corpus", setting=SETTING,
              default_rows=DEFAULT_ROWS, config=row_config, measure=measure, body=body, after_write=figure,
              description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
