#!/usr/bin/env python3
"""The paper's Table 1 on SmolLM2-135M-Instruct, every baseline measured the same way.

Rows `METHOD:BITS:PROMOTION` (p100: every down_proj input at 16 bits, the paper's Table 1 setting;
p10: the 10% most sensitive, AssignBitWidths), or an ExecuTorch QnnQuantizer config alone:
- `rtn`: no rotation, static Max-Min encodings (at 4-4-8, 4-bit inputs on the same edges as the rotated
  rows, by override: the plan's own rule keeps an unrotated input at 8 bits or more);
- `quarot`: random Hadamard R1/R2, static encodings;
- `spinquant`: R1/R2 learned by Cayley SGD under dynamic per-token activation quantization, then
  converted to static encodings (the paper's "D" row: stage one with `optimize=rotations`,
  `simulate=dynamic`);
- `quantnpu-paper`: the paper's method, stage one (selective LSQ scales + Cayley R1/R2) + stage two;
- `quantnpu`: what `tools/lower.py` does by default: the paper's method plus smoothing (search),
  GPTQ rounding of 4-bit weights and the leading-token split;
- `et-8a8w`, `et-16a4w`, `et-16a4w_block`: ExecuTorch's QnnQuantizer (no rotation).
Fake-quant perplexity on 16 x 512 Brown evaluation tokens (float 52.600), calibration 8 x 512, and
the accuracy of lm-eval's evaluator on the local last-word task (quantnpu.runtime_harness.
lm_eval_adapter, passages of Brown's evaluation split) with the same fake-quant graph. Each row runs
in its own process and is merged into bench/results/table1.{json,md}; everything goes through
`quantnpu.pipeline.pipeline`. bench/ablation.py uses the same row runner.
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

METHODS = ("rtn", "quarot", "spinquant", "quantnpu-paper", "quantnpu")
ET_CONFIGS = ("et-8a8w", "et-16a4w", "et-16a4w_block")
FLOAT_ROW = "float"
ROTATABLE_INPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")  # FuseRotations' R1/R2 readers
CONFIGS = ("8-8-8", "4-8-8", "4-4-8")
DEFAULT_ROWS = ([FLOAT_ROW] + [f"{m}:{b}:{p}" for b in CONFIGS for p in ("p100", "p10") for m in METHODS] + list(ET_CONFIGS))
TITLES = {"rtn": "RTN static (no rotation)", "quarot": "QuaRot-style (Hadamard, static)",
          "spinquant": "SpinQuant-style (learned R, dynamic -> static)", "quantnpu-paper": "quantnpu, the paper's method (stage one + two)",
          "quantnpu": "quantnpu (+ smoothing, GPTQ, leading-token split)"}


def rotation_lr(bits: str) -> float:
    """bench/results/stage_one.md: 0.1 (the paper's) at 8-8-8, 2.0 with 4-bit weights in 32 steps."""
    return 0.1 if bits.startswith("8") else 2.0


def row_setup(row: str, calibration, steps: int) -> dict:
    """The pipeline arguments of a row (see the module docstring)."""
    from quantnpu.passes.learn_encodings import StageOneConfig
    from quantnpu.passes.smooth_inputs import SmoothingConfig
    from quantnpu.passes.split_leading_tokens import LeadingTokenSplit
    from quantnpu.quantizers.bit_plan import BitPlan

    if row in ET_CONFIGS:
        return {"plan": row, "rotate": "none"}
    parts = row.split(":")
    method, bits, promotion = parts if len(parts) == 3 else ("", "", "")
    if method not in METHODS or promotion not in ("p10", "p100"):
        raise ValueError(f"row {row!r}: write METHOD:BITS:p10|p100 with METHOD one of {', '.join(METHODS)}, or one of {', '.join(ET_CONFIGS)}")
    overrides = ["*.down_proj.input=16"] if promotion == "p100" else []
    if method == "rtn" and int(bits.split("-")[1]) < 8:
        # the plan keeps an unrotated input at 8 bits or more; the RTN baseline's A applies to the same
        # edges as the rotated methods' (the inputs R1/R2 would rotate), so it is asked for explicitly
        overrides += [f"*.{kind}.input={bits.split('-')[1]}" for kind in ROTATABLE_INPUTS]
    plan = BitPlan.parse(bits, tuple(overrides))
    setup = {"plan": plan, "rotate": "none" if method == "rtn" else "hadamard", "promote_fraction": 0.1 if promotion == "p10" else 0.0}
    if method == "spinquant":
        setup["stage_one"] = StageOneConfig(steps=steps, optimize="rotations", simulate="dynamic", init="maxmin", lr_rotation=rotation_lr(bits))
    if method in ("quantnpu-paper", "quantnpu"):
        setup["stage_one"] = StageOneConfig(steps=steps, lr_rotation=rotation_lr(bits))
    if method == "quantnpu":
        setup.update(smoothing=SmoothingConfig(mode="search"), weight_rounding="gptq", leading_split=LeadingTokenSplit(mode="auto"))
    return setup


def fake_quant(graph, setup: dict, calibration):
    """The row's fake-quant graph (the pipeline up to its last calibration or rounding pass) and its seconds."""
    from quantnpu.passes import PassManager
    from quantnpu.pipeline import STATIC, fake_quant_end, pipeline

    setup = dict(setup)
    plan, rotate = setup.pop("plan"), setup.pop("rotate")
    passes = pipeline(plan, calibration, STATIC, rotate=rotate, progress=True, **setup)
    start = time.perf_counter()
    stop = fake_quant_end(passes) if not isinstance(plan, str) else None
    fq = PassManager(passes, stop_after=stop, progress=True).run(copy.deepcopy(graph))
    return fq, passes, time.perf_counter() - start


def measure(row: str, seq_len: int, eval_windows: int, calib_windows: int, steps: int, lastword_docs: int,
            setup_of=row_setup) -> dict:
    from quantnpu.lowering import qnn_sdk
    from quantnpu.models.corpus import brown_split, split_tokens, token_windows
    from quantnpu.models.export import export_causal_lm
    from quantnpu.models.smollm2 import load_smollm2
    from quantnpu.passes.learn_encodings import LearnEncodings
    from quantnpu.pipeline import find_pass
    from quantnpu.runtime_harness.lm_eval_adapter import evaluate_last_word
    from quantnpu.runtime_harness.perplexity import perplexity
    from quantnpu.runtime_harness.records import peak_memory_mib

    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    model, tokenizer = load_smollm2()
    windows = token_windows(split_tokens(tokenizer, "evaluation"), seq_len, eval_windows)
    calibration = list(token_windows(split_tokens(tokenizer, "calibration"), seq_len, calib_windows).unsqueeze(1))
    graph = export_causal_lm(model, seq_len).module()
    del model
    stage_one = None
    if row == FLOAT_ROW:  # the baseline every cell is read against, measured the same way
        fq, seconds = graph, 0.0
    else:
        fq, passes, seconds = fake_quant(graph, setup_of(row, calibration, steps), calibration)
        learner = find_pass(passes, LearnEncodings)
        stage_one = learner.summary() if learner is not None else None
    ppl = perplexity(fq, windows, row if row == FLOAT_ROW else f"fake-quant {row}").ppl
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        lastword = evaluate_last_word(fq, tokenizer, seq_len, brown_split().evaluation_text, work, limit=lastword_docs,
                                      count=lastword_docs, name=row) if lastword_docs else None
    return {"row": row, "ppl": ppl, "last_word": lastword, "seconds": round(seconds, 1), "peak_rss_mib": peak_memory_mib(),
            **({"stage_one": stage_one} if stage_one else {})}


def setting_of(args) -> dict:
    return {"seq_len": args.seq_len, "eval_windows": args.eval_windows, "calib_windows": args.calib_windows,
            "steps": args.steps, "last_word_documents": args.last_word}


def measured_elsewhere(row: str, setup_of, setting: dict, steps: int, sources) -> dict | None:
    """A row another results file already measured with the same pipeline arguments in the same
    setting (its setting may record more, e.g. last-word passages): that measurement, marked `same_as`.
    `sources`: (results file, its setup function) pairs. E.g. the ablation's `+10%` is Table 1's
    quantnpu-paper p10."""
    wanted = repr(setup_of(row, [], steps))
    for path, other_setup_of in sources or ():
        other = json.loads(path.read_text()) if path.is_file() else {}
        if {key: other.get("setting", {}).get(key) for key in setting} != setting:
            continue
        for measured in other.get("rows", []):
            try:
                same = measured["row"] != FLOAT_ROW and repr(other_setup_of(measured["row"], [], steps)) == wanted
            except ValueError:
                continue
            if same:
                return {**measured, "row": row, "same_as": f"{path.stem} {measured['row']}"}
    return None


def open_results(path: Path, setting: dict, command: str) -> dict:
    """The results file's rows so far, with `command` appended; exits with a one-line error if the file
    was measured in another setting (its rows would not be comparable with the new ones)."""
    results = json.loads(path.read_text()) if path.is_file() else {"rows": [], "commands": []}
    if results.get("setting", setting) != setting:
        sys.exit(f"{path} was measured with {results['setting']}, not {setting}: pass another --out")
    results["setting"] = setting
    results["commands"] = results.get("commands", []) + [command]
    return results


def merge_row(results: dict, measured: dict, out: Path, write, how: str = "") -> None:
    """Replace the row's earlier measurement (if any) and rewrite the results files."""
    results["rows"] = [r for r in results["rows"] if r["row"] != measured["row"]] + [measured]
    print(f"{measured['row']}: ppl {measured['ppl']:.3f}{how}", flush=True)
    write(results, out)


def measure_in_child(script: str, row: str, options: list[str]) -> dict | None:
    """`script --one ROW OPTIONS` in its own process (memory is returned between rows); None if it failed."""
    child = subprocess.run([sys.executable, script, "--one", row, *options], stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        print(f"{row}: failed (exit {child.returncode})", file=sys.stderr)
        return None
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_rows(script: str, rows: list[str], args, out: Path, write, setup_of=row_setup, reuse=()) -> int:
    """Each row in its own process (bounded memory), merged into the results file as it finishes;
    a row one of `reuse` ((results file, its setup function) pairs) already measured the same way is
    taken from it."""
    results = open_results(out.with_suffix(".json"), setting_of(args), f"python bench/{Path(script).name} " + shlex.join(sys.argv[1:]))
    options = ["--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows),
               "--steps", str(args.steps), "--last-word", str(args.last_word)]
    for row in rows:
        measured = measured_elsewhere(row, setup_of, setting_of(args), args.steps, reuse) if row != FLOAT_ROW else None
        if measured is not None:
            merge_row(results, measured, out, write, f" (measured as {measured['same_as']})")
            continue
        measured = measure_in_child(script, row, options)
        if measured is None:
            return 1
        merge_row(results, measured, out, write)
    return 0


def arguments(description: str, default_rows: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", nargs="*", default=default_rows)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--last-word", type=int, default=100, help="last-word passages scored through lm-eval (0: none)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's row
    return parser


def last_word_text(row: dict) -> str:
    """`accuracy / word perplexity` of a row's last-word task ('' if it was not measured)."""
    lw = row.get("last_word")
    return f"{100 * lw['acc']:.0f}% / {lw['word_perplexity']:.0f}" if lw else ""


def write(results: dict, out: Path) -> None:
    from quantnpu.fileio import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    lines = ["# Table 1: SmolLM2-135M-Instruct, every method measured the same way", "",
             "Commands (one row per process, rows of a rerun replace their own):", "", *[f"    {c}" for c in results["commands"]], "",
             f"Fake-quant perplexity over {s['eval_windows']} x {s['seq_len']} Brown evaluation tokens, calibration {s['calib_windows']} x "
             f"{s['seq_len']}; stage one {s['steps']} steps. Last word: accuracy of lm-eval's evaluator on {s['last_word_documents']} "
             "passages of the evaluation split (the local LAMBADA-style task), same fake-quant graph.", "",
             *([f"Float (the exported model, no quantization): ppl {by_row[FLOAT_ROW]['ppl']:.3f}, last word "
                f"{last_word_text(by_row[FLOAT_ROW])}.", ""] if FLOAT_ROW in by_row else []),
             "| method | " + " | ".join(f"{b} {p}" for b in CONFIGS for p in ("100%", "10%")) + " |",
             "|---|" + "---|" * (2 * len(CONFIGS))]
    for method in METHODS:
        cells = []
        for bits in CONFIGS:
            for promotion in ("p100", "p10"):
                r = by_row.get(f"{method}:{bits}:{promotion}")
                cells.append("" if r is None else f"{r['ppl']:.1f}" + (f" / {last_word_text(r)}" if r.get("last_word") else ""))
        lines.append(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: ppl / last-word accuracy / the last word's perplexity (accuracy over 100 passages moves in steps of 1% "
              "with a standard error of ~3%: the word's perplexity separates rows better). 100%: every down_proj input at 16 bits (the paper's Table 1 setting); "
              "10%: the most sensitive 10% (3 of 30).", "", "| ExecuTorch QnnQuantizer | ppl | last word: accuracy / word ppl |", "|---|---|---|"]
    for config in ET_CONFIGS:
        r = by_row.get(config)
        if r is not None:
            lines.append(f"| {config} | {r['ppl']:.1f} | {last_word_text(r)} |")
    lines += pte_lines(out.parent / "fidelity.json")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def pte_lines(fidelity: Path) -> list[str]:
    """The `.pte` rows: bench/fidelity.py lowers the `quantnpu` rows (its notation `BITS:p10:search:gptq:
    stage1:lead`) and runs them on the HTP simulator, on windows short enough for the simulator."""
    if not fidelity.is_file():
        return []
    results = json.loads(fidelity.read_text())
    ev = results["eval"]
    rows = [r for r in results["rows"] if r["row"].endswith(":search:gptq:stage1:lead") and "pte" in r]
    if not rows:
        return []
    lines = ["", f"`.pte` on the QNN HTP simulator (bench/fidelity.py, SoC {ev['soc']}): the `quantnpu` rows lowered to one "
             f"integer-only delegate, {ev['windows']} x {ev['seq_len']}-token evaluation windows (calibration "
             f"{ev['calibration_windows']} x {ev['seq_len']}, the same number of tokens), so the ppl is not comparable "
             "with the 512-token columns above; the fake-quant graph on the same windows is beside it. Stage one there "
             "runs at StageOneConfig's default rotation learning rate (0.1) at every config; Table 1 uses 2.0 with 4-bit weights.", "",
             "| row | float | fake-quant | .pte | .pte vs fake-quant | delegates |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| quantnpu:{r['bits']}:{r['promotion']} | {r['float']:.3f} | {r['fake_quant']:.3f} | {r['pte']:.3f} | "
                     f"{100 * (r['pte'] / r['fake_quant'] - 1):+.2f}% | {r['delegates']} |")
    return lines


def bench_main(script: str, description: str, default_rows: list[str], setup_of, write, name: str, reuse=()) -> int:
    """The command line of table1.py and ablation.py: validate the rows, then run each in its own
    process (`--one ROW` is that process), merging into bench/results/<name>.{json,md}."""
    parser = arguments(description, default_rows)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / name))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.seq_len, args.eval_windows, args.calib_windows, args.steps, args.last_word, setup_of)))
        return 0
    for row in args.rows:
        try:
            if row != FLOAT_ROW:
                setup_of(row, [], args.steps)
        except ValueError as error:
            parser.error(str(error))
    return run_rows(script, args.rows, args, Path(args.out), write, setup_of, reuse)


if __name__ == "__main__":
    sys.exit(bench_main(__file__, __doc__.splitlines()[0], DEFAULT_ROWS, row_setup, write, "table1"))
