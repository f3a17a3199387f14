#!/usr/bin/env python3
"""What ships is what was measured: the `.pte` on the HTP simulator against the fake-quant graph.

For each config (a row in bench/smoothing.py's notation; default: the shipped settings, stage one +
10% + smoothing search + GPTQ + the leading-token split, at 8-8-8 and 4-8-8), on SmolLM2-135M at
128 tokens: per evaluation window, the ppl of the float graph, the fake-quant graph, the converted
Q/DQ graph, the `.pte` on the x86 HTP simulator, and of one hypothesis model (the Q/DQ graph without
the 8-bit rounding of tensors that are only read re-quantized to 16 bits: what HTP would compute if
its optimizer merged those Converts into their producer). The sign of each window's `.pte` - fake-quant
difference separates noise (mixed signs) from bias (one sign). Then the agreement check on the
first window: every quantized tensor of the `.pte` against its op recomputed in the Q/DQ graph from
the device's own inputs (quantnpu.runtime_harness.agreement), per layer.

Everything goes through `quantnpu.pipeline.pipeline` (via bench/smoothing.py's row builder).
One row per process (`--merge` keeps the other rows of the results file).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.graph.ops import quantize_kind  # noqa: E402
from quantnpu.lowering import qnn_sdk  # noqa: E402
from quantnpu.lowering.lower import lower_to_qnn  # noqa: E402
from quantnpu.memory import release_freed_memory  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes.learn_encodings import StageOneConfig  # noqa: E402
from quantnpu.runtime_harness.agreement import bits_of as _bits, check_agreement, is_move as _is_move  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from quantnpu.runtime_harness.pte import PteModel  # noqa: E402
from quantnpu.runtime_harness.records import package_versions, peak_memory_mib  # noqa: E402
from smoothing import parse_row, run_row  # noqa: E402  (bench/ is the script's directory)
from static import converted, float_graph, pte_setting  # noqa: E402

DEFAULT_ROWS = ["8-8-8:p10:search:gptq:stage1:lead", "4-8-8:p10:search:gptq:stage1:lead"]

def without_narrow_rounding_before_widening(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """Hypothesis 1's model: a copy of the Q/DQ graph in which each narrow tensor whose only reader
    re-quantizes it to a wider grid (through ops that only move values) is written on that wider grid
    directly, i.e. its narrow rounding is gone. Returns (graph, tensors changed)."""
    out = copy.deepcopy(gm)
    changed = 0
    for wide in list(out.graph.nodes):
        if quantize_kind(wide) != "quantize" or "per_tensor" not in str(wide.target):
            continue
        dequantize = wide.args[0]
        if not (isinstance(dequantize, torch.fx.Node) and quantize_kind(dequantize) == "dequantize"):
            continue
        narrow = dequantize.args[0]
        if quantize_kind(narrow) != "quantize" or _bits(narrow) >= _bits(wide) or len(dequantize.users) != 1:
            continue
        chain, node = [dequantize, narrow], narrow.args[0]
        while _is_move(node) and len(node.users) == 1:
            before = node.args[0]
            if quantize_kind(before) != "dequantize" or len(before.users) != 1:
                break
            quantize = before.args[0]
            if tuple(quantize.args[1:]) != tuple(narrow.args[1:]) or len(quantize.users) != 1:
                break
            chain += [before, quantize]
            node = quantize.args[0]
        if any(len(n.users) != 1 for n in chain) or quantize_kind(node) is not None:
            continue
        for n in chain:
            n.args = (n.args[0], *wide.args[1:])
        changed += 1
    out.recompile()
    return out, changed


def window_ppls(forward, windows: torch.Tensor, label: str) -> list[float]:
    return [perplexity(forward, windows[i:i + 1], f"{label} {i + 1}/{len(windows)}", progress=False).ppl for i in range(len(windows))]


def overall(ppls: list[float]) -> float:
    """Windows have equal length: the overall ppl is the geometric mean of the windows'."""
    return math.exp(sum(math.log(p) for p in ppls) / len(ppls))


def agreement_result(quantized, window: torch.Tensor, work: Path, name: str, layers: set[int] | None) -> dict:
    """The agreement check on one window (see quantnpu.runtime_harness.agreement), summarized per bit
    width and per layer, with every tensor over the tolerance named."""
    start = time.perf_counter()
    report = check_agreement(quantized, (window,), work / f"fidelity_{name}.taps.pte", layers=layers)
    by_bits: dict = {}
    for t in report.tensors:
        entry = by_bits.setdefault(t.bits, {"tensors": 0, "local_max": 0, "local_mean": 0.0, "drift_max": 0})
        entry["tensors"] += 1
        entry["local_max"] = max(entry["local_max"], t.local_max)
        entry["local_mean"] += t.local_mean
        entry["drift_max"] = max(entry["drift_max"], t.drift_max)
    for entry in by_bits.values():
        entry["local_mean"] /= entry["tensors"]
    return {"layers": sorted(layers) if layers else "all", "ok": report.ok, "summary": report.summary(),
            "per_layer": report.per_layer(), "failures": [t.line() for t in report.failures()],
            "unobserved": len(report.unobserved), "by_bits": by_bits, "seconds": round(time.perf_counter() - start, 1)}


def measure(row: dict, graph, windows, calibration, stage_one: StageOneConfig, work: Path, agreement: bool,
            agreement_layers: set[int] | None, old: dict | None = None) -> dict:
    fq, plan, facts = run_row(graph, row, calibration, stage_one)
    quantized = converted(fq, plan, calibration)
    name = row["row"].replace(":", "_")
    if old is not None:  # --agreement-only: the row's ppl stay, its agreement check is redone
        return {**old, "agreement": agreement_result(quantized, windows[:1], work, name, agreement_layers)}
    hypothesis, widened = without_narrow_rounding_before_widening(quantized)
    lowered = lower_to_qnn(quantized, (windows[:1],), work / f"fidelity_{name}.pte")
    pte = PteModel(lowered.pte_path)
    per_window = {
        "float": window_ppls(float_graph(graph), windows, "float"),
        "fake_quant": window_ppls(fq, windows, "fake-quant"),
        "qdq": window_ppls(quantized, windows, "Q/DQ"),
        "pte": window_ppls(pte, windows, ".pte"),
        "hypothesis_no_narrow_rounding": window_ppls(hypothesis, windows, "hypothesis"),
    }
    del pte
    lowered.pte_path.unlink(missing_ok=True)
    result = {**row, **facts, "per_window": per_window, **{k: overall(v) for k, v in per_window.items()},
              "widened_tensors": widened, "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
              "mib": lowered.size_bytes / 2**20, "lower_seconds": round(lowered.seconds, 1)}
    result["relative_gap"] = (result["pte"] - result["fake_quant"]) / result["fake_quant"]
    if agreement:
        result["agreement"] = agreement_result(quantized, windows[:1], work, name, agreement_layers)
    return result


def write(results: dict, out: Path) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    ev = results["eval"]
    lines = ["# Fidelity: the `.pte` on the HTP simulator against the fake-quant graph (SmolLM2-135M-Instruct)", "",
             "Commands (one row per process):", "", *[f"    {c}" for c in results["commands"]], "",
             f"{ev['windows']} x {ev['seq_len']}-token windows of Brown's evaluation split, calibration {ev['calibration_windows']} x "
             f"{ev['seq_len']}, SoC {ev['soc']}. Rows in bench/smoothing.py's notation (bits : promotion : smoothing : rounding "
             "[: stage one] [: leading-token split]).", "",
             "| row | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | windows .pte < / > fake-quant | hypothesis: no narrow rounding before a widening | delegates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        signs = [p - f for p, f in zip(r["per_window"]["pte"], r["per_window"]["fake_quant"])]
        lines.append(f"| {r['row']} | {r['float']:.3f} | {r['fake_quant']:.3f} | {r['qdq']:.3f} | {r['pte']:.3f} | "
                     f"{100 * r['relative_gap']:+.2f}% | {sum(s < 0 for s in signs)} / {sum(s > 0 for s in signs)} | "
                     f"{r['hypothesis_no_narrow_rounding']:.3f} ({r['widened_tensors']} tensors) | {r['delegates']} |")
    for r in results["rows"]:
        w = r["per_window"]
        lines += ["", f"## {r['row']}: per window", "",
                  "| window | float | fake-quant | Q/DQ | .pte | .pte - fake-quant | sign | hypothesis |", "|---|---|---|---|---|---|---|---|"]
        for i in range(len(w["pte"])):
            d = w["pte"][i] - w["fake_quant"][i]
            lines.append(f"| {i} | {w['float'][i]:.3f} | {w['fake_quant'][i]:.3f} | {w['qdq'][i]:.3f} | {w['pte'][i]:.3f} | "
                         f"{d:+.3f} ({100 * d / w['fake_quant'][i]:+.2f}%) | {'-' if d < 0 else '+'} | {w['hypothesis_no_narrow_rounding'][i]:.3f} |")
        if "agreement" in r:
            a = r["agreement"]
            lines += ["", f"Agreement check on window 0, tensors of layers {a['layers']} and the model's own ({a['seconds']:.0f} s): {a['summary']}", "",
                      "| bits | tensors | largest local difference (steps) | mean local difference (steps) | largest drift from the Q/DQ graph run alone (steps) |",
                      "|---|---|---|---|---|"]
            for bits, e in sorted(a["by_bits"].items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {bits} | {e['tensors']} | {e['local_max']} | {e['local_mean']:.4f} | {e['drift_max']} |")
            lines += ["", "Per layer, the tensor with the largest local difference:", "", "```", a["per_layer"], "```"]
            if a.get("failures"):
                lines += ["", "Every tensor over the tolerance:", "", "```", *a["failures"], "```"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, metavar="ROW")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--no-agreement", action="store_true", help="skip the per-tensor agreement check")
    parser.add_argument("--agreement-layers", type=int, nargs="*", default=[0, 1, 11, 27, 28, 29],
                        help="decoder layers whose tensors the agreement check taps (none given: all)")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of the existing results file")
    parser.add_argument("--agreement-only", action="store_true",
                        help="redo only the agreement check of rows already in the results file (their ppl are kept)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity"))
    args = parser.parse_args()
    try:
        rows = [parse_row(r) for r in args.rows]
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    command = "python bench/fidelity.py " + shlex.join(sys.argv[1:])
    results = {"commands": [command], "eval": {"windows": args.windows, "seq_len": args.seq_len, "calibration_windows": args.calib_windows,
                                              "soc": "SM8650"}, "rows": [], "versions": package_versions()}
    previous: dict = {}
    if (args.merge or args.agreement_only) and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["eval"] == results["eval"]:
            previous = {r["row"]: r for r in old["rows"]}
            results["rows"] = [r for r in old["rows"] if r["row"] not in {row["row"] for row in rows}]
            results["commands"] = old["commands"] + [command]
    if args.agreement_only and any(row["row"] not in previous for row in rows):
        parser.error(f"--agreement-only: {out.with_suffix('.json')} has no such row with this setting")
    if args.agreement_only and args.no_agreement:
        parser.error("--agreement-only and --no-agreement exclude each other")
    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    model, tokenizer = load_smollm2()
    graph, windows, calibration = pte_setting(model, tokenizer, args.seq_len, args.windows, args.calib_windows)
    stage_one = StageOneConfig(steps=args.steps)
    for row in rows:
        start = time.perf_counter()
        measured = measure(row, graph, windows, calibration, stage_one, out.parent, not args.no_agreement,
                           set(args.agreement_layers) if args.agreement_layers else None,
                           previous[row["row"]] if args.agreement_only else None)
        if not args.agreement_only:
            measured["total_seconds"] = round(time.perf_counter() - start, 1)
            measured["peak_rss_mib"] = peak_memory_mib()
        results["rows"].append(measured)
        order = list(previous)  # a rerun row keeps its place
        results["rows"].sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
        print(f"{row['row']}: fake-quant {measured['fake_quant']:.3f} .pte {measured['pte']:.3f} ({100 * measured['relative_gap']:+.2f}%)", flush=True)
        write(results, out)
        release_freed_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
