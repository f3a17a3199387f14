"""StaticCalibration (stage two): calibration batches in, every encoding set, the fake-quant graph out.

It runs the batches through the observed graph (statistics stream, no batch is kept), then sets
every encoding with the initialization rule (METHOD.md): Mean-based if rotated and bits <= 4,
Max-Min otherwise; weights per output channel. The min/max it uses are the global extremes over
all calibration windows (not a moving average). Each encoding is recorded on the node of the
tensor it quantizes, and each re-quantizing edge's on its reader (what `QuantNpuQuantizer`
reads). The result is the float graph under the quantizer's fixed observers (PT2E
`prepare_pt2e`): each observer quantize-dequantizes with its encoding, on tensors and on
re-quantizing edges, exactly where `convert_pt2e` will put quantize/dequantize ops.

After stage one (`LearnEncodings`), a linear's learned input and weight encodings are kept as they
are (frozen): on the re-quantizing edge into the linear, or on the tensor itself where the linear
reads it at the tensor's own bits. A learned encoding whose bits the final plan does not give
that tensor is not used (the rule is), with a warning naming it.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx

from quantnpu.diagnostics import QuantNpuWarning
from quantnpu.errors import GraphStructureError
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.insert_observers import by_tensor, observed_tensors, source_tensor
from quantnpu.graph.meta import node_info, tensor_quant, update_tensor_quant
from quantnpu.passes.plan_bit_widths import PlanBitWidths
from quantnpu.passes.stream import LayerStream
from quantnpu.quantizers.encodings import Encoding, EncodingTable
from quantnpu.quantizers.init_rules import choose_rule, mean_based_scale, max_min_scale
from quantnpu.quantizers.observers import EncodingObserver, float32_exact, is_finite_stats
from quantnpu.graph.ops import LINEAR
from quantnpu.quantizers.quantnpu_quantizer import QuantNpuQuantizer, strip_observers


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


def widened(encoding: Encoding, bits: int) -> Encoding:
    """The same grid in more bits: scale / 2^(bits - b), which holds every value of `encoding` exactly."""
    shift = 2 ** (bits - encoding.bits)
    return Encoding(bits=bits, scale=tuple(s / shift for s in encoding.scale), zero_point=0, symmetric=True,
                    axis=encoding.axis, restricted=encoding.restricted, note=f"widened from {encoding.bits} bits")


class StaticCalibration(GraphPass):
    """See the module docstring."""

    run_after = (PlanBitWidths,)
    preserves_function = False  # the result is the fake-quant graph

    def __init__(self, batches: Sequence[torch.Tensor], progress: bool = True, soc: str = "SM8650") -> None:
        self.batches = list(batches)
        self.progress = progress
        self.soc = soc
        self.learned_used = 0                  # stage-one encodings kept
        self.learned_ignored: list[str] = []   # stage-one encodings the final plan gave other bits

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        groups = observed_tensors(gm)
        require(bool(groups), "no observers: run InsertStaticObservers first")
        for group in groups.values():
            require(group.record.bits is not None, "observer without bits: run PlanBitWidths first", group.nodes[0])
        with torch.no_grad():  # the windows layer by layer: each observer sees them in order, as in a forward each
            LayerStream(gm).run(self.batches, progress="calibrate" if self.progress else None)
        self.learned_used, self.learned_ignored = 0, []
        for group in groups.values():
            record = group.record
            where = f"%{group.tensor.name} ({', '.join(record.labels) or 'activation'})"
            learned = self._learned(_tensor_learned(group), record.bits, where)
            group.module.encoding = learned or encoding_from_stats(group.module, record.bits, record.rotated, where)
            for node in group.nodes:
                update_tensor_quant(node, encoding=group.module.encoding)
                update_tensor_quant(node.args[0], encoding=group.module.encoding, bits=record.bits, labels=record.labels)
        # Re-quantizing edges: narrower by the rule from the same statistics, wider without loss.
        tensors = by_tensor(groups)
        edge_cache: dict[tuple[int, int], Encoding] = {}
        for node in gm.graph.nodes:
            record = tensor_quant(node)
            if record is None or not record.input_bits:
                continue
            by_name = {source_tensor(n).name: n for n in node.all_input_nodes}
            encodings = []
            for name, bits in record.input_bits:
                group = tensors[source_tensor(by_name[name])]
                key = (id(group), bits)
                learned = None
                if node.target == LINEAR and record.learned_input is not None:
                    learned = self._learned({record.learned_input}, bits, f"%{node.name} input %{name}")
                if learned is not None:
                    encodings.append((name, learned))
                    continue
                if key not in edge_cache:
                    if bits < group.record.bits:
                        info = node_info(node)
                        rotated = node.target == LINEAR and info is not None and bool(info.input_rotated)
                        edge_cache[key] = encoding_from_stats(group.module, bits, rotated, f"%{node.name} input %{name}")
                    else:
                        edge_cache[key] = widened(group.module.encoding, bits)
                encodings.append((name, edge_cache[key]))
            update_tensor_quant(node, input_encodings=tuple(encodings))
        fake_quant = prepare_pt2e(strip_observers(gm, in_place=True), QuantNpuQuantizer(self.soc))
        return PassResult(fake_quant, True)

    def _learned(self, learned: set[Encoding], bits: int, where: str) -> Encoding | None:
        """The one stage-one encoding for a tensor or edge at `bits`, or None (rule)."""
        if not learned:
            return None
        if len(learned) > 1:
            raise GraphStructureError(f"{where}: stage one learned {len(learned)} different encodings for one tensor")
        encoding = next(iter(learned))
        if encoding.bits != bits:
            self.learned_ignored.append(where)
            warnings.warn(f"{where}: stage one learned a {encoding.bits}-bit encoding, the plan gives {bits} bits; "
                          "the initialization rule is used", QuantNpuWarning, stacklevel=3)
            return None
        self.learned_used += 1
        return encoding

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for group in observed_tensors(gm).values():
            require(group.module.encoding is not None, "observer left without an encoding", group.nodes[0])


def _tensor_learned(group) -> set[Encoding]:
    """Stage-one encodings of the linears that read this observed tensor at its own bits: a
    weight's, or an input's where the linear does not re-quantize it."""
    learned = set()
    for observer in group.nodes:
        for reader in observer.users:
            record = tensor_quant(reader)
            if reader.target != LINEAR or record is None:
                continue
            if group.record.weight and reader.args[1] is observer and record.learned_weight is not None:
                learned.add(record.learned_weight)
            elif (not group.record.weight and reader.args[0] is observer and record.learned_input is not None
                  and observer.args[0].name not in dict(record.input_bits)):
                learned.add(record.learned_input)
    return learned


def encodings_by_tensor(gm: torch.fx.GraphModule) -> EncodingTable:
    """Every encoding recorded on a calibrated graph: activations by node name, parameters by
    parameter name, re-quantizing edges by reader and input name."""
    activations, params, edges = {}, {}, {}
    for node in gm.graph.nodes:
        record = tensor_quant(node)
        if record is None or node.op == "call_module":
            continue
        if isinstance(record.encoding, Encoding):
            if node.op == "get_attr":
                params[str(node.target)] = record.encoding
            else:
                activations[node.name] = record.encoding
        if record.input_encodings:
            edges[node.name] = dict(record.input_encodings)
    return EncodingTable(activations, params, edges)


def attach_encodings(gm: torch.fx.GraphModule, table: EncodingTable) -> int:
    """Record a table's encodings (e.g. read from a file) on the nodes they name; returns how many
    were attached. A name the graph does not have is an error naming it."""
    by_name = {n.name: n for n in gm.graph.nodes}
    by_param = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            by_param[str(node.target)].append(node)
    attached = 0
    for name, encoding in table.activations.items():
        if name not in by_name:
            raise GraphStructureError(f"encodings name activation {name!r}, which the graph does not have")
        update_tensor_quant(by_name[name], encoding=encoding, bits=encoding.bits)
        attached += 1
    for name, encoding in table.params.items():
        if name not in by_param:
            raise GraphStructureError(f"encodings name parameter {name!r}, which the graph does not have")
        for node in by_param[name]:
            update_tensor_quant(node, encoding=encoding, bits=encoding.bits, weight=True)
        attached += 1
    for reader, inputs in table.edges.items():
        if reader not in by_name or any(name not in by_name for name in inputs):
            missing = reader if reader not in by_name else next(n for n in inputs if n not in by_name)
            raise GraphStructureError(f"encodings name a re-quantizing edge at {missing!r}, which the graph does not have")
        update_tensor_quant(by_name[reader], input_encodings=tuple(inputs.items()),
                            input_bits=tuple((n, e.bits) for n, e in inputs.items()))
        attached += 1
    return attached
