#!/usr/bin/env python3
"""What HTP computes for an RMSNorm: op by op (x*x, mean, +eps, rsqrt, x*r, each a 16-bit tensor) and
as one `rms_norm` op, against the Q/DQ graph that models it, on SmolLM2's own residual stream.

The `.pte` used to be better than the fake-quant graph in every run (bench/results/static.md) while
quantnpu quantized RMSNorms op by op; the gap closed when PrepareForQnn made every norm one op. This
isolates that: for the residual entering a few decoder layers (one Brown window, float model), a
Q/DQ graph of the norm alone with Max-Min 16-bit encodings from that same window, in both forms, is
run in PyTorch and lowered to the HTP simulator; each output is compared with the float norm, per
position (the leading position, whose outsized values set every encoding, apart from the rest).

Then the same two forms in the whole model (`--full-graph op_by_op|fused`, one process each): the
static rotated 8-8-8 pipeline of bench/results/static.md, with every weightless RMSNorm either left
op by op (the pipeline as it was then: `recompose_rms_norms` switched off for this run) or made one
op (as now); fake-quant, Q/DQ and `.pte` ppl over 4 x 128 tokens, and the agreement check on the
layers around the first outsized residual, which names any tensor the device computes otherwise.

    python bench/studies/rmsnorm_fidelity.py            # -> bench/studies/results/rmsnorm_fidelity.{json,md}
    python bench/studies/rmsnorm_fidelity.py --full-graph op_by_op
    python bench/studies/rmsnorm_fidelity.py --full-graph fused
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.quantizers.init_rules import TensorStats, max_min_scale  # noqa: E402

qd = torch.ops.quantized_decomposed
U16 = (0, 65535, torch.int32)  # how quantnpu's Q/DQ graphs spell a 16-bit tensor


def encoding(value: torch.Tensor) -> tuple[float, int]:
    """The 16-bit (scale, zero point) quantnpu's static calibration gives a tensor: its Max-Min rule
    (symmetric, zero point mid-grid), as in the pipeline's Q/DQ graphs."""
    return float(max_min_scale(TensorStats.of(value), 16)), 32768


def fake16(value: torch.Tensor, enc: tuple[float, int]) -> torch.Tensor:
    return qd.dequantize_per_tensor(qd.quantize_per_tensor(value, enc[0], enc[1], *U16), enc[0], enc[1], *U16)


class OpByOpNorm(torch.nn.Module):
    """x -> x*x -> mean -> +eps -> rsqrt -> x*r, every tensor on its own 16-bit grid."""

    def __init__(self, encodings: dict[str, tuple[float, int]], eps: float):
        super().__init__()
        self.encodings = encodings
        self.register_buffer("eps", torch.tensor([eps]))  # a quantized constant, as QNN wants every operand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encodings
        x = fake16(x, e["x"])
        square = fake16(x * x, e["square"])
        mean = fake16(square.mean(-1, keepdim=True), e["mean"])
        rsqrt = fake16(torch.rsqrt(fake16(mean + fake16(self.eps, e["eps"]), e["mean_eps"])), e["rsqrt"])
        return fake16(x * rsqrt, e["out"])


class FusedNorm(torch.nn.Module):
    """One rms_norm op between its 16-bit input and output."""

    def __init__(self, encodings: dict[str, tuple[float, int]], eps: float):
        super().__init__()
        self.encodings, self.eps = encodings, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake16(x, self.encodings["x"])
        return fake16(torch.rms_norm(x, [x.shape[-1]], None, self.eps), self.encodings["out"])


def op_by_op_encodings(x: torch.Tensor, eps: float) -> dict[str, tuple[float, int]]:
    square = x * x
    mean = square.mean(-1, keepdim=True)
    rsqrt = torch.rsqrt(mean + eps)
    return {"x": encoding(x), "square": encoding(square), "mean": encoding(mean), "eps": encoding(torch.tensor([eps])),
            "mean_eps": encoding(mean + eps),
            "rsqrt": encoding(rsqrt), "out": encoding(x * rsqrt)}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per position: |value - reference| / |reference| over the hidden dimension."""
    return (value - reference).norm(dim=-1)[0] / reference.norm(dim=-1)[0]


def residuals(layers: list[int], seq_len: int) -> tuple[dict[int, torch.Tensor], float]:
    """The float residual stream entering each of `layers` on the first Brown evaluation window."""
    from quantnpu.models.corpus import split_tokens, token_windows
    from quantnpu.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    window = token_windows(split_tokens(tokenizer, "evaluation"), seq_len, 1)
    with torch.no_grad():
        hidden = model(window, output_hidden_states=True).hidden_states
    eps = float(model.config.rms_norm_eps)
    return {layer: hidden[layer].float().clone() for layer in layers}, eps


def measure(x: torch.Tensor, eps: float, work: Path, label: str) -> dict:
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    reference = torch.rms_norm(x, [x.shape[-1]], None, eps)
    row = {"leading_rms": float(x[0, 0].pow(2).mean().sqrt()), "rest_rms_median": float(x[0, 1:].pow(2).mean(-1).sqrt().median())}
    encodings = op_by_op_encodings(x, eps)
    row["rest_mean_square_below_one_step"] = float((x[0, 1:].pow(2).mean(-1) < encodings["mean"][0]).float().mean())
    # where the other tokens sit on the grids the leading token sets: one step of the mean square is
    # 1/k of a token's mean square when it is k steps (its norm moves by about 1/2k)
    row["rest_mean_square_steps_median"] = float((x[0, 1:].pow(2).mean(-1) / encodings["mean"][0]).median())
    row["rest_square_zero_fraction"] = float((x[0, 1:].pow(2) < encodings["square"][0] / 2).float().mean())
    forms = {"op_by_op": OpByOpNorm(encodings, eps), "fused": FusedNorm({"x": encodings["x"], "out": encoding(reference)}, eps)}
    for form, module in forms.items():
        graph = torch.export.export(module, (x,)).module()
        qdq = graph(x)
        lowered = lower_to_qnn(graph, (x,), work / f"{label}_{form}.pte")
        device = PteModel(lowered.pte_path).outputs(x)[0].float()
        lowered.pte_path.unlink(missing_ok=True)
        for name, value in (("qdq", qdq), ("pte", device)):
            error = relative_error(value, reference)
            row[f"{form}_{name}_leading"] = float(error[0])
            row[f"{form}_{name}_rest_median"] = float(error[1:].median())
            row[f"{form}_{name}_rest_max"] = float(error[1:].max())
        row[f"{form}_pte_vs_qdq_rest_median"] = float(relative_error(device, qdq)[1:].median())
    return row


def full_graph(form: str, layers: set[int], eval_windows: int) -> dict:
    """The static rotated 8-8-8 pipeline with the weightless norms in `form` (see the docstring)."""
    import quantnpu.quantizers.quantnpu_quantizer as quantizer
    from harness import STATIC_PTE_SETTING, Context, static_config  # bench/static.py's .pte setting, not rebuilt here

    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.agreement import check_agreement
    from quantnpu.runtime_harness.perplexity import perplexity
    from quantnpu.runtime_harness.pte import PteModel

    if form == "op_by_op":
        import quantnpu.passes.prepare_for_qnn as prepare_for_qnn

        quantizer.recompose_rms_norms = lambda gm: 0  # this process only: the norms stay x*x, mean, rsqrt, mul
        prepare_for_qnn.check_norms_recomposed = lambda gm: None  # and PrepareForQnn's postcondition lets them
    context = Context(STATIC_PTE_SETTING.replace(eval_windows=eval_windows))
    windows = context.windows
    config = static_config("8-8-8")
    fq = context.fake_quant(config)[0]
    quantized = context.converted(fq, config)
    norms = sum(1 for n in quantized.graph.nodes if "rms_norm" in str(n.target))
    row = {"form": form, "rms_norm_ops": norms, "fake_quant": perplexity(fq, windows, "fake-quant").ppl,
           "qdq": perplexity(quantized, windows, "Q/DQ").ppl}
    with tempfile.TemporaryDirectory() as work:
        lowered = lower_to_qnn(copy.deepcopy(quantized), (windows[:1],), Path(work) / "model.pte")
        row["pte"] = perplexity(PteModel(lowered.pte_path), windows, ".pte").ppl
        row["delegates"] = lowered.delegates
        lowered.pte_path.unlink(missing_ok=True)
        report = check_agreement(quantized, (windows[:1],), Path(work) / "taps.pte", layers=layers)
    row["agreement"] = {"layers": sorted(layers), "summary": report.summary(), "per_layer": report.per_layer(),
                        "failures": [t.line() for t in report.failures()]}
    return row


def write(results: dict, out: Path) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    lines = ["# RMSNorm on HTP: op by op and as one op, against the Q/DQ graph (SmolLM2-135M-Instruct)", "",
             "Command:", "", f"    {results['command']}", "",
             f"The float residual entering each layer on the first {results['seq_len']}-token Brown evaluation window; 16-bit "
             "Max-Min encodings from that window for every tensor of the norm (op by op: x, x*x, mean, +eps, rsqrt, output; "
             "fused: input, output). Error: |norm - float norm| / |float norm| per position; the leading position apart "
             "from the rest (median and max over positions 1..).", "",
             "| entering layer | leading rms / rest median rms | rest: mean square in steps of its grid (median) | rest: x*x rounded to 0 | op by op: Q/DQ rest (median / max) | op by op: .pte rest | op by op: leading Q/DQ / .pte | one op: Q/DQ rest | one op: .pte rest | .pte vs Q/DQ, rest median: op by op / one op |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for layer, r in results["layers"].items():
        lines.append(
            f"| {layer} | {r['leading_rms']:.1f} / {r['rest_rms_median']:.2f} | {r['rest_mean_square_steps_median']:.1f} | "
            f"{100 * r['rest_square_zero_fraction']:.0f}% | "
            f"{r['op_by_op_qdq_rest_median']:.4f} / {r['op_by_op_qdq_rest_max']:.4f} | {r['op_by_op_pte_rest_median']:.4f} / {r['op_by_op_pte_rest_max']:.4f} | "
            f"{r['op_by_op_qdq_leading']:.4f} / {r['op_by_op_pte_leading']:.4f} | "
            f"{r['fused_qdq_rest_median']:.4f} / {r['fused_qdq_rest_max']:.4f} | {r['fused_pte_rest_median']:.4f} / {r['fused_pte_rest_max']:.4f} | "
            f"{r['op_by_op_pte_vs_qdq_rest_median']:.4f} / {r['fused_pte_vs_qdq_rest_median']:.4f} |")
    if results.get("full_graph"):
        lines += ["", "## In the whole model: static rotated 8-8-8, 4 x 128 tokens (bench/static.py's setting)", "",
                  *[f"    {r['command']}" for r in results["full_graph"].values() if "command" in r], "",
                  "| weightless RMSNorms | rms_norm ops | fake-quant | Q/DQ graph | .pte | .pte vs fake-quant | delegates |", "|---|---|---|---|---|---|---|"]
        for form, r in results["full_graph"].items():
            lines.append(f"| {form.replace('_', ' ')} | {r['rms_norm_ops']} | {r['fake_quant']:.3f} | {r['qdq']:.3f} | {r['pte']:.3f} | "
                         f"{100 * (r['pte'] - r['fake_quant']) / r['fake_quant']:+.2f}% | {r['delegates']} |")
        for form, r in results["full_graph"].items():
            a = r["agreement"]
            lines += ["", f"Agreement check, {form.replace('_', ' ')}, layers {a['layers']}: {a['summary']}", "", "```", a["per_layer"], "```"]
            if a["failures"]:
                lines += ["", "Every tensor over the tolerance:", "", "```", *a["failures"], "```"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 12, 20, 27, 29],
                        help="the residual entering these decoder layers")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench" / "studies" / "results" / "rmsnorm_fidelity"))
    parser.add_argument("--full-graph", choices=("op_by_op", "fused"),
                        help="instead: the whole model with its weightless norms in this form (kept beside the isolated results)")
    parser.add_argument("--agreement-layers", type=int, nargs="+", default=[11, 12])
    parser.add_argument("--eval-windows", type=int, default=4)
    args = parser.parse_args()
    from quantnpu.lowering import qnn_sdk

    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    out = Path(args.out)
    command = "python bench/studies/rmsnorm_fidelity.py " + shlex.join(sys.argv[1:])
    if args.full_graph:
        results = json.loads(out.with_suffix(".json").read_text())
        row = full_graph(args.full_graph, set(args.agreement_layers), args.eval_windows)
        results.setdefault("full_graph", {})[args.full_graph] = {"command": command, **row}
        write(results, out)
        return 0
    streams, eps = residuals(args.layers, args.seq_len)
    results = {"command": command, "seq_len": args.seq_len, "eps": eps, "layers": {}}
    if out.with_suffix(".json").is_file():  # the whole-model rows stay
        old = json.loads(out.with_suffix(".json").read_text())
        results.update({k: old[k] for k in ("full_graph",) if k in old})
    with tempfile.TemporaryDirectory() as work:
        for layer, x in streams.items():
            results["layers"][layer] = measure(x, eps, Path(work), f"layer{layer}")
            print(f"layer {layer}: {results['layers'][layer]}", flush=True)
    write(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
