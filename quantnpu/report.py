"""`quantnpu report`: one self-contained HTML page about a quantization run.

It reads the run record `tools/lower.py` writes beside the `.pte` and, for the activation figures,
the model the record names (or `--model`): the input of one layer's q_proj without and with the
rotations (the paper's Fig. 5/6: value histogram and per-channel range), the sensitivity of every
down_proj input with the promoted ones marked, the bit width of every linear's input, weight and
output per layer, the stage-one loss curve, the ppl table and the seconds per stage. The figures are
PNGs embedded in the page, so the one file is the whole report.
"""

from __future__ import annotations

import base64
import copy
import html
import io
from pathlib import Path

import torch
import torch.fx

from quantnpu.errors import InputFileError, QuantNpuError
from quantnpu.fileio import atomic_write_text, read_json_file
from quantnpu.graph.meta import LAYER_LINEARS, node_info
from quantnpu.graph.ops import quantize_kind


def _bits_of_dequantize(node) -> int | None:
    if not isinstance(node, torch.fx.Node) or quantize_kind(node) != "dequantize":
        return None
    # (input, scale, zero_point, [axis,] quant_min, quant_max, dtype); a restricted range (-127..127) counts as its width
    low, high = (int(node.args[4]), int(node.args[5])) if "per_channel" in str(node.target) else (int(node.args[3]), int(node.args[4]))
    return (high - low).bit_length()


def linear_bit_grid(quantized: torch.fx.GraphModule) -> list[dict]:
    """Per decoder linear of a converted (Q/DQ) graph, the bits it really reads and writes: its
    activation input, its weight, its output (from the graph's own Q/DQ ops). A linear split by the
    leading-token split appears once (its copies read and write the same widths unless overridden)."""
    rows = []
    for node in quantized.graph.nodes:
        info = node_info(node)
        if info is None or node.target != torch.ops.aten.linear.default or info.layer is None or info.kind not in LAYER_LINEARS:
            continue
        output = next((u for u in node.users if quantize_kind(u) == "quantize"), None)
        out_bits = (int(output.args[4]) - int(output.args[3])).bit_length() if output is not None else None
        rows.append({"layer": info.layer, "linear": info.kind, "input": _bits_of_dequantize(node.args[0]),
                     "weight": _bits_of_dequantize(node.args[1]), "output": out_bits})
    return rows


def q_proj_inputs(model_path: str | Path, layer: int, seq_len: int, windows: int = 1) -> dict[str, torch.Tensor]:
    """The input of `layers.<layer>.q_proj` ([tokens, hidden]) on Brown evaluation windows, through the
    float passes without and with the rotations (random Hadamard R1/R2)."""
    from quantnpu.models.corpus import split_tokens, token_windows
    from quantnpu.models.export import load_pt2
    from quantnpu.models.smollm2 import load_tokenizer
    from quantnpu.passes import PassManager
    from quantnpu.pipeline import pipeline

    program = load_pt2(model_path)
    ids = token_windows(split_tokens(load_tokenizer(), "evaluation"), seq_len, windows)
    out = {}
    for name, rotate in (("unrotated", "none"), ("rotated", "hadamard")):
        gm = PassManager(pipeline(rotate=rotate), verify=False).run(copy.deepcopy(program.module()))
        target = next((n for n in gm.graph.nodes if node_info(n) is not None and node_info(n).role == f"layers.{layer}.q_proj"), None)
        if target is None:
            raise QuantNpuError(f"{model_path}: no layers.{layer}.q_proj in the graph")
        captured = []

        class _Capture(torch.fx.Interpreter):
            def run_node(self, n):
                if n is target:
                    captured.append(self.env[n.args[0]].detach().reshape(-1, self.env[n.args[0]].shape[-1]).clone())
                return super().run_node(n)

        with torch.no_grad():
            for window in ids:
                _Capture(gm).run(window.unsqueeze(0))
        out[name] = torch.cat(captured)
    return out


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure_activations(values: dict[str, torch.Tensor], layer: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 6))
    for row, (name, x) in enumerate(values.items()):
        flat = x.double().flatten()
        std = flat.std()
        kurtosis = float((((flat - flat.mean()) / std) ** 4).mean())
        axes[row][0].hist(flat.numpy(), bins=200, log=True, color="C0" if row == 0 else "C1")
        axes[row][0].set_title(f"layers.{layer}.q_proj input, {name}: kurtosis {kurtosis:.1f}, max/std {float(flat.abs().max() / std):.1f}")
        axes[row][0].set_xlabel("value")
        axes[row][1].bar(range(x.shape[-1]), x.abs().amax(0).numpy(), width=1.0, color="C0" if row == 0 else "C1")
        axes[row][1].set_title(f"{name}: max |x| per channel")
        axes[row][1].set_xlabel("channel")
    figure.tight_layout()
    return _png(figure)


def _figure_sensitivity(inputs: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 3.2))
    layers = [int(s["role"].split(".")[1]) for s in inputs]
    axis.bar(layers, [s["r"] for s in inputs], color=["C3" if s["promoted"] else "C0" for s in inputs])
    axis.set_xlabel("layer")
    axis.set_ylabel("r = ||X - x_hat|| / ||X||")
    axis.set_title("down_proj input sensitivity at 8-bit Max-Min (red: promoted to 16 bits)")
    return _png(figure)


def _figure_bits(grid: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [k for k in LAYER_LINEARS if any(r["linear"] == k for r in grid)]
    layers = sorted({r["layer"] for r in grid})
    columns = [(k, part) for k in kinds for part in ("input", "weight", "output")]
    table = np.full((len(layers), len(columns)), np.nan)
    for r in grid:
        for part in ("input", "weight", "output"):
            if r[part] is not None:
                table[layers.index(r["layer"]), columns.index((r["linear"], part))] = r[part]
    figure, axis = plt.subplots(figsize=(12, 0.22 * len(layers) + 1.8))
    colors = {4: 0, 8: 1, 16: 2}
    shown = np.vectorize(lambda b: colors.get(int(b), 1) if b == b else np.nan)(table)
    axis.imshow(shown, aspect="auto", cmap=matplotlib.colors.ListedColormap(["#d95f02", "#7fc97f", "#386cb0"]), vmin=0, vmax=2)
    for i in range(len(layers)):
        for j in range(len(columns)):
            if table[i, j] == table[i, j]:
                axis.text(j, i, str(int(table[i, j])), ha="center", va="center", fontsize=6)
    axis.set_xticks(range(len(columns)), [f"{k}.{p[0]}" for k, p in columns], rotation=90, fontsize=7)
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
    axis.set_ylabel("layer")
    axis.set_title("bits per linear: input (i), weight (w), output (o); orange 4, green 8, blue 16")
    return _png(figure)


def _figure_loss(loss: list[float], epoch: int) -> str:
    """Each step's loss (one batch, so it moves with the batch's own difficulty) and its mean over
    the last `epoch` steps (one pass over the calibration batches), where the trend shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    steps = range(1, len(loss) + 1)
    axis.plot(steps, loss, marker=".", alpha=0.5, label="per step")
    if 1 < epoch < len(loss):
        running = [sum(loss[i - epoch + 1:i + 1]) / epoch for i in range(epoch - 1, len(loss))]
        axis.plot(steps[epoch - 1:], running, linewidth=2, label=f"mean of the last {epoch} steps")
        axis.legend()
    axis.set_xlabel("step")
    axis.set_ylabel("task loss")
    axis.set_title("stage one: task loss")
    return _png(figure)


def _steps_per_pass(record: dict) -> int:
    """Stage-one steps that see every calibration window once (batch windows a step): the record's own
    (LearnEncodings.summary), or derived for a record written before it kept one."""
    if record["stage_one"].get("steps_per_pass"):
        return int(record["stage_one"]["steps_per_pass"])
    windows = record.get("calibration", {}).get("windows") or 0
    return max(1, -(-int(windows) // int(record["stage_one"].get("batch") or 1)))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(record_path: str | Path, output: str | Path | None = None, model: str | Path | None = None,
                 layer: int | None = None, windows: int = 1) -> Path:
    """The report page for the run record at `record_path` (default output: beside it, `.html`)."""
    record_path = Path(record_path)
    record = read_json_file(record_path, "a run record")
    if not isinstance(record, dict) or record.get("tool") != "quantnpu-lower":
        raise InputFileError(f"{record_path}: not a run record of tools/lower.py")
    output = Path(output) if output else record_path.with_suffix(".html")
    sections = [f"<h1>quantnpu report: {html.escape(Path(record.get('pte', '')).name)}</h1>",
                _table(["model", "config", "bits", "rotation", "SoC", "sequence", "QNN delegates", ".pte MiB"],
                       [[record.get("model"), record.get("quant"), record.get("bits", "-"), record.get("rotate"), record.get("soc"),
                         record.get("seq_len"), record.get("delegates"), f"{record.get('pte_bytes', 0) / 2**20:.1f}"]])]
    decode = record.get("decode")
    if decode:
        cache_bits = sorted({c["bits"] for c in decode["k_cache"] + decode["v_cache"]})
        sections += ["<h2>Prefill + decode</h2>",
                     _table(["methods", "prefill tokens", "cache slots", "decode tokens", "leading tokens", "cache bits", "EOS ids"],
                            [[", ".join(decode["methods"]), decode["prefill_tokens"], decode["cache_slots"], decode["decode_tokens"],
                              decode["leading_tokens"], "/".join(map(str, cache_bits)), ", ".join(map(str, decode["eos_ids"])) or "-"]]),
                     "<p>Integer I/O: " + html.escape("; ".join(f"{m}: {', '.join(io)}" for m, io in decode.get("quantized_io", {}).items()))
                     + "</p>"]
    evaluation = record.get("evaluation")
    if evaluation:
        names = {"float_graph": "float (input graph)", "fake_quant": "fake-quant (Q/DQ graph)", "pte_htp_simulator": ".pte on the HTP simulator"}
        sections += [f"<h2>Perplexity ({evaluation['windows']} windows of {html.escape(evaluation['text'])})</h2>",
                     _table(["program", "ppl", "seconds"], [[names[k], f"{v['ppl']:.3f}", f"{v['seconds']:.1f}"]
                                                            for k, v in evaluation.items() if k in names])]
    if record.get("seconds"):
        sections += ["<h2>Seconds per stage</h2>", _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in record["seconds"].items()]),
                     "<h3>Passes</h3>", _table(["pass", "seconds", "summary"], [[p["name"], f"{p['seconds']:.1f}", p.get("summary") or ""]
                                                                              for p in record.get("passes", [])])]
    model = model or record.get("model")
    if model and Path(model).is_file():
        layer = layer if layer is not None else _default_layer(record)
        values = q_proj_inputs(model, layer, int(record.get("seq_len", 128)), windows)
        sections += [f"<h2>Rotation: layers.{layer}.q_proj input without and with R1</h2>",
                     f'<img src="data:image/png;base64,{_figure_activations(values, layer)}">']
    else:
        sections.append(f"<p>Activation figures left out: the model {html.escape(str(model))} is not here (give --model).</p>")
    inputs = record.get("mixed_precision", {}).get("down_proj_inputs")
    if inputs:
        sections += ["<h2>Mixed precision</h2>", f'<img src="data:image/png;base64,{_figure_sensitivity(inputs)}">']
    grid = record.get("linear_bits")
    if grid:
        sections += ["<h2>Bit widths</h2>", f'<img src="data:image/png;base64,{_figure_bits(grid)}">']
    loss = record.get("stage_one", {}).get("loss")
    if loss:
        sections += ["<h2>Stage one</h2>", f'<img src="data:image/png;base64,{_figure_loss(loss, _steps_per_pass(record))}">',
                     f"<p>{len(loss)} steps, {record['stage_one'].get('seconds_per_step', float('nan')):.2f} s per step, "
                     f"orthogonality of the learned rotations {record['stage_one'].get('orthogonality', float('nan')):.1e}.</p>"]
    split = record.get("leading_split", {}).get("layers")
    if split:
        chosen = [f"layers.{s['layer']}" for s in split if s.get("split")]
        sections.append(f"<p>Leading-token split: {len(chosen)} of {len(split)} MLPs ({', '.join(chosen) or 'none'}).</p>")
    if "agreement" in record:
        sections += ["<h2>Agreement with the HTP simulator</h2>", f"<p>{html.escape(record['agreement']['summary'])}</p>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>quantnpu report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:0.5em 0}"
            "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
    atomic_write_text(output, page)
    return output


def _default_layer(record: dict) -> int:
    """The layer whose down_proj input is the most sensitive (where quantization hurts most), else 0."""
    inputs = record.get("mixed_precision", {}).get("down_proj_inputs") or []
    if not inputs:
        return 0
    return int(max(inputs, key=lambda s: s["r"])["role"].split(".")[1])
