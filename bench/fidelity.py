#!/usr/bin/env python3
"""What ships is what was measured: the `.pte` on the HTP simulator against the fake-quant graph.

For each row (bench/smoothing.py's notation; default: the shipped settings, stage one + 10% +
smoothing search + GPTQ + the leading-token split, at 8-8-8 and 4-8-8), on SmolLM2-135M at 128
tokens: per evaluation window, the ppl of the float graph, the fake-quant graph, the converted Q/DQ
graph, the `.pte` on the x86 HTP simulator, and of one hypothesis model (the Q/DQ graph without the
8-bit rounding of tensors that are only read re-quantized to 16 bits: what HTP would compute if its
optimizer merged those Converts into their producer). The sign of each window's `.pte` - fake-quant
difference separates noise (mixed signs) from bias (one sign). Then the agreement check on the
first window: every quantized tensor of the `.pte` against its op recomputed in the Q/DQ graph from
the device's own inputs (quantnpu.runtime_harness.agreement), per layer.

One row per process through bench/harness.py (bench/results/fidelity.{json,md}); the row's pipeline
is bench/smoothing.py's (`quantnpu.pipeline` recipes). The agreement check is a part of the row:
`--only agreement` measures it again for rows already in the file, `--skip agreement` leaves it out.
The agreement carries its own commit and config; where they differ from the perplexities' the
markdown says so.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from harness import Bench, Context, RowConfig, Setting, config_key, main, perplexity, short_commit  # noqa: E402
from quantnpu.graph.ops import quantize_kind  # noqa: E402
from quantnpu.runtime_harness.agreement import bits_of as _bits, check_agreement, is_move as _is_move  # noqa: E402
from smoothing import parse_row, pipeline_facts, row_config  # noqa: E402  (bench/ is the script's directory)

DEFAULT_ROWS = ["8-8-8:p10:search:gptq:stage1:lead", "4-8-8:p10:search:gptq:stage1:lead"]
SETTING = Setting(seq_len=128, eval_windows=8, calib_windows=32, steps=32, soc="SM8650", agreement_layers=[0, 1, 11, 27, 28, 29])


def fidelity_config(row: str, setting: Setting) -> RowConfig:
    parse_row(row)  # the smoothing notation's rows only (no float, no pte: prefix: every row here is lowered)
    return row_config(row, setting)


def without_narrow_rounding_before_widening(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """Hypothesis 1's model: a copy of the Q/DQ graph in which each narrow tensor whose only reader
    re-quantizes it to a wider grid (through ops that only move values) is written on that wider grid
    directly, i.e. its narrow rounding is gone. Returns (graph, tensors changed)."""
    out = copy.deepcopy(gm)
    changed = 0
    for wide in list(out.graph.nodes):
        if quantize_kind(wide) != "quantize" or "per_tensor" not in str(wide.target):
            continue
        dequantize = wide.args[0]
        if not (isinstance(dequantize, torch.fx.Node) and quantize_kind(dequantize) == "dequantize"):
            continue
        narrow = dequantize.args[0]
        if quantize_kind(narrow) != "quantize" or _bits(narrow) >= _bits(wide) or len(dequantize.users) != 1:
            continue
        chain, node = [dequantize, narrow], narrow.args[0]
        while _is_move(node) and len(node.users) == 1:
            before = node.args[0]
            if quantize_kind(before) != "dequantize" or len(before.users) != 1:
                break
            quantize = before.args[0]
            if tuple(quantize.args[1:]) != tuple(narrow.args[1:]) or len(quantize.users) != 1:
                break
            chain += [before, quantize]
            node = quantize.args[0]
        if any(len(n.users) != 1 for n in chain) or quantize_kind(node) is not None:
            continue
        for n in chain:
            n.args = (n.args[0], *wide.args[1:])
        changed += 1
    out.recompile()
    return out, changed


def window_ppls(forward, windows: torch.Tensor, label: str) -> list[float]:
    return [perplexity(forward, windows[i:i + 1], f"{label} {i + 1}/{len(windows)}", progress=False) for i in range(len(windows))]


def overall(ppls: list[float]) -> float:
    """Windows have equal length: the overall ppl is the geometric mean of the windows'."""
    return math.exp(sum(math.log(p) for p in ppls) / len(ppls))


def agreement_result(quantized, window: torch.Tensor, work: Path, name: str, layers: set[int] | None) -> dict:
    """The agreement check on one window (see quantnpu.runtime_harness.agreement), summarized per bit
    width and per layer, with every tensor over the tolerance named."""
    start = time.perf_counter()
    report = check_agreement(quantized, (window,), work / f"{name}.taps.pte", layers=layers)
    by_bits: dict = {}
    for t in report.tensors:
        entry = by_bits.setdefault(t.bits, {"tensors": 0, "local_max": 0, "local_mean": 0.0, "drift_max": 0})
        entry["tensors"] += 1
        entry["local_max"] = max(entry["local_max"], t.local_max)
        entry["local_mean"] += t.local_mean
        entry["drift_max"] = max(entry["drift_max"], t.drift_max)
    for entry in by_bits.values():
        entry["local_mean"] /= entry["tensors"]
    return {"layers": sorted(layers) if layers else "all", "ok": report.ok, "summary": report.summary(),
            "per_layer": report.per_layer(), "failures": [t.line() for t in report.failures()],
            "unobserved": len(report.unobserved), "by_bits": by_bits, "seconds": round(time.perf_counter() - start, 1)}


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    s = context.setting
    layers = set(s.agreement_layers) if s.agreement_layers else None
    fq, passes, seconds = context.fake_quant(config)
    quantized = context.converted(fq, config)
    windows = context.windows
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if part == "agreement":
            return {"agreement": agreement_result(quantized, windows[:1], work, "row", layers)}
        hypothesis, widened = without_narrow_rounding_before_widening(quantized)
        lowered = lower_to_qnn(quantized, (windows[:1],), work / "row.pte", soc=s.soc)
        pte = PteModel(lowered.pte_path)
        per_window = {
            "float": window_ppls(context.float_graph(), windows, "float"),
            "fake_quant": window_ppls(fq, windows, "fake-quant"),
            "qdq": window_ppls(quantized, windows, "Q/DQ"),
            "pte": window_ppls(pte, windows, ".pte"),
            "hypothesis_no_narrow_rounding": window_ppls(hypothesis, windows, "hypothesis"),
        }
        del pte
        facts = pipeline_facts(passes, row)
        facts.pop("smoothing_layers", None)
        result = {"seconds": round(seconds, 1), **facts, "per_window": per_window, **{k: overall(v) for k, v in per_window.items()},
                  "widened_tensors": widened, "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
                  "mib": lowered.size_bytes / 2**20, "lower_seconds": round(lowered.seconds, 1)}
        result["relative_gap"] = (result["pte"] - result["fake_quant"]) / result["fake_quant"]
        if "agreement" not in skip:
            result["agreement"] = agreement_result(quantized, windows[:1], work, "row", layers)
    return result


def provenance(r: dict) -> str:
    """'' when the row's agreement was measured with its perplexities; else what differs."""
    a = r.get("agreement")
    if not isinstance(a, dict) or "commit" not in a:
        return ""
    notes = []
    if (a.get("commit"), a.get("dirty")) != (r.get("commit"), r.get("dirty")):
        notes.append(f"the agreement check was measured at commit {short_commit(a)}, the perplexities above at {short_commit(r)}")
    if a.get("config") is not None and r.get("config") is not None and config_key(a["config"]) != config_key(r["config"]):
        notes.append("with another configuration of the row's pipeline (see the JSON's `config` of each)")
    return ("**Not one measurement:** " + "; ".join(notes) + ".") if notes else ""


def body(results: dict) -> list[str]:
    s = results["setting"]
    layers = s.get("agreement_layers") or "all"
    lines = [f"{s['eval_windows']} x {s['seq_len']}-token windows of Brown's evaluation split, calibration {s['calib_windows']} x "
             f"{s['seq_len']}, SoC {s['soc']}, stage one {s['steps']} steps. Rows in bench/smoothing.py's notation (bits : promotion : "
             "smoothing : rounding [: stage one] [: leading-token split]).", "",
             "| row | float | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | windows .pte < / > fake-quant | hypothesis: no narrow rounding before a widening | delegates | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        signs = [p - f for p, f in zip(r["per_window"]["pte"], r["per_window"]["fake_quant"])]
        lines.append(f"| {r['row']} | {r['float']:.3f} | {r['fake_quant']:.3f} | {r['qdq']:.3f} | {r['pte']:.3f} | "
                     f"{100 * r['relative_gap']:+.2f}% | {sum(x < 0 for x in signs)} / {sum(x > 0 for x in signs)} | "
                     f"{r['hypothesis_no_narrow_rounding']:.3f} ({r['widened_tensors']} tensors) | {r['delegates']} | {short_commit(r)} |")
    for r in results["rows"]:
        w = r["per_window"]
        lines += ["", f"## {r['row']}: per window", "",
                  "| window | float | fake-quant | Q/DQ | .pte | .pte - fake-quant | sign | hypothesis |", "|---|---|---|---|---|---|---|---|"]
        for i in range(len(w["pte"])):
            d = w["pte"][i] - w["fake_quant"][i]
            lines.append(f"| {i} | {w['float'][i]:.3f} | {w['fake_quant'][i]:.3f} | {w['qdq'][i]:.3f} | {w['pte'][i]:.3f} | "
                         f"{d:+.3f} ({100 * d / w['fake_quant'][i]:+.2f}%) | {'-' if d < 0 else '+'} | {w['hypothesis_no_narrow_rounding'][i]:.3f} |")
        if "agreement" in r:
            a = r["agreement"]
            lines += ["", f"Agreement check on window 0, tensors of layers {a.get('layers', layers)} and the model's own ({a['seconds']:.0f} s; "
                      f"commit {short_commit(a) if 'commit' in a else short_commit(r)}): {a['summary']}", ""]
            note = provenance(r)
            if note:
                lines += [note, ""]
            lines += ["| bits | tensors | largest local difference (steps) | mean local difference (steps) | largest drift from the Q/DQ graph run alone (steps) |",
                      "|---|---|---|---|---|"]
            for bits, e in sorted(a["by_bits"].items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {bits} | {e['tensors']} | {e['local_max']} | {e['local_mean']:.4f} | {e['drift_max']} |")
            lines += ["", "Per layer, the tensor with the largest local difference:", "", "```", a["per_layer"], "```"]
            if a.get("failures"):
                lines += ["", "Every tensor over the tolerance:", "", "```", *a["failures"], "```"]
        else:
            lines += ["", "No agreement check for this row (measured with `--skip agreement` or `--no-agreement`)."]
    return lines


BENCH = Bench(name="fidelity", script=__file__, title="Fidelity: the `.pte` on the HTP simulator against the fake-quant graph "
              "(SmolLM2-135M-Instruct)", setting=SETTING, default_rows=DEFAULT_ROWS, config=fidelity_config, measure=measure,
              body=body, parts=("agreement",), description=__doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main(BENCH))
