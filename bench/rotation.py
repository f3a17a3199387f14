#!/usr/bin/env python3
"""Why rotation matters, on SmolLM2-135M-Instruct (Brown corpus).

1. Float ppl of the unrotated graph and of the rotated one (UntieEmbeddings, FoldNorms,
   FuseRotations with random Hadamard R1/R2, BakeRotations): must agree within 0.1%.
2. Per linear-input activation statistics before and after rotation (max/std ratio, kurtosis),
   with a matplotlib figure.
3. ExecuTorch's stock QnnQuantizer fake-quant ppl on both graphs (8a8w, 16a8w).
4. The rotated graph lowered to QNN HTP (16a8w, SM8650) and run on the x86 HTP simulator.

Results: bench/results/rotation.{json,md} and bench/results/rotation_activations.png (written
atomically at the end).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from quantnpu.fileio import atomic_path, atomic_write_text  # noqa: E402
from quantnpu.lowering import qnn_sdk  # noqa: E402
from quantnpu.lowering.lower import lower_to_qnn  # noqa: E402
from quantnpu.models.corpus import split_tokens, token_windows  # noqa: E402
from quantnpu.models.export import export_causal_lm  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes import PassManager  # noqa: E402
from quantnpu.pipeline import pipeline  # noqa: E402
from quantnpu.runtime_harness.activation_stats import linear_input_stats  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from quantnpu.runtime_harness.pte import PteModel  # noqa: E402
from quantnpu.runtime_harness.records import package_versions, peak_memory_mib  # noqa: E402

KINDS = ("q_proj", "o_proj", "gate_proj", "down_proj")  # q/k/v and gate/up share their input


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--stats-windows", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=["8a8w", "16a8w"])
    parser.add_argument("--pte-config", default="16a8w")
    parser.add_argument("--pte-seq-len", type=int, default=128)
    parser.add_argument("--pte-windows", type=int, default=4)
    parser.add_argument("--skip-pte", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rotation"))
    args = parser.parse_args()
    sdk = qnn_sdk.activate()
    model, tokenizer = load_smollm2()
    eval_tokens, calib_tokens = split_tokens(tokenizer, "evaluation"), split_tokens(tokenizer, "calibration")
    windows = token_windows(eval_tokens, args.seq_len, args.eval_windows)
    calibration = list(token_windows(calib_tokens, args.seq_len, args.calib_windows).unsqueeze(1))
    program = export_causal_lm(model, args.seq_len)
    graphs, seconds = {}, {}
    for rotate in ("none", "hadamard"):
        manager = PassManager(pipeline(rotate=rotate))
        start = time.perf_counter()
        graphs[rotate] = manager.run(program.module())
        seconds[f"passes ({rotate})"] = round(time.perf_counter() - start, 2)
        print(manager.report(), flush=True)
    results: dict = {"eval": {"windows": args.eval_windows, "seq_len": args.seq_len},
                     "calibration": {"windows": args.calib_windows, "seq_len": args.seq_len}, "float": {}, "fake_quant": {}}
    for rotate, gm in graphs.items():
        results["float"][rotate] = perplexity(gm, windows, f"float ({rotate})").as_dict()
    unrotated, rotated = results["float"]["none"]["ppl"], results["float"]["hadamard"]["ppl"]
    results["float"]["relative_difference"] = abs(rotated - unrotated) / unrotated
    print(f"float ppl: unrotated {unrotated:.4f}, rotated {rotated:.4f}", flush=True)

    stats_windows = windows[: args.stats_windows]
    stats = {rotate: linear_input_stats(gm, stats_windows, f"stats ({rotate})") for rotate, gm in graphs.items()}
    results["activation_stats"] = {"windows": args.stats_windows, **stats}

    for config in args.configs:
        for rotate, gm in graphs.items():
            start = time.perf_counter()
            quantized = PassManager(pipeline(f"et-{config}", calibration, rotate=rotate, progress=True)).run(program.module())
            result = perplexity(quantized, windows, f"{config} fake-quant ({rotate})")
            seconds[f"{config} calibrate+convert+eval ({rotate})"] = round(time.perf_counter() - start, 1)
            results["fake_quant"].setdefault(config, {})[rotate] = result.as_dict()
            print(f"{config} ({rotate}): fake-quant ppl {result.ppl:,.3f}", flush=True)
            del quantized

    if not args.skip_pte:
        short = export_causal_lm(model, args.pte_seq_len)
        gm = PassManager(pipeline(rotate="hadamard")).run(short.module())
        short_windows = token_windows(eval_tokens, args.pte_seq_len, args.pte_windows)
        short_calibration = list(token_windows(calib_tokens, args.pte_seq_len, args.calib_windows).unsqueeze(1))
        quantized = PassManager(pipeline(f"et-{args.pte_config}", short_calibration, rotate="hadamard", progress=True)).run(short.module())
        lowered = lower_to_qnn(quantized, (short_calibration[0],), ROOT / "build" / f"bench-smollm2-rotated-s{args.pte_seq_len}.{args.pte_config}.pte")
        pte = perplexity(PteModel(lowered.pte_path), short_windows, ".pte on HTP simulator (rotated)")
        fake = perplexity(quantized, short_windows, "fake-quant (rotated, pte windows)")
        flt = perplexity(gm, short_windows, "float (rotated, pte windows)")
        results["pte"] = {"config": args.pte_config, "rotate": "hadamard", "soc": "SM8650", "seq_len": args.pte_seq_len,
                          "windows": args.pte_windows, "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
                          "lowering_seconds": round(lowered.seconds, 1), "pte_mib": round(lowered.size_bytes / 2**20, 1),
                          "float_ppl": flt.ppl, "fake_quant_ppl": fake.ppl, "pte_ppl": pte.ppl,
                          "pte_vs_fake_quant_relative": abs(pte.ppl - fake.ppl) / fake.ppl,
                          "simulator_tokens_per_second": round(pte.tokens / pte.seconds, 2)}
    results["seconds"] = seconds
    results["peak_rss_mib"] = round(peak_memory_mib(), 1)
    results["packages"] = package_versions()
    results["qnn_sdk"] = {"version": sdk.version_text, "bridged": sdk.bridged}
    results["command"] = "python bench/rotation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    figure = out.with_name(out.name + "_activations.png")
    plot(stats, figure)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render_markdown(results, figure.name))
    print(render_markdown(results, figure.name))
    return 0


def plot(stats: dict, path: Path) -> None:
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


def render_markdown(r: dict, figure: str) -> str:
    f = r["float"]
    lines = [
        "# Rotation: SmolLM2-135M-Instruct on the Brown corpus",
        "",
        f"Command: `{r['command']}` (2-core CPU; QNN {r['qnn_sdk']['version']} x86 HTP simulator). "
        f"Evaluation: {r['eval']['windows']} windows x {r['eval']['seq_len']} tokens of the Brown evaluation split; "
        f"calibration: {r['calibration']['windows']} windows x {r['calibration']['seq_len']} tokens of the calibration split.",
        "",
        "| graph | float ppl |",
        "|---|---|",
        f"| unrotated | {f['none']['ppl']:.4f} |",
        f"| rotated (random Hadamard R1/R2, baked) | {f['hadamard']['ppl']:.4f} |",
        f"| relative difference | {100 * f['relative_difference']:.4f}% |",
        "",
        "| ExecuTorch QnnQuantizer, fake-quant ppl | unrotated | rotated |",
        "|---|---|---|",
    ]
    for config, by in r["fake_quant"].items():
        lines.append(f"| {config} | {by['none']['ppl']:,.3f} | {by['hadamard']['ppl']:,.3f} |")
    stats = r["activation_stats"]
    lines += ["", f"## Linear-input activations ({stats['windows']} windows), mean over layers", "",
              "| input of | max/std unrotated | max/std rotated | kurtosis unrotated | kurtosis rotated |", "|---|---|---|---|---|"]
    for kind in KINDS + ("lm_head",):
        def mean(rotate, metric):
            values = [v[metric] for role, v in stats[rotate].items() if role.endswith(kind)]
            return sum(values) / len(values)
        lines.append(f"| {kind} | {mean('none', 'max_over_std'):.1f} | {mean('hadamard', 'max_over_std'):.1f} | "
                     f"{mean('none', 'kurtosis'):.1f} | {mean('hadamard', 'kurtosis'):.1f} |")
    lines += ["", f"![activations]({figure})", ""]
    if "pte" in r:
        p = r["pte"]
        lines += [f"## Rotated `.pte` on the HTP simulator ({p['config']}, {p['soc']}, {p['windows']} windows x {p['seq_len']} tokens)", "",
                  "| float | fake-quant | `.pte` | `.pte` vs fake-quant |", "|---|---|---|---|",
                  f"| {p['float_ppl']:.3f} | {p['fake_quant_ppl']:.3f} | {p['pte_ppl']:.3f} | {100 * p['pte_vs_fake_quant_relative']:.2f}% |", "",
                  f"{p['delegates']} QNN delegate(s), {len(p['outside_delegates'])} op(s) outside; {p['pte_mib']} MiB; lowering {p['lowering_seconds']} s; "
                  f"simulator {p['simulator_tokens_per_second']} tokens/s.", ""]
    lines += ["Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()) + f". Peak RSS {r['peak_rss_mib']} MiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
