#!/usr/bin/env python3
"""The paper's Fig. 4 on SmolLM2-135M-Instruct: fake-quant perplexity against the fraction of
down_proj inputs promoted to 16 bits by sensitivity (AssignBitWidths), {0, 10, 20, 50, 100}%.

Rows `METHOD:BITS:FRACTION` with METHOD in bench/table1.py's notation: `quarot` (random Hadamard
R1/R2, static encodings) or `quantnpu-paper` (the paper's method: stage one, then static; the paper
promotes before optimizing). 16 x 512-token Brown evaluation windows, calibration 8 x 512 (the
setting of bench/results/stage_one.md). Each row runs in its own process (memory stays bounded) and
is merged into bench/results/fig4.{json,md,png} (a rerun's rows replace their own); a row that
bench/table1.py or bench/ablation.py already measured with the same pipeline arguments in this setting
(quantnpu-paper at 10% is Table 1's p10, at 0% the ablation's +selective) is taken from there, marked.
Everything goes through `quantnpu.pipeline.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from table1 import measure_in_child, measured_elsewhere, merge_row, open_results, row_setup  # noqa: E402  (bench/ is the script's directory)

FRACTIONS = (0.0, 0.1, 0.2, 0.5, 1.0)
METHODS = ("quarot", "quantnpu-paper")
LABELS = {"quarot": "rotated, static", "quantnpu-paper": "the paper's method (stage one + static)"}


def parse_row(row: str) -> tuple[str, str, float]:
    parts = row.split(":")
    try:
        method, bits, fraction = parts[0], parts[1], float(parts[2])
    except (IndexError, ValueError):
        method, bits, fraction = "", "", -1.0
    if method not in METHODS or not 0.0 <= fraction <= 1.0 or len(parts) != 3:
        raise ValueError(f"row {row!r}: write METHOD:BITS:FRACTION with METHOD one of {', '.join(METHODS)} and 0 <= FRACTION <= 1")
    return method, bits, fraction


def fig4_setup(row: str, calibration, steps: int) -> dict:
    """The pipeline arguments of a row: Table 1's row of the method with the promoted fraction set
    (100% is AssignBitWidths promoting every input, not Table 1's p100 override: the two are checked
    against each other rather than assumed equal)."""
    method, bits, fraction = parse_row(row)
    return {**row_setup(f"{method}:{bits}:p10", calibration, steps), "promote_fraction": fraction}


def reuse_sources() -> list:
    from ablation import ablation_setup

    return [(ROOT / "bench" / "results" / "table1.json", row_setup), (ROOT / "bench" / "results" / "ablation.json", ablation_setup)]


def measure(row: str, seq_len: int, eval_windows: int, calib_windows: int, steps: int) -> dict:
    from quantnpu.memory import release_freed_memory
    from quantnpu.models.corpus import split_tokens, token_windows
    from quantnpu.models.export import export_causal_lm
    from quantnpu.models.smollm2 import load_smollm2
    from quantnpu.passes import AssignBitWidths
    from quantnpu.pipeline import find_pass
    from quantnpu.runtime_harness.perplexity import perplexity
    from quantnpu.runtime_harness.records import peak_memory_mib
    from static import float_graph
    from table1 import fake_quant

    method, bits, fraction = parse_row(row)

    model, tokenizer = load_smollm2()
    windows = token_windows(split_tokens(tokenizer, "evaluation"), seq_len, eval_windows)
    calibration = list(token_windows(split_tokens(tokenizer, "calibration"), seq_len, calib_windows).unsqueeze(1))
    graph = export_causal_lm(model, seq_len).module()
    float_ppl = perplexity(float_graph(graph), windows, "float").ppl
    release_freed_memory()
    fq, passes, seconds = fake_quant(graph, fig4_setup(row, calibration, steps), calibration)
    assign = find_pass(passes, AssignBitWidths)
    promoted = [s.role for s in assign.sensitivities if s.promoted] if assign is not None else []
    ppl = perplexity(fq, windows, f"fake-quant {row}").ppl
    return {"row": row, "method": method, "bits": bits, "fraction": fraction, "ppl": ppl, "float": float_ppl,
            "promoted": promoted, "seconds": round(seconds, 1), "peak_rss_mib": peak_memory_mib()}


def write(results: dict, out: Path) -> None:
    from quantnpu.fileio import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    rows = sorted(results["rows"], key=lambda r: (METHODS.index(r["method"]), r["bits"], r["fraction"]))
    float_ppl = next((r["float"] for r in rows if "float" in r), None)
    s = results["setting"]
    lines = ["# Fig. 4: perplexity against the fraction of down_proj inputs at 16 bits (SmolLM2-135M-Instruct)", "",
             "Commands (one row per process, rows of a rerun replace their own):", "", *[f"    {c}" for c in results["commands"]], "",
             "The most sensitive down_proj inputs (8-bit Max-Min error on the calibration set) promoted first; `quarot`: random "
             "Hadamard R1/R2, static encodings; `quantnpu-paper`: the paper's method (promotion, then stage one, "
             f"{s['steps']} steps, then static). Fake-quant ppl over {s['eval_windows']} x {s['seq_len']} Brown evaluation tokens, "
             f"calibration {s['calib_windows']} x {s['seq_len']}.", "",
             "![ppl against promoted fraction](fig4.png)", "",
             "| method | W-A-KV | promoted | down_proj inputs at 16 bits | ppl | x float | pipeline s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "promoted" not in r:  # taken from another table, which does not record them
            layers = ("none " if r["fraction"] == 0 else "") + f"(measured as {r['same_as']})"
        else:
            layers = ", ".join(p.split(".")[1] for p in r["promoted"]) if 0 < len(r["promoted"]) < 30 else ("all" if r["promoted"] else "none")
        ratio = f"{r['ppl'] / float_ppl:.2f}" if float_ppl else ""
        lines.append(f"| {r['method']} | {r['bits']} | {r['fraction']:.0%} | {layers} | {r['ppl']:.3f} | {ratio} | {r['seconds']:.0f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for method, bits in sorted({(r["method"], r["bits"]) for r in rows}, key=lambda k: (METHODS.index(k[0]), k[1])):
        mine = [r for r in rows if (r["method"], r["bits"]) == (method, bits)]
        axis.plot([100 * r["fraction"] for r in mine], [r["ppl"] for r in mine], marker="o", label=f"{bits}, {LABELS[method]}")
    if float_ppl:
        axis.axhline(float_ppl, color="gray", linestyle="--", label="float")
    axis.set_xlabel("down_proj inputs promoted to 16 bits (%)")
    axis.set_ylabel(f"perplexity ({s['eval_windows']} x {s['seq_len']} Brown tokens)")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("SmolLM2-135M-Instruct, fake-quant")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[f"{m}:4-8-8:{f:g}" for m in METHODS for f in FRACTIONS])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32, help="stage one's steps (quantnpu-paper rows)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fig4"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's row
    args = parser.parse_args()
    out = Path(args.out)
    setting = {"seq_len": args.seq_len, "eval_windows": args.eval_windows, "calib_windows": args.calib_windows, "steps": args.steps}
    if args.one:
        print(json.dumps(measure(args.one, args.seq_len, args.eval_windows, args.calib_windows, args.steps)))
        return 0
    for row in args.rows:
        try:
            parse_row(row)
        except ValueError as error:
            parser.error(str(error))
    results = open_results(out.with_suffix(".json"), setting, "python bench/fig4.py " + shlex.join(sys.argv[1:]))
    options = ["--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows),
               "--steps", str(args.steps)]
    for row in args.rows:
        measured = measured_elsewhere(row, fig4_setup, setting, args.steps, reuse_sources())
        if measured is not None:
            method, bits, fraction = parse_row(row)
            merge_row(results, {**measured, "method": method, "bits": bits, "fraction": fraction}, out, write,
                      f" (measured as {measured['same_as']})")
            continue
        measured = measure_in_child(__file__, row, options)
        if measured is None:
            return 1
        merge_row(results, measured, out, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
