#!/usr/bin/env python3
"""Static smoothing of the unrotated linear inputs and GPTQ rounding of the narrow weights on
SmolLM2-135M-Instruct, Brown corpus (16 x 512 evaluation windows, calibration 8 x 512).

Each row is `BITS:PROMOTION:SMOOTHING:ROUNDING[:stage1][:lead]`:
- PROMOTION `p0`, `p10` (the most sensitive 10% of down_proj inputs at 16 bits, ranked after
  smoothing) or `p100` (every down_proj input at 16 bits);
- SMOOTHING `off`, `fixed` (alpha 0.5) or `fixedA` (e.g. `fixed0.7`: one alpha for every layer),
  `search` (per layer, the alpha with the smallest quantized output error of that linear, with the
  producer's quantized output in the model; `search-linear`: the linear's input and weight only),
  `learn` (the search's factors as the start, learned in stage one);
- ROUNDING `nearest` or `gptq` (the weights of at most 4 bits; `gptq8`: the 8-bit ones too);
- `stage1`: stage one (selective, 32 steps, the defaults of `StageOneConfig`) before stage two;
- `lead`: SplitLeadingTokens (auto): MLPs whose first token is outsized get a 16-bit copy for it.
Rotated (random Hadamard R1/R2) in every row. Everything goes through `quantnpu.pipeline.pipeline`;
every row is computed here (`--fresh` starts a new table).
Results are written after every row (atomically) to bench/results/smoothing.{json,md}; with
`--pte ROW` that row's setting is also lowered at 128 tokens and run on the HTP simulator.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import json  # noqa: E402

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.lowering import qnn_sdk  # noqa: E402
from quantnpu.memory import release_freed_memory  # noqa: E402
from quantnpu.models.corpus import split_tokens, token_windows  # noqa: E402
from quantnpu.models.export import export_causal_lm  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes import LeadingTokenSplit, PassManager, SmoothingConfig, SmoothUnrotatedInputs, SplitLeadingTokens  # noqa: E402
from quantnpu.passes.assign_bit_widths import AssignBitWidths  # noqa: E402
from quantnpu.passes.learn_encodings import LearnEncodings, StageOneConfig  # noqa: E402
from quantnpu.passes.round_weights import RoundWeightsGptq  # noqa: E402
from quantnpu.pipeline import STATIC, fake_quant_end, find_pass, pipeline  # noqa: E402
from quantnpu.quantizers.bit_plan import BitPlan  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from quantnpu.runtime_harness.records import package_versions, peak_memory_mib  # noqa: E402
from static import converted, float_graph, pte_measurement, pte_setting  # noqa: E402

DEFAULT_RUNS = [
    "8-8-8:p0:fixed:nearest", "8-8-8:p0:search:nearest", "8-8-8:p0:fixed0.3:nearest", "8-8-8:p0:fixed0.7:nearest",
    "8-8-8:p10:fixed:nearest", "8-8-8:p10:search:nearest",
    "4-8-8:p10:off:gptq", "4-8-8:p10:fixed:nearest", "4-8-8:p10:search:nearest", "4-8-8:p10:fixed:gptq",
    "4-8-8:p10:search:gptq", "4-8-8:p0:search:gptq", "4-8-8:p100:off:gptq", "4-8-8:p100:search:gptq",
    "8-8-8:p0:search:gptq8", "8-8-8:p0:search:nearest:stage1", "4-8-8:p10:search:gptq:stage1",
    "8-8-8:p0:learn:nearest:stage1", "4-8-8:p10:learn:gptq:stage1",
]
ROW_FLAGS = ("stage1", "lead")
TARGETS = {("8-8-8", "p0"): 1.20, ("4-8-8", "p10"): 1.6, ("4-8-8", "p100"): 1.45}  # the issue's, x float


def parse_row(text: str) -> dict:
    parts = text.split(":")
    flags = parts[4:]
    if len(parts) < 4 or any(f not in ROW_FLAGS for f in flags) or len(set(flags)) != len(flags):
        raise ValueError(f"row {text!r}: write BITS:PROMOTION:SMOOTHING:ROUNDING[:stage1][:lead], e.g. 4-8-8:p10:search:gptq:lead")
    bits, promotion, smoothing, rounding = parts[:4]
    BitPlan.parse(bits)
    if promotion not in ("p0", "p10", "p100"):
        raise ValueError(f"row {text!r}: promotion is p0, p10 or p100")
    alpha, criterion = 0.5, "producer"
    mode = smoothing
    if smoothing == "search-linear":
        mode, criterion = "search", "linear"
    if smoothing.startswith("fixed") and smoothing != "fixed":
        mode, alpha = "fixed", float(smoothing.removeprefix("fixed"))
    SmoothingConfig(mode=mode, alpha=alpha, search_criterion=criterion)
    if rounding not in ("nearest", "gptq", "gptq8"):
        raise ValueError(f"row {text!r}: rounding is nearest, gptq or gptq8")
    if mode == "learn" and "stage1" not in flags:
        raise ValueError(f"row {text!r}: learned smoothing needs stage1")
    return {"row": text, "bits": bits, "promotion": promotion, "smoothing": smoothing, "mode": mode, "alpha": alpha, "criterion": criterion,
            "rounding": rounding, "stage_one": "stage1" in flags, "leading_split": "lead" in flags}


def passes_for(row: dict, calibration, stage_one: StageOneConfig) -> tuple[list, BitPlan]:
    overrides = ("*.down_proj.input=16",) if row["promotion"] == "p100" else ()
    plan = BitPlan.parse(row["bits"], overrides)
    passes = pipeline(
        plan, calibration, STATIC, progress=True, promote_fraction=0.1 if row["promotion"] == "p10" else 0.0,
        stage_one=stage_one if row["stage_one"] else None,
        smoothing=SmoothingConfig(mode=row["mode"], alpha=row["alpha"], search_criterion=row.get("criterion", "producer")),
        weight_rounding="nearest" if row["rounding"] == "nearest" else "gptq", gptq_bits=8 if row["rounding"] == "gptq8" else 4,
        leading_split=LeadingTokenSplit(mode="auto") if row.get("leading_split") else None)
    return passes, plan


def run_row(graph, row: dict, calibration, stage_one: StageOneConfig):
    passes, plan = passes_for(row, calibration, stage_one)
    start = time.perf_counter()
    fq = PassManager(passes, stop_after=fake_quant_end(passes), progress=True).run(copy.deepcopy(graph))
    facts: dict = {"seconds": round(time.perf_counter() - start, 1)}
    smoothing = find_pass(passes, SmoothUnrotatedInputs)
    if smoothing is not None:
        facts["smoothing"] = [{"role": s.role, "alpha": s.alpha, "min": float(s.factors.min()), "max": float(s.factors.max()),
                               "input_max_ratio": round(s.input_max_ratio, 2)} for s in smoothing.layers]
    promotion = find_pass(passes, AssignBitWidths)
    if promotion is not None:
        facts["promoted"] = [s.role for s in promotion.sensitivities if s.promoted]
    gptq = find_pass(passes, RoundWeightsGptq)
    if gptq is not None:
        facts["gptq"] = {"weights": len(gptq.layers), "kept": sum(r.kept for r in gptq.layers),
                         "mean_nearest_error": sum(r.nearest_error for r in gptq.layers) / max(len(gptq.layers), 1),
                         "mean_gptq_error": sum(min(r.gptq_error, r.nearest_error) for r in gptq.layers) / max(len(gptq.layers), 1)}
    learner = find_pass(passes, LearnEncodings)
    if learner is not None:
        facts["stage_one_run"] = learner.summary()
    split = find_pass(passes, SplitLeadingTokens)
    if split is not None:
        facts["split_layers"] = [s.layer for s in split.layers if s.split]
    facts["sixteen_bit_linear_inputs"] = sixteen_bit_linear_inputs(row, promotion)
    return fq, plan, facts


def sixteen_bit_linear_inputs(row: dict, promotion) -> int:
    """down_proj inputs read at 16 bits (lm_head's 16-bit input is the plan's for every row)."""
    if row["promotion"] == "p100":
        return 30
    return sum(s.promoted for s in promotion.sensitivities) if promotion is not None else 0


def write(results: dict, out: Path) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    float_ppl = results["float"]
    lines = [
        "# Smoothing and GPTQ rounding: SmolLM2-135M-Instruct, Brown evaluation split", "",
        "Commands (each run replaces the rows it names and keeps the others; in this order):", "",
        *[f"- `{command}`" for command in results.get("commands", [results["command"]])], "",
        f"Fake-quant ppl, {results['eval']['windows']} x {results['eval']['seq_len']}-token windows; calibration "
        f"{results['calibration']['windows']} x {results['calibration']['seq_len']}. Rotated (random Hadamard R1/R2) in every "
        f"row. Float ppl {float_ppl:.3f}. Promotion: p10 = the most sensitive 10% of down_proj inputs at 16 bits (ranked "
        "after smoothing), p100 = all of them. Smoothing: SmoothQuant factors `max|X_j|^a / max|W_:,j|^(1-a)` on "
        "down_proj's and o_proj's inputs, folded into up/down and v/o; `search` = per-layer alpha by the smoothed linear's "
        "quantized output error with its producer's quantized output (up_proj's 8-bit output, V) modelled; `search-linear` = "
        "the same without the producer; `learn` = search, then learned in stage one. GPTQ: the 4-bit weights (gptq8: every weight) re-rounded with the calibration inputs "
        "as the quantized graph sees them, same scales. 16-bit linear inputs: down_proj inputs (lm_head reads 16 bits "
        "in every plan, and gate_proj reads 16 bits since its output is 16-bit). Leading-token split (`lead`): the MLPs whose first "
        "token is over 2x larger than the rest somewhere get a copy for that token with the same plan and encodings of its own "
        "(SplitLeadingTokens, auto). "
        "Every RMSNorm is one `rms_norm` op (rows measured before that change, with norms quantized op by op, are in this "
        "file's git history). Pipeline seconds are wall-clock per row; rows run while another job shared the 2 cores read high.", "",
        "| W-A-KV | promotion | smoothing | rounding | stage one | leading-token split (layers) | 16-bit linear inputs | ppl | x float | target | pipeline s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = results["rows"]
    for row in sorted(rows, key=lambda r: (r["bits"], r["promotion"], r["stage_one"], r.get("leading_split", False), r["smoothing"], r["rounding"])):
        target = TARGETS.get((row["bits"], row["promotion"]))
        target_text = "" if target is None else f"<= {target}x ({target * float_ppl:.1f})" + (
            " met" if row["ppl"] <= target * float_ppl else " **missed**")
        sixteen = row.get("sixteen_bit_linear_inputs", {"p0": 0, "p10": 3, "p100": 30}[row["promotion"]])
        split = ", ".join(str(layer) for layer in row.get("split_layers", [])) if row.get("leading_split") else "no"
        lines.append(f"| {row['bits']} | {row['promotion']} | {row['smoothing']} | {row['rounding']} | {'yes' if row['stage_one'] else 'no'} | "
                     f"{split} | {sixteen} | {row['ppl']:.3f} | {row['ppl'] / float_ppl:.2f} | {target_text} | {row['seconds']:.0f} |")
    lines += ["", f"Peak RSS of the run: {results.get('peak_rss_mib', float('nan')):.0f} MiB.", ""]
    searched = [r for r in results["rows"] if r["smoothing"].startswith("search") and r.get("smoothing_layers")]
    if searched:
        lines += ["## Alphas the search chose (down_proj / o_proj, layer order)", ""]
        for r in searched:
            downs = [s["alpha"] for s in r["smoothing_layers"] if s["role"].endswith("down_proj")]
            outs = [s["alpha"] for s in r["smoothing_layers"] if s["role"].endswith("o_proj")]
            lines.append(f"- {r['row']}: down {' '.join(f'{a:.1f}' for a in downs)}; o {' '.join(f'{a:.1f}' for a in outs)}")
        lines.append("")
    if results.get("pte"):
        lines += [f"## `.pte` on the x86 HTP simulator ({results['pte_eval']['windows']} x {results['pte_eval']['seq_len']} tokens, SM8650)", "",
                  "| row | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | delegates | lower (s) |", "|---|---|---|---|---|---|---|---|"]
        for row in results["pte"]:
            lines.append(f"| {row['row']} | {row['float']:.3f} | {row['fake_quant']:.3f} | {row['qdq']:.3f} | {row['pte']:.3f} | "
                         f"{100 * row['relative_gap']:.2f}% | {row['delegates']} | {row['lower_seconds']:.0f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, metavar="ROW")
    parser.add_argument("--pte", nargs="*", default=[], metavar="ROW", help="rows also lowered and run on the HTP simulator")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--pte-seq-len", type=int, default=128)
    parser.add_argument("--pte-windows", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "smoothing"))
    parser.add_argument("--fresh", action="store_true", help="start a new table: drop the rows of earlier runs")
    args = parser.parse_args()
    try:
        runs = [parse_row(r) for r in args.runs]
        pte_runs = [parse_row(r) for r in args.pte]
    except (ValueError, Exception) as error:
        parser.error(str(error))
    out = Path(args.out)
    stage_one = StageOneConfig(steps=args.steps)
    results: dict = {"command": "python bench/smoothing.py " + shlex.join(sys.argv[1:]),
                     "eval": {"windows": args.eval_windows, "seq_len": args.seq_len},
                     "calibration": {"windows": args.calib_windows, "seq_len": args.seq_len},
                     "stage_one_config": asdict(stage_one), "torch_threads": torch.get_num_threads(),
                     "float": float("nan"), "rows": [], "pte": [], "versions": package_versions()}
    previous = out.with_suffix(".json")
    if previous.is_file() and not args.fresh:  # rows of an earlier run in the same setting are kept unless rerun
        old = json.loads(previous.read_text())
        if (old["eval"], old["calibration"]) == (results["eval"], results["calibration"]):
            rerun = {r["row"] for r in runs}
            results["rows"] = [r for r in old["rows"] if r["row"] not in rerun]
            results["commands"] = old.get("commands", [old["command"]]) + [results["command"]]
            results["pte"] = [r for r in old.get("pte", []) if r["row"] not in {p["row"] for p in pte_runs}]
            if "pte_eval" in old:
                results["pte_eval"] = old["pte_eval"]
    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    model, tokenizer = load_smollm2()
    eval_tokens, calib_tokens = split_tokens(tokenizer, "evaluation"), split_tokens(tokenizer, "calibration")
    began = time.perf_counter()
    windows = token_windows(eval_tokens, args.seq_len, args.eval_windows)
    calibration = list(token_windows(calib_tokens, args.seq_len, args.calib_windows).unsqueeze(1))
    exported = export_causal_lm(model, args.seq_len).module()
    results["float"] = perplexity(float_graph(exported), windows, "float (rotated)").ppl
    for row in runs:
        fq, plan, facts = run_row(exported, row, calibration, stage_one)
        ppl = perplexity(fq, windows, f"fake-quant {row['row']}").ppl
        smoothing_layers = facts.pop("smoothing", None)
        results["rows"].append({**row, "ppl": ppl, **facts, "smoothing_layers": smoothing_layers, "peak_rss_mib": peak_memory_mib()})
        print(f"{row['row']}: ppl {ppl:.3f} ({ppl / results['float']:.2f}x float)", flush=True)
        del fq
        results["peak_rss_mib"] = peak_memory_mib()
        write(results, out)
        release_freed_memory()
    if pte_runs:
        pte_graph, pte_windows, pte_calibration = pte_setting(model, tokenizer, args.pte_seq_len, args.pte_windows,
                                                              args.calib_windows * args.seq_len // args.pte_seq_len)
        results["pte_eval"] = {"windows": args.pte_windows, "seq_len": args.pte_seq_len, "soc": "SM8650", "calibration_windows": len(pte_calibration)}
        pte_float = perplexity(float_graph(pte_graph), pte_windows, "float").ppl
        for row in pte_runs:
            fq, plan, facts = run_row(pte_graph, row, pte_calibration, stage_one)
            facts.pop("smoothing", None)
            quantized = converted(fq, plan, pte_calibration)
            name = row["row"].replace(":", "_").replace(".", "")
            measured = {**row, "float": pte_float, **facts, **pte_measurement(fq, quantized, pte_windows, out.parent / f"smoothing_{name}.pte", row["row"])}
            results["pte"].append(measured)
            print(f"{row['row']}: float {pte_float:.3f} fake-quant {measured['fake_quant']:.3f} .pte {measured['pte']:.3f}", flush=True)
            del fq, quantized
            write(results, out)
            release_freed_memory()
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    results["peak_rss_mib"] = peak_memory_mib()
    write(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
