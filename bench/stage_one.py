#!/usr/bin/env python3
"""Stage one and mixed precision on SmolLM2-135M-Instruct, Brown corpus (the paper's Table 1/2 rows
for this model).

For each W-A-KV config, fake-quant perplexity of the rotated (random Hadamard) model with:
static encodings only; + mixed precision (10% of down_proj inputs at 16 bits by sensitivity);
+ stage one (LSQ scales + Cayley-SGD R1/R2, selective); + stage one and 10%; and every down_proj
input at 16 bits (static). Stage-one rows also record seconds per step against one float
forward+backward of the same window in the same run, the loss curve and orthogonality. Then the
8-8-8 and 4-8-8 stage one + 10% settings lowered to QNN HTP and run on the x86 simulator at a shorter length.
Everything goes through `quantnpu.pipeline.pipeline`. Results are written after every row
(atomically) to bench/results/stage_one.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.lowering import qnn_sdk  # noqa: E402
from quantnpu.memory import release_freed_memory  # noqa: E402
from quantnpu.models.corpus import split_tokens, token_windows  # noqa: E402
from quantnpu.models.export import export_causal_lm  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes import PassManager, StaticCalibration  # noqa: E402
from quantnpu.passes.learn_encodings import LearnEncodings, StageOneConfig  # noqa: E402
from quantnpu.pipeline import STATIC, fake_quant_end, find_pass, pipeline  # noqa: E402
from quantnpu.quantizers.bit_plan import BitPlan  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from quantnpu.runtime_harness.records import package_versions, peak_memory_mib  # noqa: E402
from static import converted, float_graph, pte_measurement, pte_setting  # noqa: E402  (bench/ is the script's directory)

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
DEFAULT_RUNS = ([f"{bits}:{row}" for bits in CONFIGS for row in ("static", "mixed10", "down16", "stage1", "stage1+mixed10")]
                + ["4-8-8:stage1+mixed10+gptq", "4-4-8:stage1+mixed10+gptq", "8-8-8:pte", "4-8-8:pte"])
TARGETS = {"8-8-8": 1.45, "4-8-8": 2.2, "4-4-8": 3.0}  # the issue's, for stage one + 10%, x float


def plain_step_seconds(graph, window) -> float:
    """A plain float forward+backward of the exported model on one window (every weight learnable,
    as in training), the faster of two: what a stage-one step is compared with."""
    import torch.nn.functional as F

    from quantnpu.graph.equivalence import logits_of

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


def run_row(graph, bits: str, row: str, calibration, stage_one: StageOneConfig):
    """The pipeline up to StaticCalibration on a copy of `graph`: (fake-quant graph, facts)."""
    promote, learn, overrides, rounding = ROWS[row]
    plan = BitPlan.parse(bits, overrides)
    passes = pipeline(plan, calibration, STATIC, progress=True, promote_fraction=promote,
                      stage_one=stage_one if learn else None, weight_rounding=rounding)
    learner = find_pass(passes, LearnEncodings)
    if learner is not None:
        learner.measure_float_step = True
    start = time.perf_counter()
    fq = PassManager(passes, stop_after=fake_quant_end(passes), progress=True).run(copy.deepcopy(graph))
    facts = {"seconds": round(time.perf_counter() - start, 1), "weight_rounding": rounding,
             "learned_encodings_kept": find_pass(passes, StaticCalibration).learned_used}
    if learner is not None:
        summary = learner.summary()
        plain = plain_step_seconds(graph, calibration[0])
        facts["stage_one"] = {
            **summary, "plain_float_forward_backward_seconds": round(plain, 3), "step_ratio": round(summary["seconds_per_step"] / plain, 3),
            # the same fused graph with its quantizers off: R1/R2 recomputed into every weight each forward
            "float_forward_backward_with_rotations_seconds": round(learner.float_step_seconds, 3),
            "quantizers": len(learner.sites), "lr_rotation": stage_one.lr_rotation, "lr_scale": stage_one.lr_scale,
        }
    return fq, plan, passes, facts


def row_key(row: dict) -> tuple:
    """Rows are kept per (config, row, rotation lr): a rerun replaces its own row only."""
    return row["bits"], row["row"], (row.get("stage_one") or {}).get("lr_rotation")


def merged(previous: dict | None, results: dict) -> dict:
    """`results` with the rows of an earlier invocation in the same setting that it did not rerun
    (`--merge`: one row per process keeps memory bounded)."""
    if previous is None or (previous["eval"], previous["calibration"]) != (results["eval"], results["calibration"]):
        return results
    mine = {row_key(r) for r in results["rows"]}
    mine_pte = {(r["bits"], r["row"]) for r in results["pte"]}
    out = dict(results)
    out["rows"] = [r for r in previous["rows"] if row_key(r) not in mine] + results["rows"]
    out["pte"] = [r for r in previous.get("pte", []) if (r["bits"], r["row"]) not in mine_pte] + results["pte"]
    if results.get("pte_eval") is None and previous.get("pte_eval"):
        out["pte_eval"] = previous["pte_eval"]
    out["commands"] = previous.get("commands", [previous["command"]]) + [results["command"]]
    return out


def write(results: dict, out: Path) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    float_ppl = results["float"]
    s1 = results["stage_one_config"]
    lines = [
        "# Stage one and mixed precision: SmolLM2-135M-Instruct, Brown evaluation split", "",
        "Commands (each row in its own process; rows of a rerun replace their own):", "",
        *[f"    {c}" for c in results.get("commands", [results["command"]])], "",
        f"Fake-quant ppl, {results['eval']['windows']} x {results['eval']['seq_len']}-token windows; calibration (stage one's "
        f"training windows too) {results['calibration']['windows']} x {results['calibration']['seq_len']}. Rotated (random "
        f"Hadamard R1/R2) in every row. Float ppl {float_ppl:.3f}.", "",
        f"Stage one: {s1['optimize']}, {s1['steps']} steps of {s1['batch']} window, lr {s1['lr_scale']} scales (relative to "
        f"each scale's size), rotations (Cayley SGD) at each row's lr, cosine decay, local loss for the first "
        f"{s1['local_steps'] if s1['local_steps'] is not None else s1['steps'] // 4} steps, init {s1['init']}, {s1['loss']} loss.", "",
        "Stage one s/step against a plain float forward+backward of the exported model on one window (all weights "
        "learnable), measured in the same run; in brackets the same fused graph with its quantizers off (R1/R2 recomputed "
        "into every weight each forward, the part of a step that learning rotations adds).", "",
        "| W-A-KV | row | rotation lr | fake-quant ppl | x float | target (stage one + 10%) | stage one s/step | plain float fwd+bwd s | ratio | pipeline s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(ROWS)
    for row in sorted(results["rows"], key=lambda r: (CONFIGS.index(r["bits"]), order.index(r["row"]), row_key(r))):
        s = row.get("stage_one")
        target = f"<= {TARGETS[row['bits']]}x ({TARGETS[row['bits']] * float_ppl:.1f})" if row["row"] == "stage1+mixed10" else ""
        met = "" if not target else (" met" if row["ppl"] <= TARGETS[row["bits"]] * float_ppl else " **missed**")
        lr = f"{s['lr_rotation']:g}" if s else ""
        lines.append(f"| {row['bits']} | {ROW_TITLES[row['row']]} | {lr} | {row['ppl']:.3f} | {row['ppl'] / float_ppl:.2f} | {target}{met} | "
                     + (f"{s['seconds_per_step']:.2f} | {s['plain_float_forward_backward_seconds']:.2f} "
                        f"({s['float_forward_backward_with_rotations_seconds']:.2f}) | {s['step_ratio']:.2f}" if s else "- | - | -")
                     + f" | {row['seconds']:.0f} |")
    lines += ["", "Peak RSS per row (each row ran in its own process): "
              + ", ".join(f"{r['bits']} {r['row']} {r['peak_rss_mib']:.0f}" for r in results["rows"]) + " MiB.", ""]
    if results.get("pte"):
        lines += [f"## `.pte` on the x86 HTP simulator ({results['pte_eval']['windows']} x {results['pte_eval']['seq_len']} tokens, SM8650)", "",
                  "| W-A-KV | row | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | delegates | lower (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in results["pte"]:
            lines.append(f"| {row['bits']} | {ROW_TITLES[row['row']]} | {row['float']:.3f} | {row['fake_quant']:.3f} | {row['qdq']:.3f} | "
                         f"{row['pte']:.3f} | {100 * row['relative_gap']:.2f}% | {row['delegates']} | {row['lower_seconds']:.0f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, metavar="BITS:ROW",
                        help="which rows, in this order (default: the targets first, then the static rows, then stage one alone)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr-scale", type=float, default=StageOneConfig.lr_scale)
    parser.add_argument("--lr-rotation", type=float, default=StageOneConfig.lr_rotation)
    parser.add_argument("--pte-row", default="stage1+mixed10", choices=list(ROWS))
    parser.add_argument("--pte-seq-len", type=int, default=128)
    parser.add_argument("--pte-windows", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage_one"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the existing results file (same windows) that this run does not redo")
    args = parser.parse_args()
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.merge and out.with_suffix(".json").is_file() else None
    stage_one = StageOneConfig(steps=args.steps, lr_scale=args.lr_scale, lr_rotation=args.lr_rotation)
    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    model, tokenizer = load_smollm2()
    eval_tokens, calib_tokens = split_tokens(tokenizer, "evaluation"), split_tokens(tokenizer, "calibration")
    from dataclasses import asdict

    results: dict = {
        "command": "python bench/stage_one.py " + shlex.join(sys.argv[1:]),
        "eval": {"windows": args.eval_windows, "seq_len": args.seq_len},
        "calibration": {"windows": args.calib_windows, "seq_len": args.seq_len},
        "stage_one_config": asdict(stage_one), "torch_threads": torch.get_num_threads(),
        "float": float("nan"), "rows": [], "pte": [], "versions": package_versions(),
    }
    began = time.perf_counter()
    runs = []
    for run in args.runs:
        bits, _, row = run.partition(":")
        if row not in ROWS and row != "pte":
            parser.error(f"--runs {run!r}: the row must be one of {', '.join(ROWS)}, or pte")
        runs.append((bits, row))
    setting, pte_setting_ = None, None
    for bits, row in runs:
        if row != "pte":
            if setting is None:
                windows = token_windows(eval_tokens, args.seq_len, args.eval_windows)
                calibration = list(token_windows(calib_tokens, args.seq_len, args.calib_windows).unsqueeze(1))
                exported = export_causal_lm(model, args.seq_len).module()
                setting = (exported, windows, calibration)
                if previous is not None and (previous["eval"], previous["calibration"]) == (results["eval"], results["calibration"]):
                    results["float"] = previous["float"]  # the same windows and model: measured by the first invocation
                else:
                    results["float"] = perplexity(float_graph(exported), windows, "float (rotated)").ppl
                release_freed_memory()
            exported, windows, calibration = setting
            fq, plan, _, facts = run_row(exported, bits, row, calibration, stage_one)
            ppl = perplexity(fq, windows, f"fake-quant {plan.name} {row}").ppl
            results["rows"].append({"bits": bits, "row": row, "ppl": ppl, **facts, "peak_rss_mib": peak_memory_mib()})
            print(f"{bits} {row}: ppl {ppl:.3f} ({ppl / results['float']:.2f}x float)", flush=True)
            del fq
        else:
            if pte_setting_ is None:
                pte_graph, pte_windows, pte_calibration = pte_setting(model, tokenizer, args.pte_seq_len, args.pte_windows,
                                                                      args.calib_windows * args.seq_len // args.pte_seq_len)
                results["pte_eval"] = {"windows": args.pte_windows, "seq_len": args.pte_seq_len, "soc": "SM8650",
                                       "calibration_windows": len(pte_calibration)}
                pte_float = perplexity(float_graph(pte_graph), pte_windows, "float").ppl
                pte_setting_ = (pte_graph, pte_windows, pte_calibration, pte_float)
            pte_graph, pte_windows, pte_calibration, pte_float = pte_setting_
            fq, plan, _, facts = run_row(pte_graph, bits, args.pte_row, pte_calibration, stage_one)
            quantized = converted(fq, plan, pte_calibration)
            row = {"bits": bits, "row": args.pte_row, "float": pte_float, **facts,
                   **pte_measurement(fq, quantized, pte_windows, out.parent / f"stage_one_{bits}.pte", bits)}
            results["pte"].append(row)
            print(f"{bits}: float {pte_float:.3f} fake-quant {row['fake_quant']:.3f} Q/DQ {row['qdq']:.3f} .pte {row['pte']:.3f}", flush=True)
            del fq, quantized
        results["peak_rss_mib"] = peak_memory_mib()
        write(merged(previous, results), out)
        release_freed_memory()
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    results["peak_rss_mib"] = peak_memory_mib()
    write(merged(previous, results), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
