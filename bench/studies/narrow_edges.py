#!/usr/bin/env python3
"""What do the 16 -> 8-bit re-quantizations on linear inputs cost? The Q/DQ graph as it is, and
the same graph with each narrowing edge into a linear removed (the linear reads the 16-bit tensor).
Same setting as the `.pte` rows of bench/static.py (rotated, 4 x 128 eval windows, 32 x 128
calibration), so the numbers sit beside that `.pte` ppl.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.fx  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.graph.ops import quantize_kind  # noqa: E402
from quantnpu.graph.meta import node_info  # noqa: E402
from quantnpu.runtime_harness.perplexity import perplexity  # noqa: E402
from harness import STATIC_PTE_SETTING, Context, static_config  # noqa: E402  (bench/harness.py)


GROUPS = {"all": None, "q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "up": ("up_proj",), "down": ("down_proj",)}


def without_narrowing_linear_inputs(quantized: torch.fx.GraphModule, kinds: tuple[str, ...] | None = None
                                    ) -> tuple[torch.fx.GraphModule, int]:
    """A copy in which every linear (of `kinds`, or any) that reads an 8-bit re-quantization of a
    wider tensor reads the wider tensor itself; returns it and the number of edges changed."""
    graph = copy.deepcopy(quantized)
    changed = 0
    for node in list(graph.graph.nodes):
        if quantize_kind(node) != "dequantize" or node.args[4] != 255:  # an 8-bit (uint8) dequantize
            continue
        quantize = node.args[0]
        wider = quantize.args[0] if quantize_kind(quantize) == "quantize" else None
        if (isinstance(wider, torch.fx.Node) and quantize_kind(wider) == "dequantize" and wider.args[4] > 255
                and all(user.target == torch.ops.aten.linear.default
                        and (kinds is None or getattr(node_info(user), "kind", None) in kinds) for user in node.users)):
            node.replace_all_uses_with(wider)
            changed += 1
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph, changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="+", default=["8-8-8", "4-8-8"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "studies" / "results" / "narrow_edges"))
    args = parser.parse_args()
    context = Context(STATIC_PTE_SETTING)
    windows = context.windows
    rows = []
    for bits in args.bits:
        config = static_config(bits)
        quantized = context.converted(context.fake_quant(config)[0], config)
        qdq = perplexity(quantized, windows, f"Q/DQ {bits}").ppl
        for group, kinds in GROUPS.items():
            wide, edges = without_narrowing_linear_inputs(quantized, kinds)
            rows.append({"bits": bits, "linears": group, "qdq": qdq, "edges": edges,
                         "wide_linear_inputs": perplexity(wide, windows, f"16-bit {group} inputs {bits}").ppl})
            print(rows[-1], flush=True)
    results = {"command": "python bench/studies/narrow_edges.py " + shlex.join(sys.argv[1:]), "rows": rows}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    lines = ["# The 16 -> 8-bit re-quantization of linear inputs: what it costs", "", f"Command: `{results['command']}`", "",
             "SmolLM2-135M, rotated, 4 x 128 eval tokens (float 76.642), 32 x 128 calibration.", "",
             "| W-A-KV | Q/DQ graph | these linears read the 16-bit tensors | ppl then | edges changed |", "|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['qdq']:.3f} | {r['linears']} | {r['wide_linear_inputs']:.3f} | {r['edges']} |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
