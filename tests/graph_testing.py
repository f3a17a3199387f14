"""Helpers for graph-diff tests: build a tiny exported graph, run passes, compare the diff."""

from __future__ import annotations

import copy
import textwrap

import torch
import torch.fx

from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import tiny_llama, tiny_qwen2
from quantnpu.passes.base import GraphPass, PassManager
from quantnpu.graph.text import graph_diff, graph_text

TINY = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def tiny_graph(kind: str = "llama", seq_len: int = 8, **config) -> torch.fx.GraphModule:
    return export_causal_lm(TINY[kind](**config), seq_len).module()


def _is_decoder(gm: torch.fx.GraphModule) -> bool:
    return any(n.target == torch.ops.aten.embedding.default for n in gm.graph.nodes)


def run_passes(gm: torch.fx.GraphModule, passes: list[GraphPass]) -> torch.fx.GraphModule:
    """Run `passes`; on a decoder graph (token ids in), with the function verified after each."""
    return PassManager(passes, verify=_is_decoder(gm)).run(gm)


def assert_pass_diff(gm: torch.fx.GraphModule, passes: list[GraphPass], expected: str) -> torch.fx.GraphModule:
    """Run `passes` on a copy of `gm`; the changed lines of the printed graph must be `expected`."""
    before = graph_text(gm)
    after_gm = run_passes(copy.deepcopy(gm), passes)
    actual = graph_diff(before, graph_text(after_gm))
    expected = textwrap.dedent(expected).strip("\n")
    assert actual == expected, f"graph diff differs; actual diff:\n{actual}"
    return after_gm


def as_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph computing in float64 throughout (the verifier's cast, on a copy)."""
    from quantnpu.graph.equivalence import as_float64 as cast

    return cast(gm)


def annotated_graph(kind: str = "llama", layers: int = 1, **config) -> torch.fx.GraphModule:
    """A tiny exported decoder after FoldConstants and AnnotateRoles (without Canonicalize, so the
    export's own casts stay visible in diffs)."""
    from quantnpu.passes import AnnotateRoles, FoldConstants

    return run_passes(tiny_graph(kind, layers=layers, **config), [FoldConstants(), AnnotateRoles()])


def relative_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()
