"""InsertStaticObservers and StaticCalibration (stage two): fixed encodings for every tensor.

InsertStaticObservers puts one `EncodingObserver` on every tensor QNN will see quantized: it runs
PT2E's `prepare_pt2e` with `QuantNpuQuantizer(observe=True)`, so the placement and sharing are the
ones the quantizer uses at conversion (views and permutes share their input's observer). Then it
names each tensor (bit-plan labels such as `layers.3.q_proj.output`), gives it bits from the
`BitPlan`, and gives the edges that re-quantize (a linear's input, the inputs of the op making K)
their bits. All of that is written on the nodes (`node.meta["quantnpu"]`): observer nodes carry the
tensor's labels and bits, consumers carry `input_bits` for their re-quantizing edges.

Legalization for QNN HTP (on by default): an HTP op reads and writes one activation width (an 8-bit
FullyConnected cannot write 16 bits, an ElementWiseAdd cannot mix 8- and 16-bit inputs). Each op
runs at the widest of its output and input bits. An input tensor narrower than that is widened on
its edge, which is lossless (the 8-bit grid is part of the 16-bit grid with scale s/256). A bit
count the plan set lower than the op's width is raised, and each raise is reported as a deviation
from the plan (with 8-8-8: gate_proj reads 16 bits because it writes 16). The op that makes a K/V
tensor runs at KV bits (its inputs are re-quantized), so K/V really are KV-bit tensors. An op with
a 4-bit activation (A = 4) cannot run on HTP at all; it keeps the plan and is fake-quant only.

StaticCalibration runs the calibration batches through the observed graph (statistics stream, no
batch is kept), then sets every encoding with the initialization rule (METHOD.md): Mean-based if
rotated and bits <= 4, Max-Min otherwise; weights per output channel. The min/max it uses are the
global extremes over all calibration windows (not a moving average). Each observer then becomes a
fixed fake-quantizer, so the returned GraphModule is the fake-quant model, and each encoding is also
recorded on the node of the tensor it quantizes (what `QuantNpuQuantizer` reads).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from tqdm import tqdm

from quantnpu.errors import GraphStructureError
from quantnpu.memory import release_freed_memory
from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.meta import NodeInfo, node_info, set_node_info, update_node_info
from quantnpu.passes.prepare_for_qnn import PrepareForQnn
from quantnpu.quantizers.bit_plan import BitPlan
from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.init_rules import choose_rule, mean_based_scale, max_min_scale
from quantnpu.quantizers.observers import EncodingObserver, float32_exact, is_finite_stats
from quantnpu.quantizers.quantnpu_quantizer import (
    LINEARS,
    MATMULS,
    make_quantnpu_quantizer,
    strip_observers,
)

# Linears whose weight is rotated on its output side by R1 (METHOD.md: every fused weight counts).
_R1_WRITERS = ("o_proj", "down_proj")
_SOFTMAX = {torch.ops.aten._softmax.default, torch.ops.aten.softmax.int, torch.ops.aten._safe_softmax.default}


@dataclass
class ObservedTensor:
    """One observer module: the tensors it sees (a tensor and the views sharing its encoding)."""

    module: EncodingObserver
    nodes: list[torch.fx.Node] = field(default_factory=list)  # the observer call nodes
    labels: set[str] = field(default_factory=set)
    rotated: bool = False
    weight: bool = False
    bits: int = 16
    why: str = ""


def observed_tensors(gm: torch.fx.GraphModule) -> dict[int, ObservedTensor]:
    """Every EncodingObserver in `gm` with the observer nodes that call it, in graph order."""
    groups: dict[int, ObservedTensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, EncodingObserver):
                groups.setdefault(id(module), ObservedTensor(module)).nodes.append(node)
    return groups


def _observer_group(gm, groups, node) -> ObservedTensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return groups.get(id(module))
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
        if node.target in _SOFTMAX:
            return True
        if not node.all_input_nodes:
            return False
        node = node.all_input_nodes[0]
    return False


def label_tensors(gm: torch.fx.GraphModule, groups: dict[int, ObservedTensor]) -> None:
    """Labels, rotated flags and weight flags for each observed tensor, from the ops that read it."""
    # R1 applied: a reader of the residual stream has a rotated input (R2 alone rotates only o_proj's)
    model_rotated = any((i := node_info(n)) is not None and i.rotated and i.kind != "o_proj" for n in gm.graph.nodes if n.target in LINEARS)
    for node in gm.graph.nodes:
        info = node_info(node)
        if node.target in LINEARS and info is not None:
            if (group := _observer_group(gm, groups, node.args[0])) is not None:
                group.rotated |= bool(info.rotated)
            if (group := _observer_group(gm, groups, node.args[1])) is not None:
                group.labels.add(f"{info.role}.weight")
                group.weight = True
                group.rotated |= bool(info.rotated) or (model_rotated and info.kind in _R1_WRITERS)
            for user in node.users:
                if (group := _observer_group(gm, groups, user)) is not None:
                    group.labels.add(f"{info.role}.output")
        elif node.target in MATMULS and len(node.args) > 1:
            if (group := _observer_group(gm, groups, node.args[1])) is not None:
                layer = _producer_layer(node.args[1])
                prefix = f"layers.{layer}" if layer is not None else "attention"
                group.labels.add(f"{prefix}.{'value' if _reads_softmax(node.args[0]) else 'key'}")
        elif node.target == torch.ops.aten.embedding.default:
            if (group := _observer_group(gm, groups, node.args[0])) is not None:
                group.labels.add("embedding.table")
                group.rotated |= model_rotated


def _group_by_tensor(groups: dict[int, ObservedTensor]) -> dict[torch.fx.Node, ObservedTensor]:
    return {node.args[0]: group for group in groups.values() for node in group.nodes}


def _activation_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Inputs the PT2E annotation quantizes as activations (not weights, biases or shared views)."""
    from torchao.quantization.pt2e.quantizer import DerivedQuantizationSpec, SharedQuantizationSpec

    annotation = node.meta.get("quantization_annotation")
    if annotation is None:
        return []
    weight = _source_tensor(node.args[1]) if node.target in LINEARS and len(node.args) > 1 else None
    return [arg for arg, spec in annotation.input_qspec_map.items()
            if not isinstance(spec, (SharedQuantizationSpec, DerivedQuantizationSpec)) and arg is not weight]


def _computes_output(node: torch.fx.Node) -> bool:
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    annotation = node.meta.get("quantization_annotation")
    return annotation is not None and annotation.output_qspec is not None and not isinstance(annotation.output_qspec, SharedQuantizationSpec)


def _ensure_info(node: torch.fx.Node) -> NodeInfo:
    if node_info(node) is None:
        kind = "weight" if node.op == "get_attr" else "tensor"
        set_node_info(node, NodeInfo(role=str(node.target) if node.op == "get_attr" else node.name, kind=kind))
    return node_info(node)


def plan_bits(gm: torch.fx.GraphModule, groups: dict[int, ObservedTensor], plan: BitPlan, legalize: bool = True) -> list[str]:
    """Bits for every observed tensor and re-quantizing edge (see the module docstring).
    Returns the deviations legalization made from the plan, one line each."""
    by_tensor = _group_by_tensor(groups)
    for group in groups.values():
        names = [n.args[0].name for n in group.nodes]
        group.bits, group.why = plan.tensor_bits(group.labels, names)
    deviations = []
    for node in gm.graph.nodes:
        inputs = [a for a in _activation_inputs(node) if a in by_tensor]
        output = by_tensor.get(node) if _computes_output(node) else None
        if not inputs and output is None:
            continue
        info = node_info(node)
        explicit: dict[torch.fx.Node, tuple[int, str]] = {}
        if node.target in LINEARS and info is not None and _source_tensor(node.args[0]) in by_tensor:
            explicit[_source_tensor(node.args[0])] = plan.input_bits(info.role, bool(info.rotated))
        elif output is not None and any(label.endswith((".key", ".value")) for label in output.labels):
            explicit = {arg: (plan.kv, "input of the op making K/V") for arg in inputs}
        edge_bits = {arg: explicit.get(arg, (by_tensor[arg].bits, ""))[0] for arg in inputs}
        width = max([*edge_bits.values()] + ([output.bits] if output is not None else []))
        # HTP has no 4-bit activations: an op reading them is fake-quant only, and kept as planned
        if legalize and min([*edge_bits.values()] + ([output.bits] if output is not None else [])) >= 8:
            for arg, (bits, why) in explicit.items():
                if bits < width:
                    deviations.append(f"%{node.name} ({info.role if info else node.name}): input %{arg.name} {bits} -> {width} bits "
                                      f"(HTP op width; plan: {why})")
            if output is not None and output.bits < width:
                deviations.append(f"%{node.name} ({info.role if info else node.name}): output {output.bits} -> {width} bits "
                                  f"(HTP op width; plan: {output.why})")
                output.bits = width
            edge_bits = dict.fromkeys(edge_bits, width)
        requantized = tuple((arg.name, bits) for arg, bits in edge_bits.items() if bits != by_tensor[arg].bits)
        if requantized:
            _ensure_info(node)
            update_node_info(node, input_bits=requantized)
    return deviations


class InsertStaticObservers(GraphPass):
    """See the module docstring. `deviations` lists what HTP legalization changed in the plan."""

    run_after = (AnnotateRoles, PrepareForQnn)
    preserves_function = False  # observers keep values, but a verifier's ids would enter their statistics

    def __init__(self, plan: BitPlan, soc: str = "SM8650", legalize: bool = True) -> None:
        self.plan = plan
        self.soc = soc
        self.legalize = legalize
        self.deviations: list[str] = []

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        observed = prepare_pt2e(gm, make_quantnpu_quantizer(self.soc, observe=True))
        groups = observed_tensors(observed)
        label_tensors(observed, groups)
        self.deviations = plan_bits(observed, groups, self.plan, self.legalize)
        for group in groups.values():
            group.module.set_storage(group.bits, weight=group.weight)
            labels = tuple(sorted(group.labels))
            for node in group.nodes:
                set_node_info(node, NodeInfo(role=node.name, kind="observer", rotated=group.rotated, bits=group.bits, labels=labels))
        return PassResult(observed, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        groups = observed_tensors(gm)
        require(bool(groups), "no observer was inserted")
        for group in groups.values():
            for node in group.nodes:
                require(node_info(node) is not None and node_info(node).bits is not None, "observer without bits", node)


def encoding_from_stats(module: EncodingObserver, bits: int, rotated: bool, where: str) -> Encoding:
    """The initialization rule applied to what `module` observed."""
    try:
        stats = module.stats.tensor_stats()
    except ValueError:
        raise GraphStructureError("observer saw no data: run the calibration batches through the graph", where) from None
    if not is_finite_stats(stats):
        raise GraphStructureError(f"observed values are not finite (min {float(stats.minimum.min())}, max {float(stats.maximum.max())})", where)
    rule = choose_rule(rotated, bits, where)
    scale = mean_based_scale(stats, bits) if rule == "mean" else max_min_scale(stats, bits)
    weight = module.per_channel
    return Encoding(
        bits=bits, scale=float32_exact(scale), zero_point=0, symmetric=True,
        axis=module.ch_axis if weight else None, restricted=weight, note=rule,
    )


def record_encoding(node: torch.fx.Node, encoding: Encoding, bits: int, labels: tuple[str, ...]) -> None:
    """Put the encoding on a tensor's own node (creating its NodeInfo if it has no role)."""
    info = _ensure_info(node)
    update_node_info(node, encoding=encoding, bits=bits, labels=labels or info.labels)


def widened(encoding: Encoding, bits: int) -> Encoding:
    """The same grid in more bits: scale / 2^(bits - b), which holds every value of `encoding` exactly."""
    shift = 2 ** (bits - encoding.bits)
    return Encoding(bits=bits, scale=tuple(s / shift for s in encoding.scale), zero_point=0, symmetric=True,
                    axis=encoding.axis, restricted=encoding.restricted, note=f"widened from {encoding.bits} bits")


class StaticCalibration(GraphPass):
    """Stage two: calibration batches in, every encoding set, the fake-quant graph out.

    The result is the float graph with `QuantNpuQuantizer`'s fixed observers (PT2E `prepare_pt2e`):
    each observer quantize-dequantizes with its encoding, on tensors and on re-quantizing edges,
    exactly where `convert_pt2e` will put quantize/dequantize ops."""

    run_after = (InsertStaticObservers,)
    preserves_function = False  # the result is the fake-quant graph

    def __init__(self, batches: Sequence[torch.Tensor], progress: bool = True, soc: str = "SM8650") -> None:
        self.batches = list(batches)
        self.progress = progress
        self.soc = soc

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        groups = observed_tensors(gm)
        require(bool(groups), "no observers: run InsertStaticObservers first")
        for group in groups.values():  # what InsertStaticObservers decided, read back from the nodes
            first = node_info(group.nodes[0])
            require(first is not None and first.bits is not None, "observer without bits", group.nodes[0])
            group.bits, group.rotated, group.labels = first.bits, bool(first.rotated), set(first.labels)
        with torch.no_grad():
            for batch in tqdm(self.batches, desc="calibrate", unit="window", disable=not self.progress):
                gm(batch)
                release_freed_memory()  # else glibc keeps each window's activations (GiBs)
        by_tensor = _group_by_tensor(groups)
        for group in groups.values():
            first = node_info(group.nodes[0])
            where = f"%{group.nodes[0].args[0].name} ({', '.join(first.labels) or 'activation'})"
            group.module.encoding = encoding_from_stats(group.module, group.bits, group.rotated, where)
            for node in group.nodes:
                update_node_info(node, encoding=group.module.encoding)
                record_encoding(node.args[0], group.module.encoding, group.bits, first.labels)
        # Re-quantizing edges: narrower by the rule from the same statistics, wider without loss.
        edge_cache: dict[tuple[int, int], Encoding] = {}
        for node in gm.graph.nodes:
            info = node_info(node)
            if info is None or not info.input_bits:
                continue
            by_name = {_source_tensor(n).name: n for n in node.all_input_nodes}
            encodings = []
            for name, bits in info.input_bits:
                source = _source_tensor(by_name[name])
                group = by_tensor[source]
                key = (id(group), bits)
                if key not in edge_cache:
                    if bits < group.bits:
                        rotated = node.target in LINEARS and bool(info.rotated)
                        edge_cache[key] = encoding_from_stats(group.module, bits, rotated, f"%{node.name} input %{name}")
                    else:
                        edge_cache[key] = widened(group.module.encoding, bits)
                encodings.append((name, edge_cache[key]))
            update_node_info(node, input_encodings=tuple(encodings))
        fake_quant = prepare_pt2e(strip_observers(gm), make_quantnpu_quantizer(self.soc))
        return PassResult(fake_quant, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        groups = observed_tensors(gm)
        for group in groups.values():
            require(group.module.encoding is not None, "observer left without an encoding", group.nodes[0])


def _source_tensor(node: torch.fx.Node) -> torch.fx.Node:
    """In the observed graph a consumer reads an observer; the tensor is the observer's input."""
    return node.args[0] if node.op == "call_module" else node


def encodings_by_tensor(gm: torch.fx.GraphModule) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """(activation encodings by node name, parameter encodings by parameter name) of a calibrated graph."""
    activations, params = {}, {}
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is None or not isinstance(info.encoding, Encoding) or info.kind == "observer":
            continue
        if node.op == "get_attr":
            params[str(node.target)] = info.encoding
        else:
            activations[node.name] = info.encoding
    return activations, params


def attach_encodings(gm: torch.fx.GraphModule, activations: dict[str, Encoding], params: dict[str, Encoding]) -> int:
    """Record encodings read from a file on the nodes they name; returns how many were attached.
    A name the graph does not have is an error naming it."""
    by_name = {n.name: n for n in gm.graph.nodes}
    by_param = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            by_param[str(node.target)].append(node)
    attached = 0
    for name, encoding in activations.items():
        if name not in by_name:
            raise GraphStructureError(f"encodings name activation {name!r}, which the graph does not have")
        record_encoding(by_name[name], encoding, encoding.bits, ())
        attached += 1
    for name, encoding in params.items():
        if name not in by_param:
            raise GraphStructureError(f"encodings name parameter {name!r}, which the graph does not have")
        for node in by_param[name]:
            record_encoding(node, encoding, encoding.bits, ())
        attached += 1
    return attached
