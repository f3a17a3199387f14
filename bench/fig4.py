#!/usr/bin/env python3
"""The paper's Fig. 4 on SmolLM2-135M-Instruct: fake-quant perplexity against the fraction of
down_proj inputs promoted to 16 bits by sensitivity (AssignBitWidths), {0, 10, 20, 50, 100}%.

Rotated (random Hadamard R1/R2), static encodings (stage two), 16 x 512-token Brown evaluation
windows, calibration 8 x 512 (the setting of bench/results/stage_one.md). Each fraction runs in its
own process (memory stays bounded) and is merged into bench/results/fig4.{json,md,png}; everything
goes through `quantnpu.pipeline.pipeline`.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FRACTIONS = (0.0, 0.1, 0.2, 0.5, 1.0)


def measure(bits: str, fraction: float, seq_len: int, eval_windows: int, calib_windows: int) -> dict:
    from quantnpu.memory import release_freed_memory
    from quantnpu.models.corpus import split_tokens, token_windows
    from quantnpu.models.export import export_causal_lm
    from quantnpu.models.smollm2 import load_smollm2
    from quantnpu.passes import AssignBitWidths, PassManager
    from quantnpu.pipeline import fake_quant_end, find_pass, pipeline
    from quantnpu.runtime_harness.perplexity import perplexity
    from quantnpu.runtime_harness.records import peak_memory_mib
    from static import float_graph

    model, tokenizer = load_smollm2()
    windows = token_windows(split_tokens(tokenizer, "evaluation"), seq_len, eval_windows)
    calibration = list(token_windows(split_tokens(tokenizer, "calibration"), seq_len, calib_windows).unsqueeze(1))
    graph = export_causal_lm(model, seq_len).module()
    float_ppl = perplexity(float_graph(graph), windows, "float").ppl
    release_freed_memory()
    passes = pipeline(bits, calibration, "hadamard", progress=True, promote_fraction=fraction)
    start = time.perf_counter()
    fq = PassManager(passes, stop_after=fake_quant_end(passes), progress=True).run(copy.deepcopy(graph))
    seconds = time.perf_counter() - start
    assign = find_pass(passes, AssignBitWidths)
    promoted = [s.role for s in assign.sensitivities if s.promoted] if assign is not None else []
    ppl = perplexity(fq, windows, f"fake-quant {bits} {fraction:.0%}").ppl
    return {"bits": bits, "fraction": fraction, "ppl": ppl, "float": float_ppl, "promoted": promoted,
            "seconds": round(seconds, 1), "peak_rss_mib": peak_memory_mib()}


def write(results: dict, out: Path) -> None:
    from quantnpu.fileio import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    rows = sorted(results["rows"], key=lambda r: (r["bits"], r["fraction"]))
    lines = ["# Fig. 4: perplexity against the fraction of down_proj inputs at 16 bits (SmolLM2-135M-Instruct)", "",
             f"Command: `{results['command']}`", "",
             f"Rotated (random Hadamard R1/R2), static encodings, the most sensitive down_proj inputs (8-bit Max-Min error "
             f"on the calibration set) promoted first. Fake-quant ppl over {results['eval']['windows']} x {results['eval']['seq_len']} "
             f"Brown evaluation tokens, calibration {results['calibration']['windows']} x {results['eval']['seq_len']}.", "",
             "![ppl against promoted fraction](fig4.png)", "",
             "| W-A-KV | promoted | down_proj inputs at 16 bits | ppl | x float | pipeline s |", "|---|---|---|---|---|---|"]
    for r in rows:
        layers = ", ".join(p.split(".")[1] for p in r["promoted"]) if 0 < len(r["promoted"]) < 30 else ("all" if r["promoted"] else "none")
        lines.append(f"| {r['bits']} | {r['fraction']:.0%} | {layers} | {r['ppl']:.3f} | {r['ppl'] / r['float']:.2f} | {r['seconds']:.0f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for bits in sorted({r["bits"] for r in rows}):
        mine = [r for r in rows if r["bits"] == bits]
        axis.plot([100 * r["fraction"] for r in mine], [r["ppl"] for r in mine], marker="o", label=bits)
    if rows:
        axis.axhline(rows[0]["float"], color="gray", linestyle="--", label="float")
    axis.set_xlabel("down_proj inputs promoted to 16 bits (%)")
    axis.set_ylabel("perplexity (16 x 512 Brown tokens)")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("SmolLM2-135M, rotated, static encodings")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="*", default=["4-8-8"])
    parser.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fig4"))
    parser.add_argument("--one", nargs=2, metavar=("BITS", "FRACTION"), help=argparse.SUPPRESS)  # a child process's row
    args = parser.parse_args()
    out = Path(args.out)
    setting = (args.seq_len, args.eval_windows, args.calib_windows)
    if args.one:
        row = measure(args.one[0], float(args.one[1]), *setting)
        print(json.dumps(row))
        return 0
    results = {"command": "python bench/fig4.py " + shlex.join(sys.argv[1:]), "eval": {"windows": args.eval_windows, "seq_len": args.seq_len},
               "calibration": {"windows": args.calib_windows}, "rows": []}
    for bits in args.bits:
        for fraction in args.fractions:
            child = subprocess.run([sys.executable, __file__, "--one", bits, str(fraction), "--seq-len", str(args.seq_len),
                                    "--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows)],
                                   stdout=subprocess.PIPE, text=True)
            if child.returncode != 0:
                print(f"{bits} {fraction:.0%}: failed (exit {child.returncode})", file=sys.stderr)
                return child.returncode
            row = json.loads(child.stdout.strip().splitlines()[-1])
            results["rows"].append(row)
            print(f"{bits} {fraction:.0%}: ppl {row['ppl']:.3f}", flush=True)
            write(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
