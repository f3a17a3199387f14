#!/usr/bin/env python3
"""Static encodings (stage two only, no learning) on SmolLM2-135M-Instruct, Brown corpus.

Rows, each the STATIC recipe (quantnpu.pipeline) with:
- `BITS:none` / `BITS:hadamard`: fake-quant ppl for W-A-KV 8-8-8, 4-8-8, 4-4-8 without rotation and
  with random Hadamard R1/R2 (the QuaRot-style static baseline). Without rotation the A-bit linear
  inputs need explicit overrides (the default plan keeps unrotated activations at >= 8 bits); the
  override warning is expected;
- `BITS:hadamard:down16`: every down_proj input at 16 bits; `BITS:hadamard:p10`: the 10% most
  sensitive at 16 bits (AssignBitWidths);
- `float:none` / `float:hadamard`: the float graph after the float passes;
- `pte:BITS`: the rotated graph at `--pte-seq-len` tokens lowered to QNN HTP (SM8650) and run on the
  x86 HTP simulator, `.pte` ppl next to fake-quant ppl; where they differ by more than 2%, the
  per-tensor comparison (residual-stream tensors tapped out of the `.pte`) is written too.
One row per process through bench/harness.py (bench/results/static.{json,md}).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import RESULTS, Bench, Context, RowConfig, Setting, main, perplexity, pte_measurement  # noqa: E402

# Without rotation, the linears whose inputs R1/R2 would rotate get A bits only by override.
UNROTATED_A = tuple(f"*.{kind}.input" for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"))
CONFIGS = ("8-8-8", "4-8-8", "4-4-8")
ROTATIONS = ("none", "hadamard")
VARIANTS = {"": ((), 0.0), "down16": (("*.down_proj.input=16",), 0.0), "p10": ((), 0.1)}
PTE = "pte:"
DEFAULT_ROWS = ([f"float:{r}" for r in ROTATIONS] + [f"{b}:{r}" for b in CONFIGS for r in ROTATIONS]
                + ["8-8-8:hadamard:down16"] + [f"{b}:hadamard:p10" for b in CONFIGS] + [f"{PTE}8-8-8", f"{PTE}4-8-8"])
SETTING = Setting(seq_len=512, eval_windows=16, calib_windows=8, pte_seq_len=128, pte_windows=4)
LOCALIZE_ABOVE = 0.02


def parse_row(row: str) -> tuple[str, str, str]:
    """(bits, rotation, variant) of `BITS:ROTATION[:down16|:p10]`, `float:ROTATION` or `pte:BITS` (rotated)."""
    from quantnpu.errors import QuantNpuError
    from quantnpu.quantizers.bit_plan import BitPlan

    if row.startswith(PTE):
        bits, rotate, variant = row.removeprefix(PTE), "hadamard", ""
    else:
        parts = row.split(":")
        bits, rotate, variant = (parts + ["", ""])[:3] if 2 <= len(parts) <= 3 else ("", "", "?")
        if rotate not in ROTATIONS or variant not in VARIANTS:
            raise ValueError(f"row {row!r}: write BITS:ROTATION[:down16|:p10] (ROTATION none or hadamard), float:ROTATION or {PTE}BITS")
    if bits != "float":
        try:
            BitPlan.parse(bits)
        except QuantNpuError as error:
            raise ValueError(f"row {row!r}: {error}") from None
    return bits, rotate, variant


def row_config(row: str, setting: Setting) -> RowConfig:
    from quantnpu.pipeline import STATIC

    bits, rotate, variant = parse_row(row)
    if bits == "float":
        return RowConfig(None, recipe=STATIC.replace(rotate=rotate))
    overrides, fraction = VARIANTS[variant]
    a = int(bits.split("-")[1])
    if rotate == "none" and a < 8:
        overrides = overrides + tuple(f"{p}={a}" for p in UNROTATED_A)
    return RowConfig(bits, overrides, STATIC.replace(rotate=rotate, promote_fraction=fraction))


def fake_quant(config: RowConfig, context: Context, graph=None, calibration=None):
    """The row's fake-quant graph, HTP legalization deviations, init-rule warnings and seconds."""
    from quantnpu.passes import PlanBitWidths
    from quantnpu.pipeline import find_pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fq, passes, seconds = context.fake_quant(config, graph, calibration)
    deviations = [asdict(d) for d in find_pass(passes, PlanBitWidths).deviations]
    warned = sorted({str(w.message).split(":")[0] for w in caught if "against the rule" in str(w.message)})
    return fq, deviations, warned, seconds


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    from quantnpu.passes.integer_only import integer_only_violations

    bits, rotate, variant = parse_row(row)
    if bits == "float":
        return {"ppl": perplexity(context.float_graph(rotate=rotate), context.windows, f"float ({rotate})")}
    if not row.startswith(PTE):
        fq, deviations, warned, seconds = fake_quant(config, context)
        return {"ppl": perplexity(fq, context.windows, f"fake-quant {row}"), "deviations": deviations, "rule_warnings": len(warned),
                "seconds": round(seconds, 1)}
    graph, windows, calibration = context.pte_graph, context.pte_windows, context.pte_calibration
    float_ppl = perplexity(context.float_graph(graph), windows, "float")
    fq, _, _, _ = fake_quant(config, context, graph, calibration)
    quantized = context.converted(fq, config, calibration)
    measured = {"float": float_ppl, "integer_only_violations": integer_only_violations(quantized),
                **pte_measurement(fq, quantized, windows, bits)}
    if measured["relative_gap"] > LOCALIZE_ABOVE:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            measured["localization"] = localize(quantized, windows[:1], Path(work) / "taps.pte")
    return measured


def skeleton_et_rows() -> str:
    """ExecuTorch's QnnQuantizer fake-quant ppl from bench/results/skeleton.json (another setting)."""
    import json

    path = RESULTS / "skeleton.json"
    if not path.is_file():
        return ""
    skeleton = json.loads(path.read_text())
    s = skeleton["setting"]
    by_row = {r["row"]: r for r in skeleton["rows"]}
    cells = [f"{row.removeprefix('et-')} {r['ppl']:,.3f}" for row, r in by_row.items() if row.startswith("et-")]
    flt = by_row.get("float:graph")
    return (f"ExecuTorch QnnQuantizer fake-quant from bench/results/skeleton.md ({s['eval_windows']} x {s['seq_len']} windows, "
            + (f"where float is {flt['ppl']:.3f}; " if flt else "") + "compare ratios to float): " + ", ".join(cells))


def body(results: dict) -> list[str]:
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    flt = {r: by_row[f"float:{r}"]["ppl"] if f"float:{r}" in by_row else float("nan") for r in ROTATIONS}
    lines = [f"Fake-quant: {s['eval_windows']} x {s['seq_len']}-token windows; calibration {s['calib_windows']} x {s['seq_len']}. "
             f"Float ppl: unrotated {flt['none']:.3f}, rotated {flt['hadamard']:.3f}.", "",
             "| row | W-A-KV | rotation | overrides | down_proj inputs promoted by sensitivity | fake-quant ppl | HTP deviations | passes + calibrate (s) |",
             "|---|---|---|---|---|---|---|---|"]
    quantized = [(parse_row(r["row"]), r) for r in results["rows"] if not r["row"].startswith(("float:", PTE))]
    for (bits, rotate, variant), r in quantized:
        config = r.get("config") or {}
        overrides = " ".join(config.get("overrides", [])) or "-"
        fraction = (config.get("recipe") or {}).get("promote_fraction", 0.0)
        lines.append(f"| {r['row']} | {bits} | {rotate} | {overrides} | {fraction:.0%} | {r['ppl']:.3f} | {len(r['deviations'])} | {r['seconds']:.0f} |")
    et = skeleton_et_rows()
    if et:
        lines += ["", et]
    pte = [r for r in results["rows"] if r["row"].startswith(PTE)]
    if pte:
        lines += ["", f"## `.pte` on the x86 HTP simulator ({s['pte_windows']} x {s['pte_seq_len']} tokens, SM8650; calibration "
                  f"{s['calib_windows'] * s['seq_len'] // s['pte_seq_len']} x {s['pte_seq_len']})", "",
                  "| row | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | delegates | MiB | lower (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in pte:
            lines.append(f"| {row['row']} | {row['float']:.3f} | {row['fake_quant']:.3f} | {row.get('qdq', float('nan')):.3f} | {row['pte']:.3f} | "
                         f"{100 * row['relative_gap']:.2f}% | {row['delegates']} | {row['mib']:.1f} | {row['lower_seconds']:.0f} |")
        for row in pte:
            if row.get("localization"):
                lines += ["", f"Per-tensor comparison, {row['row']} (first window; steps of each tensor's grid): every tensor of "
                          "layer 0 in graph order, then the residual stream (the adds) of each later layer:", "", "```",
                          *row["localization"], "```"]
    first = next((r for (_, rotate, _), r in quantized if rotate == "hadamard"), None)
    if first is not None:
        from collections import Counter

        kinds = Counter(f"{d['role'].split('.')[-1]}: {d['tensor'].split(' %')[0]} {d['planned']} -> {d['assigned']} bits"
                        for d in first["deviations"])
        lines += ["", f"HTP legalization deviations ({first['row']}):", ""]
        lines += [f"- {k} ({n} layers)" for k, n in sorted(kinds.items())] or ["- none"]
    return lines


def localization_taps(quantized, hidden: int):
    """(every tap of layer 0 up to its MLP residual add, the residual adds of later layers)."""
    from quantnpu.runtime_harness.agreement import tap_candidates

    candidates = tap_candidates(quantized)
    residual = [n for n in candidates
                if str(n.args[0].args[0].target) == "aten.add.Tensor" and n.args[0].args[0].meta.get("val").shape[-1] == hidden]
    residual_sources = list(dict.fromkeys(n.args[0].args[0] for n in residual))
    layer0_end = candidates.index(next(n for n in residual if n.args[0].args[0] is residual_sources[1]))
    layer0 = candidates[:layer0_end + 1]
    return layer0, [n for n in residual if n not in layer0]


def localize(quantized, window, pte_path: Path) -> list[str]:
    """.pte against the Q/DQ graph: every quantized tensor (each edge) of layer 0, where the two first
    part, then the residual stream (the adds) of each later layer, to show how the difference grows."""
    from quantnpu.runtime_harness.agreement import run_taps_on_device

    layer0, later = localization_taps(quantized, hidden=576)
    results = run_taps_on_device(quantized, [n.name for n in layer0 + later], (window,), pte_path)
    pte_path.unlink(missing_ok=True)
    layer0_lines = [r.line() for r in results[:len(layer0)]]
    later_results = results[len(layer0):]
    first_per_tensor = {r.source: r for r in reversed(later_results)}  # each add is read by several edges
    return layer0_lines + ["..."] + [r.line() for r in later_results if first_per_tensor[r.source] is r]


BENCH = Bench(name="static", script=__file__, title="Static encodings (stage two, no learning): SmolLM2-135M-Instruct, "
              "Brown evaluation split", setting=SETTING, default_rows=DEFAULT_ROWS, config=row_config, measure=measure, body=body,
              description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
