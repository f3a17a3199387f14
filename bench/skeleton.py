#!/usr/bin/env python3
"""Walking-skeleton benchmark on SmolLM2-135M-Instruct (Brown corpus).

Measures, in one process, with the time of every stage and the peak memory so far after it:
1. float ppl of the eager model and of the exported graph (must agree to 1e-4 relative);
2. fake-quant ppl of ExecuTorch's QnnQuantizer configs (8a8w, 16a8w, 16a4w, 16a4w_block with
   block 32; per-channel linears), calibrated on the calibration split;
3. the `.pte` of one config lowered to QNN HTP (SM8650) and run on the x86 HTP simulator, next to
   the fake-quant ppl of the same graph on the same windows.

Results: bench/results/skeleton.json and bench/results/skeleton.md (written atomically at the end;
an interrupted run leaves the previous results as they were).
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

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.lowering import qnn_sdk  # noqa: E402
from quantnpu.lowering.lower import lower_to_qnn  # noqa: E402
from quantnpu.models.corpus import split_tokens, token_windows  # noqa: E402
from quantnpu.models.export import export_causal_lm  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes import PassManager  # noqa: E402
from quantnpu.pipeline import pipeline  # noqa: E402
from quantnpu.quantizers.et_qnn import ET_CONFIGS  # noqa: E402
from quantnpu.runtime_harness.perplexity import eager_forward, perplexity  # noqa: E402
from quantnpu.runtime_harness.pte import PteModel  # noqa: E402
from quantnpu.runtime_harness.records import package_versions, peak_memory_mib  # noqa: E402


class Timer:
    def __init__(self):
        self.stages: list[dict] = []

    def __call__(self, name, work):
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.stages.append({"stage": name, "seconds": round(seconds, 2), "peak_rss_mib_so_far": round(peak_memory_mib(), 1)})
        print(f"[{name}] {seconds:.1f} s", flush=True)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(ET_CONFIGS))
    parser.add_argument("--pte-config", default="16a8w")
    parser.add_argument("--pte-seq-len", type=int, default=128)
    parser.add_argument("--pte-windows", type=int, default=4)
    parser.add_argument("--skip-pte", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "skeleton"))
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = Timer()
    sdk = qnn_sdk.activate()
    model, tokenizer = timer("load model", load_smollm2)
    eval_tokens = split_tokens(tokenizer, "evaluation")
    calib_tokens = split_tokens(tokenizer, "calibration")
    windows = token_windows(eval_tokens, args.seq_len, args.eval_windows)
    calibration = list(token_windows(calib_tokens, args.seq_len, args.calib_windows).unsqueeze(1))

    results: dict = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
                     "eval": {"split": "brown evaluation (last ~10% of characters)", "windows": args.eval_windows, "seq_len": args.seq_len},
                     "calibration": {"split": "brown calibration", "windows": args.calib_windows, "seq_len": args.seq_len}}
    float_eager = timer("ppl eager float", lambda: perplexity(eager_forward(model), windows, "eager float"))
    program = timer("export", lambda: export_causal_lm(model, args.seq_len))
    manager = PassManager(pipeline(rotate="none"))
    gm = timer("passes", lambda: manager.run(program.module()))
    float_graph = timer("ppl exported graph", lambda: perplexity(gm, windows, "exported graph"))
    results["float"] = {"eager": float_eager.as_dict(), "exported_graph": float_graph.as_dict(),
                        "relative_difference": abs(float_graph.ppl - float_eager.ppl) / float_eager.ppl}
    results["fake_quant"] = {}
    for config in args.configs:
        quantized = timer(f"{config} calibrate+convert", lambda: PassManager(pipeline(f"et-{config}", calibration, rotate="none", progress=True)).run(program.module()))
        result = timer(f"{config} ppl fake-quant", lambda: perplexity(quantized, windows, f"{config} fake-quant"))
        results["fake_quant"][config] = result.as_dict()
        print(f"{config}: fake-quant ppl {result.ppl:.3f}", flush=True)
        del quantized

    if not args.skip_pte:
        short_windows = token_windows(eval_tokens, args.pte_seq_len, args.pte_windows)
        short_calibration = list(token_windows(calib_tokens, args.pte_seq_len, args.calib_windows).unsqueeze(1))
        short_program = timer("export (pte)", lambda: export_causal_lm(model, args.pte_seq_len))
        short_gm = PassManager(pipeline(rotate="none")).run(short_program.module())
        quantized = timer(f"{args.pte_config} calibrate+convert (pte)", lambda: PassManager(pipeline(f"et-{args.pte_config}", short_calibration, rotate="none", progress=True)).run(short_program.module()))
        pte_path = ROOT / "build" / f"bench-smollm2-s{args.pte_seq_len}.{args.pte_config}.pte"
        lowered = timer("lower to QNN", lambda: lower_to_qnn(quantized, (short_calibration[0],), pte_path))
        pte_float = perplexity(short_gm, short_windows, "float (pte windows)")
        pte_fake = perplexity(quantized, short_windows, "fake-quant (pte windows)")
        pte_model = timer("load .pte", lambda: PteModel(lowered.pte_path))
        pte_ppl = timer("ppl .pte on HTP simulator", lambda: perplexity(pte_model, short_windows, ".pte on HTP simulator"))
        results["pte"] = {
            "config": args.pte_config, "soc": "SM8650", "seq_len": args.pte_seq_len, "windows": args.pte_windows,
            "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
            "pte_mib": round(lowered.size_bytes / 2**20, 1), "lowering_seconds": round(lowered.seconds, 1),
            "float_ppl": pte_float.ppl, "fake_quant_ppl": pte_fake.ppl, "pte_ppl": pte_ppl.ppl,
            "pte_vs_fake_quant_relative": abs(pte_ppl.ppl - pte_fake.ppl) / pte_fake.ppl,
            "simulator_tokens_per_second": round(pte_ppl.tokens / pte_ppl.seconds, 2),
            "simulator_seconds_per_window": round(pte_ppl.seconds / pte_ppl.windows, 1),
        }
    results["stages"] = timer.stages
    results["peak_rss_mib"] = round(peak_memory_mib(), 1)
    results["packages"] = package_versions()
    results["qnn_sdk"] = {"version": sdk.version_text, "bridged": sdk.bridged}
    results["command"] = "python bench/skeleton.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render_markdown(results))
    print(render_markdown(results))
    return 0


def render_markdown(r: dict) -> str:
    lines = [
        "# Walking skeleton: SmolLM2-135M-Instruct on the Brown corpus",
        "",
        f"Command: `{r['command']}` (2-core CPU machine; QNN {r['qnn_sdk']['version']} x86 HTP simulator"
        + (" through quantnpu's ABI bridge" if r["qnn_sdk"]["bridged"] else "") + ").",
        "",
        f"Evaluation: {r['eval']['windows']} windows x {r['eval']['seq_len']} tokens of the {r['eval']['split']}; "
        f"calibration: {r['calibration']['windows']} windows x {r['calibration']['seq_len']} tokens of the {r['calibration']['split']}.",
        "",
        "| model | ppl |",
        "|---|---|",
        f"| float, eager | {r['float']['eager']['ppl']:.3f} |",
        f"| float, exported graph (after FoldConstants, AnnotateRoles) | {r['float']['exported_graph']['ppl']:.3f} (relative difference {r['float']['relative_difference']:.1e}) |",
    ]
    for config, result in r["fake_quant"].items():
        lines.append(f"| ExecuTorch QnnQuantizer {config}, fake-quant | {result['ppl']:,.3f} |")
    if "pte" in r:
        p = r["pte"]
        lines += [
            "",
            f"## `.pte` on the HTP simulator ({p['config']}, {p['soc']}, {p['windows']} windows x {p['seq_len']} tokens)",
            "",
            "| float graph | fake-quant graph | `.pte` on simulator | `.pte` vs fake-quant |",
            "|---|---|---|---|",
            f"| {p['float_ppl']:.3f} | {p['fake_quant_ppl']:.3f} | {p['pte_ppl']:.3f} | {100 * p['pte_vs_fake_quant_relative']:.2f}% |",
            "",
            f"{p['delegates']} QNN delegate(s), {len(p['outside_delegates'])} op(s) outside; `.pte` {p['pte_mib']} MiB; "
            f"lowering {p['lowering_seconds']} s; simulator {p['simulator_tokens_per_second']} tokens/s "
            f"({p['simulator_seconds_per_window']} s per window).",
        ]
    lines += ["", "## Stages", "", "| stage | seconds | peak RSS so far (MiB) |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']} | {s['peak_rss_mib_so_far']} |" for s in r["stages"]]
    lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in r["packages"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
