"""PlanBitWidths: bits for every observed tensor and every re-quantizing edge, from the `BitPlan`.

Each observed tensor gets its bits from the plan by its labels (`quantizers/bit_plan.py`); the
edges that re-quantize what they read get theirs too (a linear's input: A bits, unrotated ones at
least 8; the inputs of the op making a K/V tensor: KV bits).

Legalization for QNN HTP (on by default): an HTP op reads and writes one activation width (an 8-bit
FullyConnected cannot write 16 bits, an ElementWiseAdd cannot mix 8- and 16-bit inputs). Each op
runs at the widest of its output and input bits. An input tensor narrower than that is widened on
its edge, which is lossless (the 8-bit grid is part of the 16-bit grid with scale s/256). A bit
count the plan set lower than the op's width is raised, and each raise is recorded as a
`BitDeviation` (with 8-8-8: gate_proj reads 16 bits because it writes 16). The op that makes a K/V
tensor runs at KV bits (its inputs are re-quantized), so K/V really are KV-bit tensors. An op with a
4-bit activation (A = 4) cannot run on HTP at all; it keeps the plan and is fake-quant only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.insert_observers import InsertStaticObservers, by_tensor, observed_tensors, source_tensor
from quantnpu.graph.meta import node_info, tensor_quant, update_tensor_quant
from quantnpu.quantizers.bit_plan import BitPlan
from quantnpu.graph.ops import LINEAR


@dataclass(frozen=True)
class BitDeviation:
    """One bit width that HTP legalization raised above the plan."""

    node: str       # the op
    role: str       # its structural role, or its name
    tensor: str     # "output", or "input %<name>" for a re-quantizing edge
    planned: int
    assigned: int
    reason: str     # why the plan chose `planned`

    def describe(self) -> str:
        return (f"%{self.node} ({self.role}): {self.tensor} {self.planned} -> {self.assigned} bits "
                f"(HTP op width; plan: {self.reason})")

    __str__ = describe


def _activation_inputs(node: torch.fx.Node, by_name: dict[str, torch.fx.Node]) -> list[torch.fx.Node]:
    """Inputs the PT2E annotation quantizes as activations (not weights, biases or shared views).
    The annotation's keys are looked up by name: a copied graph's annotations still hold the
    original graph's nodes."""
    from torchao.quantization.pt2e.quantizer import DerivedQuantizationSpec, SharedQuantizationSpec

    annotation = node.meta.get("quantization_annotation")
    if annotation is None:
        return []
    weight = source_tensor(node.args[1]) if node.target == LINEAR and len(node.args) > 1 else None
    inputs = [by_name.get(arg.name) for arg, spec in annotation.input_qspec_map.items()
              if not isinstance(spec, (SharedQuantizationSpec, DerivedQuantizationSpec))]
    return [arg for arg in inputs if arg is not None and arg is not weight]


def _computes_output(node: torch.fx.Node) -> bool:
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    annotation = node.meta.get("quantization_annotation")
    return annotation is not None and annotation.output_qspec is not None and not isinstance(annotation.output_qspec, SharedQuantizationSpec)


def linear_bits(plan: BitPlan, role: str, rotated: bool, promoted: tuple[int, str] | None = None,
                legalize: bool = True) -> tuple[int, int]:
    """(input edge bits, weight bits) that PlanBitWidths gives a linear with this role, known before
    any observer exists (stage one quantizes at them): the plan's edge bits, on HTP raised to the
    width of the linear's output unless an activation is below 8 bits. StaticCalibration checks
    that the final plan agrees."""
    input_bits, _ = plan.input_bits(role, rotated, promoted)
    output_bits, _ = plan.tensor_bits([f"{role}.output"])
    weight_bits, _ = plan.tensor_bits([f"{role}.weight"])
    if legalize and min(input_bits, output_bits) >= 8:
        input_bits = max(input_bits, output_bits)
    return input_bits, weight_bits


class PlanBitWidths(GraphPass):
    """See the module docstring. `deviations` lists what HTP legalization changed in the plan."""

    run_after = (InsertStaticObservers,)
    preserves_function = False

    def __init__(self, plan: BitPlan, legalize: bool = True) -> None:
        self.plan = plan
        self.legalize = legalize
        self.deviations: list[BitDeviation] = []

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        groups = observed_tensors(gm)
        require(bool(groups), "no observers: run InsertStaticObservers first")
        tensors = by_tensor(groups)
        bits, why = {}, {}
        for key, group in groups.items():
            bits[key], why[key] = self.plan.tensor_bits(group.record.labels, [n.args[0].name for n in group.nodes])
        self.deviations = []
        by_name = {n.name: n for n in gm.graph.nodes}
        for node in gm.graph.nodes:
            inputs = [a for a in _activation_inputs(node, by_name) if a in tensors]
            output = tensors.get(node) if _computes_output(node) else None
            if not inputs and output is None:
                continue
            info = node_info(node)
            role = info.role if info is not None else node.name
            explicit: dict[torch.fx.Node, tuple[int, str]] = {}
            if node.target == LINEAR and info is not None and source_tensor(node.args[0]) in tensors:
                record = tensor_quant(node)
                promoted = None
                if record is not None and record.promoted_input_bits:
                    promoted = (record.promoted_input_bits, f"sensitivity r={record.sensitivity:.3f}, promoted")
                explicit[source_tensor(node.args[0])] = self.plan.input_bits(info.role, bool(info.input_rotated), promoted)
            elif output is not None and any(label.endswith((".key", ".value")) for label in output.record.labels):
                explicit = {arg: (self.plan.kv, "input of the op making K/V") for arg in inputs}
            edge_bits = {arg: explicit.get(arg, (bits[id(tensors[arg].module)], ""))[0] for arg in inputs}
            widths = [*edge_bits.values()] + ([bits[id(output.module)]] if output is not None else [])
            # HTP has no 4-bit activations: an op reading them is fake-quant only, and kept as planned
            if self.legalize and min(widths) >= 8:
                width = max(widths)
                for arg, (planned, reason) in explicit.items():
                    if planned < width:
                        self.deviations.append(BitDeviation(node.name, role, f"input %{arg.name}", planned, width, reason))
                if output is not None and bits[id(output.module)] < width:
                    key = id(output.module)
                    self.deviations.append(BitDeviation(node.name, role, "output", bits[key], width, why[key]))
                    bits[key] = width
                edge_bits = dict.fromkeys(edge_bits, width)
            requantized = tuple((arg.name, b) for arg, b in edge_bits.items() if b != bits[id(tensors[arg].module)])
            if requantized:
                update_tensor_quant(node, input_bits=requantized)
        for key, group in groups.items():
            group.module.set_storage(bits[key], weight=group.record.weight)
            for node in group.nodes:
                update_tensor_quant(node, bits=bits[key])
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for group in observed_tensors(gm).values():
            for node in group.nodes:
                require(tensor_quant(node) is not None and tensor_quant(node).bits is not None, "observer without bits", node)
