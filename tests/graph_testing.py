"""Helpers for graph-diff tests: build a tiny exported graph, run passes, compare the diff."""

from __future__ import annotations

import copy
import textwrap

import torch
import torch.fx

from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import tiny_llama, tiny_qwen2
from quantnpu.passes.base import GraphPass, PassManager
from quantnpu.passes.graph_text import graph_diff, graph_text

TINY = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def tiny_graph(kind: str = "llama", seq_len: int = 8, **config) -> torch.fx.GraphModule:
    return export_causal_lm(TINY[kind](**config), seq_len).module()


def run_passes(gm: torch.fx.GraphModule, passes: list[GraphPass]) -> torch.fx.GraphModule:
    return PassManager(passes).run(gm)


def assert_pass_diff(gm: torch.fx.GraphModule, passes: list[GraphPass], expected: str) -> torch.fx.GraphModule:
    """Run `passes` on a copy of `gm`; the changed lines of the printed graph must be `expected`."""
    before = graph_text(gm)
    after_gm = run_passes(copy.deepcopy(gm), passes)
    actual = graph_diff(before, graph_text(after_gm))
    expected = textwrap.dedent(expected).strip("\n")
    assert actual == expected, f"graph diff differs; actual diff:\n{actual}"
    return after_gm


def as_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph computing in float64 throughout: parameters, buffers, and the float32
    casts Hugging Face puts inside RMSNorm and RoPE (and export's assertions on them)."""
    gm = gm.double()
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.target == aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
        elif node.target == aten.to.dtype and node.args[1] == torch.float32:
            node.args = (node.args[0], torch.float64) + tuple(node.args[2:])
        elif node.target in (aten.to.dtype_layout, aten._to_copy.default) and node.kwargs.get("dtype") == torch.float32:
            node.kwargs = {**node.kwargs, "dtype": torch.float64}
        elif node.target == aten.to.device and torch.float32 in node.args:
            node.args = tuple(torch.float64 if a == torch.float32 else a for a in node.args)
    gm.recompile()
    return gm
