#!/usr/bin/env python3
"""The paper's Table 1 on SmolLM2-135M-Instruct, every baseline measured the same way.

Rows `METHOD:BITS:PROMOTION` (p100: every down_proj input at 16 bits, the paper's Table 1 setting;
p10: the 10% most sensitive, AssignBitWidths), `float`, or an ExecuTorch QnnQuantizer config alone;
each is a recipe of `quantnpu.pipeline`:
- `rtn`: STATIC without rotation (at 4-4-8, 4-bit inputs on the same edges as the rotated rows, by
  override: the plan's own rule keeps an unrotated input at 8 bits or more);
- `quarot`: STATIC (random Hadamard R1/R2, static encodings);
- `spinquant`: STATIC with stage one learning R1/R2 alone under dynamic per-token activation
  quantization, then static encodings (the paper's "D" row: `optimize=rotations`, `simulate=dynamic`);
- `quantnpu-paper`: PAPER (stage one, selective LSQ scales + Cayley R1/R2, then stage two);
- `quantnpu`: SHIPPED, what `tools/lower.py` does by default (the paper's method plus smoothing
  search, GPTQ rounding of 4-bit weights and the leading-token split);
- `et-8a8w`, `et-16a4w`, `et-16a4w_block`: ExecuTorch's QnnQuantizer (no rotation).
Stage one runs `--steps` steps at rotation lr 0.1 with 8-bit weights, 2.0 with 4-bit ones.
Fake-quant perplexity on 16 x 512 Brown evaluation tokens, calibration 8 x 512, and the accuracy of
lm-eval's evaluator on the local last-word task (quantnpu.runtime_harness.lm_eval_adapter, passages of
Brown's evaluation split) with the same fake-quant graph. One row per process through bench/harness.py
(bench/results/table1.{json,md}); bench/ablation.py and bench/fig4.py measure the same way.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import RESULTS, Bench, Context, RowConfig, Setting, main, perplexity, rotation_lr  # noqa: E402

METHODS = ("rtn", "quarot", "spinquant", "quantnpu-paper", "quantnpu")
ET_CONFIGS = ("et-8a8w", "et-16a4w", "et-16a4w_block")
FLOAT_ROW = "float"
ROTATABLE_INPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")  # FuseRotations' R1/R2 readers
CONFIGS = ("8-8-8", "4-8-8", "4-4-8")
DEFAULT_ROWS = ([FLOAT_ROW] + [f"{m}:{b}:{p}" for b in CONFIGS for p in ("p100", "p10") for m in METHODS] + list(ET_CONFIGS))
TITLES = {"rtn": "RTN static (no rotation)", "quarot": "QuaRot-style (Hadamard, static)",
          "spinquant": "SpinQuant-style (learned R, dynamic -> static)", "quantnpu-paper": "quantnpu, the paper's method (stage one + two)",
          "quantnpu": "quantnpu (+ smoothing, GPTQ, leading-token split)"}
SETTING = Setting(seq_len=512, eval_windows=16, calib_windows=8, steps=32, last_word=100)


def check_bits(row: str, bits: str) -> None:
    from quantnpu.errors import QuantNpuError
    from quantnpu.quantizers.bit_plan import BitPlan

    try:
        BitPlan.parse(bits)
    except QuantNpuError as error:
        raise ValueError(f"row {row!r}: {error}") from None


def row_config(row: str, setting: Setting) -> RowConfig:
    """The pipeline arguments of a row (see the module docstring)."""
    from quantnpu.passes.learn_encodings import StageOneConfig
    from quantnpu.pipeline import PAPER, SHIPPED, STATIC

    if row == FLOAT_ROW:
        return RowConfig(None)  # the exported graph, no pass
    if row in ET_CONFIGS:
        return RowConfig(row, recipe=STATIC.replace(rotate="none"))
    parts = row.split(":")
    method, bits, promotion = parts if len(parts) == 3 else ("", "", "")
    if method not in METHODS or promotion not in ("p10", "p100"):
        raise ValueError(f"row {row!r}: write METHOD:BITS:p10|p100 with METHOD one of {', '.join(METHODS)}, "
                         f"or {FLOAT_ROW}, or one of {', '.join(ET_CONFIGS)}")
    check_bits(row, bits)
    overrides = ["*.down_proj.input=16"] if promotion == "p100" else []
    if method == "rtn" and int(bits.split("-")[1]) < 8:
        # the plan keeps an unrotated input at 8 bits or more; the RTN baseline's A applies to the same
        # edges as the rotated methods' (the inputs R1/R2 would rotate), so it is asked for explicitly
        overrides += [f"*.{kind}.input={bits.split('-')[1]}" for kind in ROTATABLE_INPUTS]
    fraction = 0.1 if promotion == "p10" else 0.0
    learned = StageOneConfig(steps=setting.steps, lr_rotation=rotation_lr(bits))
    recipe = {
        "rtn": lambda: STATIC.replace(rotate="none", promote_fraction=fraction),
        "quarot": lambda: STATIC.replace(promote_fraction=fraction),
        "spinquant": lambda: STATIC.replace(promote_fraction=fraction, stage_one=StageOneConfig(
            steps=setting.steps, optimize="rotations", simulate="dynamic", init="maxmin", lr_rotation=rotation_lr(bits))),
        "quantnpu-paper": lambda: PAPER.replace(promote_fraction=fraction, stage_one=learned),
        "quantnpu": lambda: SHIPPED.replace(promote_fraction=fraction, stage_one=learned),
    }[method]()
    return RowConfig(bits, tuple(overrides), recipe)


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    """Fake-quant ppl and the last-word task of one row (the float row: the exported graph as is)."""
    from quantnpu.models.corpus import brown_split
    from quantnpu.passes.learn_encodings import LearnEncodings
    from quantnpu.pipeline import find_pass
    from quantnpu.runtime_harness.lm_eval_adapter import evaluate_last_word

    stage_one = None
    if config.recipe is None:  # the baseline every cell is read against, measured the same way
        fq, seconds = context.graph, 0.0
    else:
        fq, passes, seconds = context.fake_quant(config)
        learner = find_pass(passes, LearnEncodings)
        stage_one = learner.summary() if learner is not None else None
    ppl = perplexity(fq, context.windows, row if row == FLOAT_ROW else f"fake-quant {row}")
    documents = context.setting.last_word
    with tempfile.TemporaryDirectory() as work:
        lastword = evaluate_last_word(fq, context.tokenizer, context.setting.seq_len, brown_split().evaluation_text, work,
                                      limit=documents, count=documents, name=row) if documents else None
    return {"ppl": ppl, "last_word": lastword, "seconds": round(seconds, 1), **({"stage_one": stage_one} if stage_one else {})}


def last_word_text(row: dict) -> str:
    """`accuracy / word perplexity` of a row's last-word task ('' if it was not measured)."""
    lw = row.get("last_word")
    return f"{100 * lw['acc']:.0f}% / {lw['word_perplexity']:.0f}" if lw else ""


def body(results: dict) -> list[str]:
    s = results["setting"]
    by_row = {r["row"]: r for r in results["rows"]}
    lines = [f"Fake-quant perplexity over {s['eval_windows']} x {s['seq_len']} Brown evaluation tokens, calibration {s['calib_windows']} x "
             f"{s['seq_len']}; stage one {s['steps']} steps. Last word: accuracy of lm-eval's evaluator on {s['last_word']} "
             "passages of the evaluation split (the local LAMBADA-style task), same fake-quant graph.", "",
             *([f"Float (the exported model, no quantization): ppl {by_row[FLOAT_ROW]['ppl']:.3f}"
                + (f", last word {last_word_text(by_row[FLOAT_ROW])}." if by_row[FLOAT_ROW].get("last_word") else "."), ""]
               if FLOAT_ROW in by_row else []),
             "| method | " + " | ".join(f"{b} {p}" for b in CONFIGS for p in ("100%", "10%")) + " |",
             "|---|" + "---|" * (2 * len(CONFIGS))]
    for method in METHODS:
        cells = []
        for bits in CONFIGS:
            for promotion in ("p100", "p10"):
                r = by_row.get(f"{method}:{bits}:{promotion}")
                cells.append("" if r is None else f"{r['ppl']:.1f}" + (f" / {last_word_text(r)}" if r.get("last_word") else ""))
        lines.append(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    steps = (f" (accuracy over {s['last_word']} passages moves in steps of {100 / s['last_word']:g}% with a standard error of ~3%: "
             "the word's perplexity separates rows better)") if s["last_word"] else ""
    lines += ["", f"Cells: ppl / last-word accuracy / the last word's perplexity{steps}. 100%: every "
              "down_proj input at 16 bits (the paper's Table 1 setting); 10%: the most sensitive 10% (3 of 30).", "",
              "| ExecuTorch QnnQuantizer | ppl | last word: accuracy / word ppl |", "|---|---|---|"]
    for config in ET_CONFIGS:
        r = by_row.get(config)
        if r is not None:
            lines.append(f"| {config} | {r['ppl']:.1f} | {last_word_text(r)} |")
    return lines + pte_lines(RESULTS / "fidelity.json")


def pte_lines(fidelity: Path) -> list[str]:
    """The `.pte` rows: bench/fidelity.py lowers the `quantnpu` rows (its notation `BITS:p10:search:gptq:
    stage1:lead`) and runs them on the HTP simulator, on windows short enough for the simulator."""
    import json

    if not fidelity.is_file():
        return []
    results = json.loads(fidelity.read_text())
    s = results["setting"]
    rows = [r for r in results["rows"] if r["row"].endswith(":search:gptq:stage1:lead") and "pte" in r]
    if not rows:
        return []
    lines = ["", f"`.pte` on the QNN HTP simulator (bench/fidelity.py, SoC {s['soc']}): the `quantnpu` rows lowered to one "
             f"integer-only delegate, {s['eval_windows']} x {s['seq_len']}-token evaluation windows (calibration "
             f"{s['calib_windows']} x {s['seq_len']}), so the ppl is not comparable with the 512-token columns above; the "
             "fake-quant graph on the same windows is beside it. Stage one there runs at StageOneConfig's default rotation "
             "learning rate (0.1) at every config; Table 1 uses 2.0 with 4-bit weights.", "",
             "| row | float | fake-quant | .pte | .pte vs fake-quant | delegates | commit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bits, promotion = r["row"].split(":")[:2]
        lines.append(f"| quantnpu:{bits}:{promotion} | {r['float']:.3f} | {r['fake_quant']:.3f} | {r['pte']:.3f} | "
                     f"{100 * (r['pte'] / r['fake_quant'] - 1):+.2f}% | {r['delegates']} | {str(r.get('commit', ''))[:10]} |")
    return lines


BENCH = Bench(name="table1", script=__file__, title="Table 1: SmolLM2-135M-Instruct, every method measured the same way",
              setting=SETTING, default_rows=DEFAULT_ROWS, config=row_config, measure=measure, body=body,
              description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
