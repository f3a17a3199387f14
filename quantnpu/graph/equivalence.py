"""Whether two graphs compute the same function: the verifier's measurement.

`FunctionCheck` runs a graph on seeded random token ids (shape and vocabulary read from the
graph) and compares its logits with the reference graph's: relative difference
`max |logits - reference| / max |reference|`, computed in float64 when the graph can be cast to
it (then what is left is the rounding of rewritten weights to their storage dtype), else in the
graph's own dtype.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.graph.ops import EMBEDDING, EXPORT_ASSERTS, fetch_attr, tensor_meta

aten = torch.ops.aten


def tolerance_for(gm: torch.fx.GraphModule) -> float:
    """1e-6 for a float64 model, 1e-4 when rewritten weights are rounded to float32 or narrower."""
    dtypes = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    return 1e-6 if dtypes == {torch.float64} else 1e-4


def sample_token_ids(gm: torch.fx.GraphModule, seed: int = 0) -> torch.Tensor:
    """Seeded random ids shaped like the graph's single integer input, below its vocabulary size."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value = tensor_meta(inputs[0]) if len(inputs) == 1 else None
    if value is None or value.dtype not in (torch.int64, torch.int32) or value.dim() != 2:
        raise GraphStructureError("the verifier needs one integer token-id input [batch, seq] with shape metadata")
    embedding = next((n for n in gm.graph.nodes if n.target == EMBEDDING), None)
    if embedding is None:
        raise GraphStructureError("the verifier found no embedding lookup to take the vocabulary size from")
    vocab = int(fetch_attr(gm, embedding.args[0].target).shape[0]) if embedding.args[0].op == "get_attr" else 2
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, tuple(value.shape), generator=generator, dtype=value.dtype)


def as_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy computing in float64 throughout: parameters, buffers, and the float32 casts models
    put inside RMSNorm and RoPE (and export's assertions on them)."""
    gm = copy.deepcopy(gm).double()
    for node in list(gm.graph.nodes):
        if node.target in EXPORT_ASSERTS:
            gm.graph.erase_node(node)
        elif node.target == aten.to.dtype and node.args[1] == torch.float32:
            node.args = (node.args[0], torch.float64) + tuple(node.args[2:])
        elif node.target in (aten.to.dtype_layout, aten._to_copy.default) and node.kwargs.get("dtype") == torch.float32:
            node.kwargs = {**node.kwargs, "dtype": torch.float64}
        elif node.target == aten.to.device and torch.float32 in node.args:
            node.args = tuple(torch.float64 if a == torch.float32 else a for a in node.args)
        elif node.target == aten.softmax.int and len(node.args) > 2 and node.args[2] == torch.float32:
            node.args = (node.args[0], node.args[1], torch.float64)
    gm.recompile()
    return gm


def logits_of(output: object) -> torch.Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise GraphStructureError("the graph's first output is not a tensor (logits)")
    return output


class FunctionCheck:
    """The reference logits of one graph on seeded ids, and the distance of another graph's."""

    def __init__(self, reference: torch.fx.GraphModule, seed: int = 0, tolerance: float | None = None) -> None:
        self.ids = sample_token_ids(reference, seed)
        self.tolerance = tolerance_for(reference) if tolerance is None else tolerance
        self.float64 = True
        self.reference = self._run(reference)

    def _run(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        with torch.no_grad():
            if self.float64:
                try:
                    return logits_of(as_float64(gm)(self.ids)).double()
                except (RuntimeError, TypeError):
                    self.float64 = False  # an op without float64 support: compare in the graph's dtype
                    if hasattr(self, "reference"):
                        raise
            return logits_of(gm(self.ids)).double()

    def difference(self, gm: torch.fx.GraphModule) -> float:
        logits = self._run(gm)
        if logits.shape != self.reference.shape:
            return float("inf")
        scale = self.reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        return float((logits - self.reference).abs().max() / scale)

    def describe(self, difference: float) -> str:
        return (f"logits differ from the input graph's by {difference:.3g} (relative, "
                f"{'float64' if self.float64 else 'graph dtype'}, seeded random ids {tuple(self.ids.shape)}; "
                f"tolerance {self.tolerance:g})")
