#!/usr/bin/env python3
"""Walking-skeleton benchmark on SmolLM2-135M-Instruct (Brown corpus).

Rows, each timed stage by stage with the peak memory so far after each stage:
- `float:eager` / `float:graph`: float ppl of the eager model and of the exported graph after the
  float passes without rotation (STATIC with `rotate="none"`; the two must agree to 1e-4 relative);
- `et-8a8w`, `et-16a8w`, `et-16a4w`, `et-16a4w_block` (block 32; per-channel linears): fake-quant
  ppl of ExecuTorch's QnnQuantizer, calibrated on the calibration split (`pipeline("et-<config>")`);
- `pte:et-<config>`: that config at `--pte-seq-len` tokens lowered to QNN HTP (SM8650) and run on the
  x86 HTP simulator, next to the fake-quant ppl of the same graph on the same windows.
One row per process through bench/harness.py (bench/results/skeleton.{json,md}).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import Bench, Context, RowConfig, Setting, main  # noqa: E402

ET = ("et-8a8w", "et-16a8w", "et-16a4w", "et-16a4w_block")
FLOAT_ROWS = ("float:eager", "float:graph")
PTE = "pte:"
DEFAULT_ROWS = [*FLOAT_ROWS, *ET, f"{PTE}et-16a8w"]
SETTING = Setting(seq_len=512, eval_windows=40, calib_windows=32, pte_seq_len=128, pte_windows=4, pte_calib_windows=32)


class Timer:
    def __init__(self):
        self.stages: list[dict] = []

    def __call__(self, name, work):
        from quantnpu.runtime_harness.records import peak_memory_mib

        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.stages.append({"stage": name, "seconds": round(seconds, 2), "peak_rss_mib_so_far": round(peak_memory_mib(), 1)})
        print(f"[{name}] {seconds:.1f} s", flush=True)
        return result


def row_config(row: str, setting: Setting) -> RowConfig:
    from quantnpu.pipeline import STATIC

    unrotated = STATIC.replace(rotate="none")
    if row == "float:eager":
        return RowConfig("eager")
    if row == "float:graph":
        return RowConfig(None, recipe=unrotated)
    if row.removeprefix(PTE) in ET:
        return RowConfig(row.removeprefix(PTE), recipe=unrotated)
    raise ValueError(f"row {row!r}: one of {', '.join(FLOAT_ROWS)}, {', '.join(ET)}, or {PTE}et-<config>")


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    import torch

    from quantnpu.passes import PassManager
    from quantnpu.runtime_harness.perplexity import eager_forward, perplexity
    from quantnpu.runtime_harness.pte import PteModel

    torch.manual_seed(0)
    timer = Timer()
    timer("load model", lambda: context.model)
    if row == "float:eager":
        return {**timer("ppl eager float", lambda: perplexity(eager_forward(context.model), context.windows, "eager float")).as_dict(),
                "stages": timer.stages}
    if row == "float:graph":
        program = timer("export", lambda: context.program)
        gm = timer("passes", lambda: PassManager(config.passes()).run(program.module()))
        return {**timer("ppl exported graph", lambda: perplexity(gm, context.windows, "exported graph")).as_dict(), "stages": timer.stages}
    name = config.plan.removeprefix("et-")
    if not row.startswith(PTE):
        program = timer("export", lambda: context.program)
        quantized = timer(f"{name} calibrate+convert", lambda: PassManager(config.passes(context.calibration)).run(program.module()))
        result = timer(f"{name} ppl fake-quant", lambda: perplexity(quantized, context.windows, f"{name} fake-quant"))
        return {**result.as_dict(), "stages": timer.stages}
    import tempfile

    from quantnpu.lowering.lower import lower_to_qnn

    s = context.setting
    short = timer("export (pte)", lambda: context.export_at(s.pte_seq_len))
    windows, calibration = context.pte_windows, context.pte_calibration
    float_gm = PassManager(RowConfig(None, recipe=config.recipe).passes()).run(short.module())
    quantized = timer(f"{name} calibrate+convert (pte)", lambda: PassManager(config.passes(calibration)).run(short.module()))
    with tempfile.TemporaryDirectory() as work:
        lowered = timer("lower to QNN", lambda: lower_to_qnn(quantized, (calibration[0],), Path(work) / "row.pte"))
        pte_float = perplexity(float_gm, windows, "float (pte windows)")
        pte_fake = perplexity(quantized, windows, "fake-quant (pte windows)")
        pte_model = timer("load .pte", lambda: PteModel(lowered.pte_path))
        pte_ppl = timer("ppl .pte on HTP simulator", lambda: perplexity(pte_model, windows, ".pte on HTP simulator"))
    return {"et_config": name, "soc": "SM8650", "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
            "pte_mib": round(lowered.size_bytes / 2**20, 1), "lowering_seconds": round(lowered.seconds, 1),
            "float_ppl": pte_float.ppl, "fake_quant_ppl": pte_fake.ppl, "pte_ppl": pte_ppl.ppl,
            "pte_vs_fake_quant_relative": abs(pte_ppl.ppl - pte_fake.ppl) / pte_fake.ppl,
            "simulator_tokens_per_second": round(pte_ppl.tokens / pte_ppl.seconds, 2),
            "simulator_seconds_per_window": round(pte_ppl.seconds / pte_ppl.windows, 1), "stages": timer.stages,
            "qnn_sdk": {"version": context.sdk.version_text, "bridged": context.sdk.bridged}}


def body(results: dict) -> list[str]:
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    lines = [f"Evaluation: {s['eval_windows']} windows x {s['seq_len']} tokens of the Brown evaluation split (the last ~10% of "
             f"characters); calibration: {s['calib_windows']} windows x {s['seq_len']} tokens of the calibration split. 2-core CPU "
             "machine.", "", "| model | ppl |", "|---|---|"]
    eager, graph = by_row.get("float:eager"), by_row.get("float:graph")
    if eager:
        lines.append(f"| float, eager | {eager['ppl']:.3f} |")
    if graph:
        difference = f" (relative difference {abs(graph['ppl'] - eager['ppl']) / eager['ppl']:.1e})" if eager else ""
        lines.append(f"| float, exported graph (after the float passes, no rotation) | {graph['ppl']:.3f}{difference} |")
    for row in ET:
        if row in by_row:
            lines.append(f"| ExecuTorch QnnQuantizer {row.removeprefix('et-')}, fake-quant | {by_row[row]['ppl']:,.3f} |")
    for r in results["rows"]:
        if not r["row"].startswith(PTE):
            continue
        qnn = r.get("qnn_sdk", {})
        lines += ["", f"## `.pte` on the HTP simulator ({r['et_config']}, {r['soc']}, {s['pte_windows']} windows x {s['pte_seq_len']} tokens; "
                  f"calibration {s['pte_calib_windows']} x {s['pte_seq_len']}" + (f"; QNN {qnn['version']}" + (" through quantnpu's ABI bridge" if qnn.get("bridged") else "") if qnn else "") + ")", "",
                  "| float graph | fake-quant graph | `.pte` on simulator | `.pte` vs fake-quant |", "|---|---|---|---|",
                  f"| {r['float_ppl']:.3f} | {r['fake_quant_ppl']:.3f} | {r['pte_ppl']:.3f} | {100 * r['pte_vs_fake_quant_relative']:.2f}% |", "",
                  f"{r['delegates']} QNN delegate(s), {len(r['outside_delegates'])} op(s) outside; `.pte` {r['pte_mib']} MiB; "
                  f"lowering {r['lowering_seconds']} s; simulator {r['simulator_tokens_per_second']} tokens/s "
                  f"({r['simulator_seconds_per_window']} s per window)."]
    lines += ["", "## Stages", "", "| row | stage | seconds | peak RSS so far (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {st['stage']} | {st['seconds']} | {st['peak_rss_mib_so_far']} |" for r in results["rows"] for st in r.get("stages", [])]
    return lines


BENCH = Bench(name="skeleton", script=__file__, title="Walking skeleton: SmolLM2-135M-Instruct on the Brown corpus", setting=SETTING,
              default_rows=DEFAULT_ROWS, config=row_config, measure=measure, body=body, description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
