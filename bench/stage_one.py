#!/usr/bin/env python3
"""Stage one and mixed precision on SmolLM2-135M-Instruct, Brown corpus (the paper's Table 1/2 rows
for this model).

Rows `BITS:ROW`, the STATIC recipe with: `static` (static encodings only); `mixed10` (+ 10% of
down_proj inputs at 16 bits by sensitivity); `stage1` (+ stage one: LSQ scales + Cayley-SGD R1/R2,
selective; rotation lr 0.1 with 8-bit weights, 2.0 with 4-bit ones); `stage1+mixed10`;
`stage1+mixed10+gptq` (and GPTQ rounding of the 4-bit weights); `down16` (every down_proj input at
16 bits, static). `float`: the rotated float graph. Stage-one rows also record seconds per step
against one float forward+backward of the same window in the same process, the loss curve and
orthogonality. `pte:BITS:ROW`: that row's pipeline at `--pte-seq-len` tokens lowered to QNN HTP and
run on the x86 simulator. One row per process through bench/harness.py
(bench/results/stage_one.{json,md}).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import Bench, Context, RowConfig, Setting, main, perplexity, pte_measurement, rotation_lr  # noqa: E402

# name -> (fraction of down_proj inputs promoted by sensitivity, stage one?, overrides, weight rounding)
ROWS = {
    "static": (0.0, False, (), "nearest"),
    "mixed10": (0.1, False, (), "nearest"),
    "stage1": (0.0, True, (), "nearest"),
    "stage1+mixed10": (0.1, True, (), "nearest"),
    "stage1+mixed10+gptq": (0.1, True, (), "gptq"),
    "down16": (0.0, False, ("*.down_proj.input=16",), "nearest"),
}
ROW_TITLES = {"static": "static only", "mixed10": "+ mixed precision 10%", "stage1": "+ stage one",
              "stage1+mixed10": "+ stage one and 10%", "stage1+mixed10+gptq": "+ stage one and 10%, GPTQ-rounded 4-bit weights",
              "down16": "100% down_proj inputs at 16 bits (static)"}
CONFIGS = ("8-8-8", "4-8-8", "4-4-8")
FLOAT_ROW = "float"
PTE = "pte:"
DEFAULT_ROWS = ([FLOAT_ROW] + [f"{bits}:{row}" for bits in CONFIGS for row in ("static", "mixed10", "down16", "stage1", "stage1+mixed10")]
                + ["4-8-8:stage1+mixed10+gptq", "4-4-8:stage1+mixed10+gptq", f"{PTE}8-8-8:stage1+mixed10", f"{PTE}4-8-8:stage1+mixed10"])
TARGETS = {"8-8-8": 1.45, "4-8-8": 2.2, "4-4-8": 3.0}  # the issue's, for stage one + 10%, x float
SETTING = Setting(seq_len=512, eval_windows=16, calib_windows=8, steps=32, pte_seq_len=128, pte_windows=4)


def split_row(row: str) -> tuple[str, str]:
    from quantnpu.errors import QuantNpuError
    from quantnpu.quantizers.bit_plan import BitPlan

    bits, _, name = row.removeprefix(PTE).partition(":")
    if name not in ROWS:
        raise ValueError(f"row {row!r}: write BITS:ROW with ROW one of {', '.join(ROWS)}, or {FLOAT_ROW}, or {PTE}BITS:ROW")
    try:
        BitPlan.parse(bits)
    except QuantNpuError as error:
        raise ValueError(f"row {row!r}: {error}") from None
    return bits, name


def row_config(row: str, setting: Setting) -> RowConfig:
    from quantnpu.passes.learn_encodings import StageOneConfig
    from quantnpu.pipeline import STATIC

    if row == FLOAT_ROW:
        return RowConfig(None, recipe=STATIC)
    bits, name = split_row(row)
    promote, learn, overrides, rounding = ROWS[name]
    stage_one = StageOneConfig(steps=setting.steps, lr_rotation=rotation_lr(bits)) if learn else None
    return RowConfig(bits, overrides, STATIC.replace(promote_fraction=promote, stage_one=stage_one, weight_rounding=rounding))


def plain_step_seconds(graph, window) -> float:
    """A plain float forward+backward of the exported model on one window (every weight learnable,
    as in training), the faster of two: what a stage-one step is compared with."""
    import torch.nn.functional as F

    from quantnpu.graph.equivalence import logits_of
    from quantnpu.memory import release_freed_memory

    model = copy.deepcopy(graph)
    for p in model.parameters():
        p.requires_grad_(True)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        logits = logits_of(model(window)).float()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    del model
    release_freed_memory()
    return min(times)


def run_row(config: RowConfig, context: Context, graph=None, calibration=None):
    """The row's pipeline to its fake-quant graph: (fake-quant graph, facts)."""
    from quantnpu.passes import PassManager, StaticCalibration
    from quantnpu.passes.learn_encodings import LearnEncodings
    from quantnpu.pipeline import fake_quant_end, find_pass

    graph = context.graph if graph is None else graph
    calibration = context.calibration if calibration is None else calibration
    passes = config.passes(calibration)
    learner = find_pass(passes, LearnEncodings)
    if learner is not None:
        learner.measure_float_step = True
    start = time.perf_counter()
    fq = PassManager(passes, stop_after=fake_quant_end(passes), progress=True).run(copy.deepcopy(graph))
    facts = {"seconds": round(time.perf_counter() - start, 1), "weight_rounding": config.recipe.weight_rounding,
             "learned_encodings_kept": find_pass(passes, StaticCalibration).learned_used}
    if learner is not None:
        summary = learner.summary()
        plain = plain_step_seconds(graph, calibration[0])
        stage_one = config.recipe.stage_one
        facts["stage_one"] = {
            **summary, "plain_float_forward_backward_seconds": round(plain, 3), "step_ratio": round(summary["seconds_per_step"] / plain, 3),
            # the same fused graph with its quantizers off: R1/R2 recomputed into every weight each forward
            "float_forward_backward_with_rotations_seconds": round(learner.float_step_seconds, 3),
            "quantizers": len(learner.sites), "lr_rotation": stage_one.lr_rotation, "lr_scale": stage_one.lr_scale,
        }
    return fq, facts


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    if row == FLOAT_ROW:
        return {"ppl": perplexity(context.float_graph(), context.windows, "float (rotated)")}
    if row.startswith(PTE):
        graph, windows, calibration = context.pte_graph, context.pte_windows, context.pte_calibration
        float_ppl = perplexity(context.float_graph(graph), windows, "float")
        fq, facts = run_row(config, context, graph, calibration)
        quantized = context.converted(fq, config, calibration)
        return {"float": float_ppl, **facts, **pte_measurement(fq, quantized, windows, row)}
    fq, facts = run_row(config, context)
    return {"ppl": perplexity(fq, context.windows, f"fake-quant {row}"), **facts}


def body(results: dict) -> list[str]:
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    float_ppl = by_row[FLOAT_ROW]["ppl"] if FLOAT_ROW in by_row else float("nan")
    lines = [
        f"Fake-quant ppl, {s['eval_windows']} x {s['seq_len']}-token windows; calibration (stage one's training windows too) "
        f"{s['calib_windows']} x {s['seq_len']}. Rotated (random Hadamard R1/R2) in every row. Float ppl {float_ppl:.3f} (row `{FLOAT_ROW}`).", "",
        f"Stage one: selective, {s['steps']} steps of 1 window, lr 0.01 scales (relative to each scale's size), rotations (Cayley "
        "SGD) at the lr in the table (0.1 with 8-bit weights, 2.0 with 4-bit ones), cosine decay, local loss for the first quarter "
        "of the steps, init rule, ce loss (each row's config has the rest).", "",
        "Stage one s/step against a plain float forward+backward of the exported model on one window (all weights "
        "learnable), measured in the same process; in brackets the same fused graph with its quantizers off (R1/R2 recomputed "
        "into every weight each forward, the part of a step that learning rotations adds).", "",
        "| W-A-KV | row | rotation lr | fake-quant ppl | x float | target (stage one + 10%) | stage one s/step | plain float fwd+bwd s | ratio | pipeline s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(ROWS)
    rows = [(split_row(r["row"]), r) for r in results["rows"] if r["row"] != FLOAT_ROW and not r["row"].startswith(PTE)]
    for (bits, name), row in sorted(rows, key=lambda br: (CONFIGS.index(br[0][0]) if br[0][0] in CONFIGS else 9, order.index(br[0][1]))):
        st = row.get("stage_one")
        target = f"<= {TARGETS[bits]}x ({TARGETS[bits] * float_ppl:.1f})" if name == "stage1+mixed10" and bits in TARGETS else ""
        met = "" if not target else (" met" if row["ppl"] <= TARGETS[bits] * float_ppl else " **missed**")
        lr = f"{st['lr_rotation']:g}" if st else ""
        lines.append(f"| {bits} | {ROW_TITLES[name]} | {lr} | {row['ppl']:.3f} | {row['ppl'] / float_ppl:.2f} | {target}{met} | "
                     + (f"{st['seconds_per_step']:.2f} | {st['plain_float_forward_backward_seconds']:.2f} "
                        f"({st['float_forward_backward_with_rotations_seconds']:.2f}) | {st['step_ratio']:.2f}" if st else "- | - | -")
                     + f" | {row['seconds']:.0f} |")
    rss = [f"{r['row']} {r['peak_rss_mib']:.0f}" for r in results["rows"] if "peak_rss_mib" in r]
    if rss:
        lines += ["", "Peak RSS per row (each row ran in its own process), MiB: " + ", ".join(rss) + "."]
    pte = [r for r in results["rows"] if r["row"].startswith(PTE)]
    if pte:
        lines += ["", f"## `.pte` on the x86 HTP simulator ({s['pte_windows']} x {s['pte_seq_len']} tokens, SM8650)", "",
                  "| row | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | delegates | lower (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in pte:
            lines.append(f"| {row['row']} | {row['float']:.3f} | {row['fake_quant']:.3f} | {row['qdq']:.3f} | "
                         f"{row['pte']:.3f} | {100 * row['relative_gap']:.2f}% | {row['delegates']} | {row['lower_seconds']:.0f} |")
    return lines


BENCH = Bench(name="stage_one", script=__file__, title="Stage one and mixed precision: SmolLM2-135M-Instruct, Brown evaluation split",
              setting=SETTING, default_rows=DEFAULT_ROWS, config=row_config, measure=measure, body=body,
              description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
