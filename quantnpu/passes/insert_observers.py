"""InsertStaticObservers: one statistics observer on every tensor QNN will see quantized, named.

It runs PT2E's `prepare_pt2e` with `QuantNpuQuantizer(observe=True)`, so the placement and sharing
are the ones the quantizer uses at conversion (views and permutes share their input's observer).
Then it names each observed tensor from the ops that make and read it (bit-plan labels such as
`layers.3.q_proj.output`, `layers.3.key`, `embedding.table`), and records whether it is a weight
and whether its values are rotated, in a `TensorQuant` on each observer node. Bits come next
(`PlanBitWidths`), encodings after calibration (`StaticCalibration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.graph.ops import EMBEDDING, LINEAR, SOFTMAX
from quantnpu.graph.meta import TensorQuant, node_info, tensor_quant, update_tensor_quant
from quantnpu.passes.prepare_for_qnn import PrepareForQnn
from quantnpu.quantizers.observers import EncodingObserver
from quantnpu.quantizers.quantnpu_quantizer import MATMULS, QuantNpuQuantizer

# Linears whose weight is rotated on its output side by R1 (METHOD.md: every fused weight counts).
_R1_WRITERS = ("o_proj", "down_proj")


@dataclass
class ObservedTensor:
    """One observer module: the tensors it sees (a tensor and the views sharing its encoding)."""

    module: EncodingObserver
    nodes: list[torch.fx.Node] = field(default_factory=list)  # the observer call nodes
    labels: set[str] = field(default_factory=set)
    rotated: bool = False
    weight: bool = False

    @property
    def record(self) -> TensorQuant:
        """The quantization record of its first observer node (all of them carry the same)."""
        return tensor_quant(self.nodes[0]) or TensorQuant()

    @property
    def tensor(self) -> torch.fx.Node:
        return self.nodes[0].args[0]


def observed_tensors(gm: torch.fx.GraphModule) -> dict[int, ObservedTensor]:
    """Every EncodingObserver in `gm` with the observer nodes that call it, in graph order."""
    groups: dict[int, ObservedTensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, EncodingObserver):
                groups.setdefault(id(module), ObservedTensor(module)).nodes.append(node)
    return groups


def by_tensor(groups: dict[int, ObservedTensor]) -> dict[torch.fx.Node, ObservedTensor]:
    """Observed groups keyed by the tensor each observer node reads."""
    return {node.args[0]: group for group in groups.values() for node in group.nodes}


def source_tensor(node: torch.fx.Node) -> torch.fx.Node:
    """In the observed graph a consumer reads an observer; the tensor is the observer's input."""
    return node.args[0] if node.op == "call_module" else node


def _observer_group(gm, groups, node) -> ObservedTensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        return groups.get(id(gm.get_submodule(node.target)))
    return None


def _producer_layer(node: torch.fx.Node, limit: int = 64) -> int | None:
    """The layer of the nearest annotated ancestor (K/V tensors carry no role of their own)."""
    frontier, seen = [node], set()
    while frontier and len(seen) < limit:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        info = node_info(current)
        if info is not None and info.layer is not None:
            return info.layer
        frontier.extend(current.all_input_nodes)
    return None


def _reads_softmax(node: torch.fx.Node, limit: int = 16) -> bool:
    for _ in range(limit):
        if node.target in SOFTMAX:
            return True
        if not node.all_input_nodes:
            return False
        node = node.all_input_nodes[0]
    return False


def residual_stream_rotated(gm: torch.fx.GraphModule) -> bool:
    """R1 applied: a reader of the residual stream has a rotated input (R2 alone rotates only o_proj's)."""
    return any((i := node_info(n)) is not None and i.input_rotated and i.kind != "o_proj"
               for n in gm.graph.nodes if n.target == LINEAR)


def weight_is_rotated(info, stream_rotated: bool) -> bool:
    """A linear weight counts as rotated when either of its sides is (METHOD.md): its input side,
    or its output side when it writes an R1-rotated residual stream."""
    return bool(info.input_rotated) or (stream_rotated and info.kind in _R1_WRITERS)


def label_tensors(gm: torch.fx.GraphModule, groups: dict[int, ObservedTensor]) -> None:
    """Labels, rotated flags and weight flags for each observed tensor, from the ops that read it."""
    model_rotated = residual_stream_rotated(gm)
    for node in gm.graph.nodes:
        info = node_info(node)
        if node.target == LINEAR and info is not None:
            if (group := _observer_group(gm, groups, node.args[0])) is not None:
                group.rotated |= bool(info.input_rotated)
            if (group := _observer_group(gm, groups, node.args[1])) is not None:
                group.labels.add(f"{info.role}.weight")
                group.weight = True
                group.rotated |= weight_is_rotated(info, model_rotated)
            for user in node.users:
                if (group := _observer_group(gm, groups, user)) is not None:
                    group.labels.add(f"{info.role}.output")
        elif node.target in MATMULS and len(node.args) > 1:
            if (group := _observer_group(gm, groups, node.args[1])) is not None:
                layer = _producer_layer(node.args[1])
                prefix = f"layers.{layer}" if layer is not None else "attention"
                group.labels.add(f"{prefix}.{'value' if _reads_softmax(node.args[0]) else 'key'}")
        elif node.target == EMBEDDING:
            if (group := _observer_group(gm, groups, node.args[0])) is not None:
                group.labels.add("embedding.table")
                group.rotated |= model_rotated


class InsertStaticObservers(GraphPass):
    """See the module docstring."""

    run_after = (AnnotateRoles, PrepareForQnn)
    preserves_function = False  # observers keep values, but a verifier's ids would enter their statistics

    def __init__(self, soc: str = "SM8650") -> None:
        self.soc = soc

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        observed = prepare_pt2e(gm, QuantNpuQuantizer(self.soc, observe=True))
        groups = observed_tensors(observed)
        label_tensors(observed, groups)
        for group in groups.values():
            for node in group.nodes:
                update_tensor_quant(node, labels=tuple(sorted(group.labels)), rotated=group.rotated, weight=group.weight)
        return PassResult(observed, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        groups = observed_tensors(gm)
        require(bool(groups), "no observer was inserted")
        for group in groups.values():
            require(tensor_quant(group.nodes[0]) is not None, "observer without a quantization record", group.nodes[0])
