"""BakeRotations: constant-fold the weight-side rotation ops of FuseRotations (and the smoothing
factors of SmoothUnrotatedInputs, folded the same way).

Each rotated weight (or bias) expression is evaluated in float64, cast back to the parameter's
dtype and written into the parameter it started from, which the consumer reads again directly;
then the rotation parameters are dropped. Afterwards no rotation op or R parameter remains.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.graph.ops import ancestors
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.fold_constants import evaluate_nodes, input_independent_nodes
from quantnpu.passes.folded import is_folded_target
from quantnpu.passes.fuse_rotations import FuseRotations
from quantnpu.passes.smooth_inputs import SmoothUnrotatedInputs
from quantnpu.passes.weights import replace_weight, weight_tensor


def _rotation_expressions(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, int]]:
    """(consumer, argument index) of every argument computed from a rotation parameter."""
    constant = input_independent_nodes(gm)
    found = []
    for node in gm.graph.nodes:
        for index, arg in enumerate(node.args):
            if isinstance(arg, torch.fx.Node) and arg in constant and node not in constant:
                found.append((node, index))
    return found


class BakeRotations(GraphPass):
    run_after = (FuseRotations, SmoothUnrotatedInputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        baked = False
        for consumer, index in _rotation_expressions(gm):
            expression = consumer.args[index]
            chain = set(ancestors(expression))
            if not any(n.op == "get_attr" and is_folded_target(n.target) for n in chain):
                continue  # not a rotation (FoldConstants' business)
            sources = [n for n in chain if n.op == "get_attr" and not is_folded_target(n.target)]
            if len(sources) != 1:
                raise GraphStructureError(f"rotated weight reads {len(sources)} parameters, expected 1", expression.name)
            source = sources[0]
            original = weight_tensor(gm, source)
            value = evaluate_nodes(gm, {n for n in chain if n.op == "call_function"}, compute_dtype=torch.float64)[expression]
            if value.shape != original.shape:
                raise GraphStructureError(f"rotated weight has shape {tuple(value.shape)}, its parameter {tuple(original.shape)}", expression.name)
            replace_weight(gm, source.target, value.to(original.dtype))
            consumer.update_arg(index, source)
            baked = True
        graph.eliminate_dead_code()
        for name in [n for n, _ in gm.named_parameters(recurse=False) if is_folded_target(n)]:
            if not any(node.op == "get_attr" and node.target == name for node in graph.nodes):
                delattr(gm, name)
        return PassResult(gm, baked)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n for n in gm.graph.nodes if n.op == "get_attr" and is_folded_target(n.target)]
        if left:
            raise GraphStructureError(f"rotation parameter {left[0].target} is still read by the graph", left[0].name)
        registered = [n for n, _ in gm.named_parameters() if is_folded_target(n)]
        if registered:
            raise GraphStructureError(f"rotation parameters are still registered: {', '.join(registered)}")


def baked_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph to measure activations on. Before BakeRotations every rotated or smoothed weight
    is a graph expression that each window would recompute (more work than the model itself at
    short lengths); a baked copy computes the same activations from the weights the final model
    will have. `gm` itself when nothing is left to fold."""
    if not any(n.op == "get_attr" and is_folded_target(n.target) for n in gm.graph.nodes):
        return gm
    baked = BakeRotations()(copy.deepcopy(gm)).graph_module
    baked.recompile()
    return baked
