#!/usr/bin/env python3
"""Static encodings (stage two only, no learning) on SmolLM2-135M-Instruct, Brown corpus.

1. Fake-quant ppl for W-A-KV 8-8-8, 4-8-8, 4-4-8, each without rotation and with random Hadamard
   R1/R2 (the QuaRot-style static baseline), plus rotated 8-8-8 with every down_proj input at 16
   bits. Without rotation the A-bit linear inputs need explicit overrides (the default plan keeps
   unrotated activations at >= 8 bits); the override warning is expected.
2. The rotated 8-8-8 and 4-8-8 graphs at a shorter length lowered to QNN HTP (SM8650) and run on
   the x86 HTP simulator: `.pte` ppl next to fake-quant ppl. Where they differ by more than 2%,
   the per-layer comparison (residual-stream tensors tapped out of the `.pte`) is written too.

Results are written after every row (atomically) to bench/results/static.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.memory import release_freed_memory  # noqa: E402
from quantnpu.lowering import qnn_sdk  # noqa: E402
from quantnpu.lowering.lower import lower_to_qnn  # noqa: E402
from quantnpu.models.corpus import split_tokens, token_windows  # noqa: E402
from quantnpu.models.export import export_causal_lm  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes import PassManager, PlanBitWidths  # noqa: E402
from quantnpu.passes.integer_only import integer_only_violations  # noqa: E402
from quantnpu.quantizers.bit_plan import BitPlan  # noqa: E402
from quantnpu.pipeline import STATIC, find_pass, pipeline  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from quantnpu.runtime_harness.pte import PteModel  # noqa: E402
from quantnpu.runtime_harness.records import package_versions, peak_memory_mib  # noqa: E402

# Without rotation, the linears whose inputs R1/R2 would rotate get A bits only by override.
UNROTATED_A = tuple(f"*.{kind}.input" for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"))
# (W-A-KV, rotation, overrides, fraction of down_proj inputs promoted to 16 bits by sensitivity)
ROWS = [
    ("8-8-8", "none", (), 0.0), ("8-8-8", "hadamard", (), 0.0),
    ("4-8-8", "none", (), 0.0), ("4-8-8", "hadamard", (), 0.0),
    ("4-4-8", "none", tuple(f"{p}=4" for p in UNROTATED_A), 0.0), ("4-4-8", "hadamard", (), 0.0),
    ("8-8-8", "hadamard", ("*.down_proj.input=16",), 0.0),
    ("8-8-8", "hadamard", (), 0.1), ("4-8-8", "hadamard", (), 0.1), ("4-4-8", "hadamard", (), 0.1),
]
ET_SKELETON = {"8a8w": 134999.8, "16a8w": 51.720, "16a4w": 148.748, "16a4w_block": 75.041}


def fake_quant(graph, plan, calibration, rotate: str = "hadamard", promote_fraction: float = 0.0):
    """The pipeline up to StaticCalibration on a copy of the exported `graph`: (fake-quant graph,
    HTP legalization deviations, init-rule warnings, seconds). The float passes are verified."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passes = pipeline(plan, calibration, STATIC, rotate=rotate, progress=True, promote_fraction=promote_fraction)
        fq = PassManager(passes, stop_after="StaticCalibration").run(copy.deepcopy(graph))
    deviations = [asdict(d) for d in find_pass(passes, PlanBitWidths).deviations]
    warned = sorted({str(w.message).split(":")[0] for w in caught if "against the rule" in str(w.message)})
    return fq, deviations, warned, time.perf_counter() - start


def converted(fq, plan, calibration, rotate: str = "hadamard"):
    """The rest of the pipeline on a fake-quant graph from `fake_quant`: the integer-only Q/DQ graph."""
    return PassManager(pipeline(plan, calibration, STATIC, rotate=rotate)).run(copy.deepcopy(fq), start_after="StaticCalibration")


def float_graph(graph, rotate: str = "hadamard"):
    """The float passes (verified) on a copy of the exported `graph`."""
    return PassManager(pipeline(rotate=rotate)).run(copy.deepcopy(graph))


def pte_setting(model, tokenizer, seq_len: int = 128, eval_windows: int = 4, calib_windows: int = 32):
    """The `.pte` rows' setting (also used by rounding_noise.py and narrow_edges.py, so their numbers
    sit beside the `.pte` ppl): the exported graph at `seq_len`, its eval windows, calibration batches."""
    gm = export_causal_lm(model, seq_len).module()
    windows = token_windows(split_tokens(tokenizer, "evaluation"), seq_len, eval_windows)
    calibration = list(token_windows(split_tokens(tokenizer, "calibration"), seq_len, calib_windows).unsqueeze(1))
    return gm, windows, calibration


def pte_measurement(fq, quantized, windows, pte_path: Path, label: str) -> dict:
    """Lower the Q/DQ graph to `pte_path` and run the fake-quant graph, the Q/DQ graph (what lowering
    consumes) and the `.pte` on the HTP simulator over `windows`: their ppl and the lowering facts.
    The `.pte` (100+ MiB) is deleted afterwards; the numbers are what is kept."""
    lowered = lower_to_qnn(quantized, (windows[:1],), pte_path)
    fq_ppl = perplexity(fq, windows, f"fake-quant {label}").ppl
    qdq_ppl = perplexity(quantized, windows, f"Q/DQ graph {label}").ppl
    pte_ppl = perplexity(PteModel(lowered.pte_path), windows, f".pte {label}").ppl
    pte_path.unlink(missing_ok=True)
    return {"fake_quant": fq_ppl, "qdq": qdq_ppl, "pte": pte_ppl, "relative_gap": abs(pte_ppl - fq_ppl) / fq_ppl,
            "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
            "mib": lowered.size_bytes / 2**20, "lower_seconds": round(lowered.seconds, 1)}


def write(results: dict, out: Path) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    lines = [
        "# Static encodings (stage two, no learning): SmolLM2-135M-Instruct, Brown evaluation split", "",
        f"Command: `{results['command']}`", "",
        f"Fake-quant: {results['eval']['windows']} x {results['eval']['seq_len']}-token windows; "
        f"calibration {results['calibration']['windows']} x {results['calibration']['seq_len']}. "
        f"Float ppl: unrotated {results['float'].get('none', float('nan')):.3f}, rotated {results['float'].get('hadamard', float('nan')):.3f}.", "",
        "| W-A-KV | rotation | overrides | down_proj inputs promoted by sensitivity | fake-quant ppl | HTP deviations | passes + calibrate (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['bits']} | {row['rotate']} | {' '.join(row['overrides']) or '-'} | "
                     f"{row.get('promote_fraction', 0.0):.0%} | {row['ppl']:.3f} | {len(row['deviations'])} | {row['seconds']:.0f} |")
    lines += ["", "ExecuTorch QnnQuantizer fake-quant from the skeleton issue (40 x 512 windows, where float is 49.621; "
              "compare ratios to float): " + ", ".join(f"{k} {v:,.3f}" for k, v in ET_SKELETON.items()), ""]
    if results.get("pte"):
        lines += [f"## `.pte` on the x86 HTP simulator ({results['pte_eval']['windows']} x {results['pte_eval']['seq_len']} tokens, SM8650)", "",
                  "| W-A-KV | rotation | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | delegates | MiB | lower (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["pte"]:
            lines.append(f"| {row['bits']} | {row['rotate']} | {row['float']:.3f} | {row['fake_quant']:.3f} | {row.get('qdq', float('nan')):.3f} | {row['pte']:.3f} | "
                         f"{100 * row['relative_gap']:.2f}% | {row['delegates']} | {row['mib']:.1f} | {row['lower_seconds']:.0f} |")
        for row in results["pte"]:
            if row.get("localization"):
                lines += ["", f"Per-tensor comparison, {row['bits']} (first window; steps of each tensor's grid): every tensor of "
                          "layer 0 in graph order, then the residual stream (the adds) of each later layer:", "", "```",
                          *row["localization"], "```"]
    if results["rows"]:
        lines += ["", "HTP legalization deviations (first rotated row):", ""]
        first = next((r for r in results["rows"] if r["rotate"] == "hadamard"), results["rows"][0])
        from collections import Counter

        kinds = Counter(f"{d['role'].split('.')[-1]}: {d['tensor'].split(' %')[0]} {d['planned']} -> {d['assigned']} bits"
                        for d in first["deviations"])
        kinds = [f"{k} ({n} layers)" for k, n in sorted(kinds.items())]
        lines += [f"- {k}" for k in kinds] or ["- none"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="*", help="indices of ROWS to run (default all)")
    parser.add_argument("--pte-configs", nargs="*", default=["8-8-8", "4-8-8"])
    parser.add_argument("--pte-seq-len", type=int, default=128)
    parser.add_argument("--pte-windows", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "static"))
    args = parser.parse_args()
    out = Path(args.out)
    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    model, tokenizer = load_smollm2()
    eval_tokens, calib_tokens = split_tokens(tokenizer, "evaluation"), split_tokens(tokenizer, "calibration")
    results: dict = {
        "command": "python bench/static.py " + shlex.join(sys.argv[1:]),
        "eval": {"windows": args.eval_windows, "seq_len": args.seq_len},
        "calibration": {"windows": args.calib_windows, "seq_len": args.seq_len},
        "float": {}, "rows": [], "pte": [], "versions": package_versions(),
    }
    rows = [ROWS[i] for i in args.rows] if args.rows is not None else ROWS
    if rows:
        windows = token_windows(eval_tokens, args.seq_len, args.eval_windows)
        calibration = list(token_windows(calib_tokens, args.seq_len, args.calib_windows).unsqueeze(1))
        exported = export_causal_lm(model, args.seq_len).module()
        for rotate in ("none", "hadamard"):
            results["float"][rotate] = perplexity(float_graph(exported, rotate), windows, f"float ({rotate})").ppl
            release_freed_memory()
        for bits, rotate, overrides, promote in rows:
            plan = BitPlan.parse(bits, overrides)
            fq, deviations, warned, seconds = fake_quant(exported, plan, calibration, rotate, promote)
            ppl = perplexity(fq, windows, f"fake-quant {plan.name} ({rotate})").ppl
            results["rows"].append({"bits": bits, "rotate": rotate, "overrides": list(overrides), "promote_fraction": promote,
                                    "ppl": ppl, "deviations": deviations, "rule_warnings": len(warned), "seconds": round(seconds, 1)})
            print(f"{plan.name} {rotate} promote {promote}: ppl {ppl:.3f}", flush=True)
            write(results, out)
            del fq
            release_freed_memory()
    if args.pte_configs:
        exported, pte_windows, calibration = pte_setting(model, tokenizer, args.pte_seq_len, args.pte_windows,
                                                         args.calib_windows * args.seq_len // args.pte_seq_len)
        results["pte_eval"] = {"windows": args.pte_windows, "seq_len": args.pte_seq_len, "soc": "SM8650"}
        float_ppl = perplexity(float_graph(exported), pte_windows, "float").ppl
        for bits in args.pte_configs:
            plan = BitPlan.parse(bits)
            fq, deviations, _, _ = fake_quant(exported, plan, calibration)
            quantized = converted(fq, plan, calibration)
            violations = integer_only_violations(quantized)
            row = {"bits": bits, "rotate": "hadamard", "float": float_ppl, "integer_only_violations": violations,
                   **pte_measurement(fq, quantized, pte_windows, out.parent / f"static_{bits}.pte", bits)}
            fq_ppl, qdq_ppl, pte_ppl = row["fake_quant"], row["qdq"], row["pte"]
            if row["relative_gap"] > 0.02:
                row["localization"] = localize(quantized, pte_windows[:1], out.parent / f"static_{bits}_taps.pte")
            results["pte"].append(row)
            print(f"{bits}: float {float_ppl:.3f} fake-quant {fq_ppl:.3f} Q/DQ {qdq_ppl:.3f} .pte {pte_ppl:.3f}", flush=True)
            write(results, out)
            del fq, quantized
            release_freed_memory()
    results["peak_rss_mib"] = peak_memory_mib()
    write(results, out)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
