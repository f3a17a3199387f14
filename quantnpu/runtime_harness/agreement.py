"""Where does a `.pte` stop agreeing with its fake-quant graph? A per-tensor comparison.

`check_agreement` (the user-facing check, `tools/lower.py --check-agreement`) is at the end; the
first tools below compare each tapped tensor with the reference graph run on its own.

`tap_tensors` returns a copy of a converted (Q/DQ) graph that also outputs the dequantized value of
every quantized tensor it is asked about; lowering that copy and running it on the HTP simulator
gives each tensor as the NPU computed it. `compare_taps` puts each beside the same tensor of the
Q/DQ graph run in PyTorch and measures the difference in steps of the tensor's own quantization
grid (1 step = one scale). The first tensor, in graph order, that is many steps off is where
the two part; everything after it inherits the difference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from quantnpu.graph.ops import quantize_kind


@dataclass(frozen=True)
class TapResult:
    node: str  # the dequantize node whose value is compared
    source: str  # the op that produced the quantized tensor
    scale: float
    bits: int
    max_steps: float
    mean_steps: float

    def line(self) -> str:
        return f"{self.source:<28} {self.node:<40} {self.bits:>2}-bit scale {self.scale:10.3g}  max {self.max_steps:9.2f}  mean {self.mean_steps:8.3f} steps"


def _source_op(dequantize: torch.fx.Node) -> str:
    node = dequantize
    while quantize_kind(node) is not None and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node.name


def tap_candidates(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Per-tensor dequantize nodes that read a run-time quantize (not a constant weight)."""
    taps = []
    for node in gm.graph.nodes:
        if quantize_kind(node) == "dequantize" and "per_tensor" in str(node.target):
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and quantize_kind(source) == "quantize":
                taps.append(node)
    return taps


def tap_tensors(gm: torch.fx.GraphModule, names: list[str]) -> torch.fx.GraphModule:
    """A copy of `gm` returning its outputs followed by the named dequantize nodes' values (each
    tapped from its quantize node, see `_tap_quantized`)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    return _tap_quantized(gm, [by_name[name].args[0].name for name in names])


def compare_taps(gm: torch.fx.GraphModule, names: list[str], device_outputs: list[torch.Tensor],
                 inputs: tuple[torch.Tensor, ...]) -> list[TapResult]:
    """Each tapped tensor of the device run against the Q/DQ graph's own value, in grid steps."""
    reference = tap_tensors(gm, names)(*inputs)
    first = len(reference) - len(names)
    by_name = {n.name: n for n in gm.graph.nodes}
    results = []
    for offset, name in enumerate(names):
        expected, actual = reference[first + offset], device_outputs[first + offset]
        dequantize = by_name[name]
        scale = float(dequantize.args[1])
        bits = bits_of(dequantize)
        steps = (actual.float() - expected.float()).abs() / scale
        results.append(TapResult(name, _source_op(dequantize), scale, bits, float(steps.max()), float(steps.mean())))
    return results


def run_taps_on_device(gm: torch.fx.GraphModule, names: list[str], inputs: tuple[torch.Tensor, ...],
                       pte_path: str | Path, soc: str = "SM8650") -> list[TapResult]:
    """Lower the tapped graph, run it on the HTP simulator, compare (see the module docstring)."""
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    tapped = tap_tensors(gm, names)
    lowered = lower_to_qnn(tapped, inputs, pte_path, soc, allow_cpu_ops=True)
    outputs = PteModel(lowered.pte_path).outputs(*inputs)
    return compare_taps(gm, names, outputs, inputs)


# --- The agreement check: each quantized tensor of the `.pte`, given the device's own inputs -----------
#
# Comparing a device tensor with the reference graph run on its own mixes two things: what the op
# computed differently here, and everything inherited from upstream (one-step flips of 8-bit tensors
# grow along the residual stream). The check separates them: the reference graph is run with every
# tapped quantized tensor replaced by the device's value, so each tapped tensor's reference is its op
# recomputed from the device's own inputs. That local difference stays within a step or two where the
# device computes what the plan says; a tensor whose encoding differs on the device shows up alone.

_MOVES = ("view", "reshape", "_unsafe_view", "transpose", "permute", "squeeze", "unsqueeze", "expand", "slice",
          "select", "clone", "_to_copy", "alias")


def is_move(node: torch.fx.Node) -> bool:
    """Ops that only move values: their quantized output repeats their input's encoding."""
    name = str(node.target).split("::")[-1].replace("aten.", "").split(".")[0]
    return node.op == "call_function" and name in _MOVES


def bits_of(quantize: torch.fx.Node) -> int:
    return (int(quantize.args[4]) - int(quantize.args[3])).bit_length()


def agreement_tensors(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The run-time quantize nodes worth comparing: every quantized tensor an op computes, and every
    re-quantization of one (an edge reading another grid); not the copies after ops that only move
    values, which repeat their input's encoding."""
    chosen = []
    for node in gm.graph.nodes:
        if quantize_kind(node) != "quantize" or "per_tensor" not in str(node.target):
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_function":
            continue
        if is_move(source):
            continue
        chosen.append(node)
    return chosen


def _layers_in_order(gm: torch.fx.GraphModule) -> dict[str, int | None]:
    """Each node's decoder layer: the last layer index AnnotateRoles recorded at or before it."""
    from quantnpu.graph.meta import META_KEY

    layer, out = None, {}
    for node in gm.graph.nodes:
        info = node.meta.get(META_KEY)
        if info is not None and getattr(info, "layer", None) is not None:
            layer = info.layer
        elif info is not None and getattr(info, "role", None) in ("final_norm", "lm_head"):
            layer = None
        out[node.name] = layer
    return out


def _tap_quantized(gm: torch.fx.GraphModule, quantize_names: list[str]) -> torch.fx.GraphModule:
    """A copy of `gm` that also returns each named quantize node's tensor, through a dequantize of
    its own read by the output alone (ExecuTorch's QNN passes record a re-quantization for a
    dequantize's first user only: a shared one could hand the output another grid)."""
    tapped = copy.deepcopy(gm)
    by_name = {n.name: n for n in tapped.graph.nodes}
    output = next(n for n in tapped.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    taps = []
    for name in quantize_names:
        quantize = by_name[name]
        target = torch.ops.quantized_decomposed.dequantize_per_tensor.default
        with tapped.graph.inserting_after(quantize):
            tap = tapped.graph.call_function(target, (quantize, *quantize.args[1:]))
        tap.meta["val"] = quantize.args[0].meta.get("val") if isinstance(quantize.args[0], torch.fx.Node) else None
        taps.append(tap)
    output.args = (tuple(values) + tuple(taps),)
    tapped.graph._codegen = torch.fx.graph.CodeGen()
    tapped.recompile()
    return tapped


@dataclass(frozen=True)
class TensorAgreement:
    tensor: str  # the quantize node
    source: str  # the op whose output it quantizes
    label: str  # the bit plan's name for it, where it has one
    layer: int | None
    bits: int
    scale: float
    local_max: int  # grid steps: device vs the op recomputed from the device's own inputs
    local_mean: float
    drift_max: int  # grid steps: device vs the reference graph run on its own (inherited differences included)

    @property
    def local_fraction(self) -> float:
        """The local difference as a fraction of the grid's range (2^bits steps)."""
        return self.local_max / 2 ** self.bits

    def line(self) -> str:
        where = f"layers.{self.layer}" if self.layer is not None else "-"
        return (f"{where:<10} {self.source:<24} {self.label[:36]:<36} {self.bits:>2}-bit  local max {self.local_max:6d} "
                f"mean {self.local_mean:7.3f}  drift max {self.drift_max:7d} steps")


@dataclass
class AgreementReport:
    tensors: list[TensorAgreement]
    tolerance: float  # largest local difference allowed, as a fraction of a tensor's grid range
    unobserved: list[str] = field(default_factory=list)  # tapped, but the tap cannot show the device's value

    def failures(self) -> list[TensorAgreement]:
        return [t for t in self.tensors if t.local_fraction > self.tolerance]

    @property
    def ok(self) -> bool:
        return not self.failures()

    def per_layer(self) -> str:
        """One line per layer: its tensor with the largest local difference (relative to its grid)."""
        groups: dict = {}
        for t in self.tensors:
            groups.setdefault(t.layer, []).append(t)
        lines = [f"{'layer':<10} {'op':<24} {'tensor':<36} bits  largest local difference (steps of its grid)"]
        for layer, members in groups.items():
            worst = max(members, key=lambda t: t.local_fraction)
            lines.append(worst.line() + ("  <-- over tolerance" if worst.local_fraction > self.tolerance else ""))
        return "\n".join(lines)

    def summary(self) -> str:
        bad = self.failures()
        hidden = (f"; {len(self.unobserved)} more cannot be observed by a tap (narrowed by a reader, or "
                  "a narrowing copy) and are judged through their readers") if self.unobserved else ""
        if not bad:
            worst = max(self.tensors, key=lambda t: t.local_fraction)
            return (f"agreement: {len(self.tensors)} quantized tensors, every one within {self.tolerance * 256:g} 8-bit "
                    f"steps' worth of its op recomputed from the device's inputs (largest: {worst.source}, {worst.local_max} "
                    f"steps of its {worst.bits}-bit grid){hidden}")
        first = bad[0]
        return (f"agreement check failed: {len(bad)} of {len(self.tensors)} quantized tensors differ from their op recomputed "
                f"from the device's own inputs by more than {self.tolerance * 256:g} 8-bit steps' worth; first {first.tensor} "
                f"({first.source}, {first.label or 'unlabelled'}, layers.{first.layer}): {first.local_max} steps of its "
                f"{first.bits}-bit grid (scale {first.scale:.3g}){hidden}")


def _codes(value: torch.Tensor, quantize: torch.fx.Node) -> torch.Tensor:
    scale, zero, low, high, dtype = quantize.args[1:6]
    return (torch.round(value.float() / float(scale)) + int(zero)).clamp(int(low), int(high)).to(dtype)


def _narrowed_by_a_reader(quantize: torch.fx.Node) -> bool:
    """A tensor that one of its readers re-quantizes to fewer bits. Tapped out of a QNN program, such a
    tensor comes back as that narrower copy (measured: a 16-bit RMSNorm output read back on the 8-bit
    grid of its q/k/v edge, while its 16-bit reader, gate_proj, computed from the 16-bit values), so
    the device's own value of it cannot be observed this way."""
    bits = bits_of(quantize)
    for dequantize in quantize.users:
        for reader in dequantize.users if quantize_kind(dequantize) == "dequantize" else ():
            if quantize_kind(reader) == "quantize" and "per_tensor" in str(reader.target) and bits_of(reader) < bits:
                return True
    return False


def _narrowing_copy(quantize: torch.fx.Node) -> bool:
    """A re-quantization of a wider tensor to fewer bits (an 8-bit edge of a 16-bit tensor). Its tap is
    not what its readers consumed (seen on SmolLM2: up_proj's 8-bit input copy read back one step
    high on part of its values, while up_proj's output matched the round-to-nearest copy within its
    own rounding), so it is neither forced nor judged: its readers are, from the copy the Q/DQ graph
    computes."""
    source = quantize.args[0]
    if not (isinstance(source, torch.fx.Node) and quantize_kind(source) == "dequantize"):
        return False
    wide = source.args[0]
    return quantize_kind(wide) == "quantize" and bits_of(wide) > bits_of(quantize)


def _unobservable(quantize: torch.fx.Node) -> bool:
    return _narrowed_by_a_reader(quantize) or _narrowing_copy(quantize)


def _inputs_of_layers(gm: torch.fx.GraphModule, names: list[str], layers: set[int]) -> list[str]:
    """Of the quantized tensors `names` outside `layers`, those that an op inside them, or outside every
    layer (the final norm, the head), reads through dequantizes, re-quantizations and ops that only
    move values: tapping them gives the first ops of each chosen layer the device's own inputs
    (measured: untapped, the residual stream's drift from the layers in between showed up as a
    37-step "local" difference at the next layer's RMSNorm)."""
    where = _layers_in_order(gm)
    inside = set(layers) | {None}  # the model's own ops (embedding, final norm, head) are always checked
    wanted = set(names)
    by_name = {n.name: n for n in gm.graph.nodes}
    feeding = []
    for name in names:
        if where.get(name) in inside:
            continue
        frontier, seen, reaches = [by_name[name]], set(), False
        while frontier and not reaches:
            node = frontier.pop()
            for reader in node.users:
                if reader.name in seen:
                    continue
                seen.add(reader.name)
                passes_through = quantize_kind(reader) is not None or is_move(reader)
                if where.get(reader.name) in inside and (not passes_through or reader.name in wanted):
                    reaches = True
                elif passes_through and reader.name not in wanted:
                    frontier.append(reader)
        if reaches:
            feeding.append(name)
    return feeding


class _Recording(torch.fx.Interpreter):
    """Runs a graph, recording the tapped quantize nodes' values; where `device_codes` has a node's
    device value, its users get that instead (so each tapped tensor's recorded value is its op
    recomputed from the device's inputs)."""

    def __init__(self, gm: torch.fx.GraphModule, names: set[str], device_codes: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.names, self.device_codes, self.values = names, device_codes, {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return self.device_codes.get(n.name, value)


def compare_agreement(gm: torch.fx.GraphModule, quantize_names: list[str], device_outputs: list[torch.Tensor],
                      inputs: tuple[torch.Tensor, ...], tolerance: float = 2 / 256,
                      forced_only: frozenset[str] = frozenset()) -> AgreementReport:
    """The device's tapped tensors (`device_outputs`: the tapped program's outputs, the model's own
    first) against the reference `gm`, locally and as drift (see above). Tensors whose tap cannot show
    the device's value (`_unobservable`) are neither forced nor judged; those in `forced_only` (a
    layer subset's inputs, whose own inputs were not tapped) are forced but not judged."""
    from quantnpu.graph.meta import QUANT_KEY

    by_name = {n.name: n for n in gm.graph.nodes}
    first = len(device_outputs) - len(quantize_names)
    observable = [name for name in quantize_names if not _unobservable(by_name[name])]
    device_codes = {name: _codes(device_outputs[first + quantize_names.index(name)], by_name[name]) for name in observable}
    with torch.no_grad():
        alone = _Recording(gm, set(observable), {})
        alone.run(*inputs)
        forced = _Recording(gm, set(observable), device_codes)
        forced.run(*inputs)
    layers = _layers_in_order(gm)
    tensors = []
    for name in observable:
        if name in forced_only:
            continue
        quantize = by_name[name]
        device = device_codes[name].to(torch.int64)
        local = (device - forced.values[name].to(torch.int64)).abs()
        drift = (device - alone.values[name].to(torch.int64)).abs()
        source = quantize.args[0]
        record = source.meta.get(QUANT_KEY)
        tensors.append(TensorAgreement(
            tensor=name, source=source.name, label=",".join(getattr(record, "labels", ()) or ()), layer=layers.get(name),
            bits=bits_of(quantize), scale=float(quantize.args[1]), local_max=int(local.max()),
            local_mean=float(local.float().mean()), drift_max=int(drift.max())))
    return AgreementReport(tensors, tolerance, unobserved=[n for n in quantize_names if n not in observable])


def check_agreement(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], pte_path: str | Path,
                    soc: str = "SM8650", device_graph: torch.fx.GraphModule | None = None,
                    tolerance: float = 2 / 256, layers: set[int] | None = None) -> AgreementReport:
    """Lower a copy of the Q/DQ graph `gm` (or of `device_graph`, a graph with the same node names: how
    a planted mismatch is tested) that also returns every quantized tensor, run it on the HTP
    simulator on `inputs`, and compare each tensor with `gm`'s (see `compare_agreement`); `layers`
    limits the taps to those decoder layers and what they read from the others (forced, not judged:
    their own inputs are not tapped). The tapped `.pte` is removed afterwards."""
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    names = [n.name for n in agreement_tensors(gm)]
    feeding: set[str] = set()
    if layers is not None:  # these decoder layers' tensors, what they read from other layers, and the model's own
        where = _layers_in_order(gm)
        feeding = set(_inputs_of_layers(gm, names, layers))
        names = [name for name in names if where.get(name) is None or where[name] in layers or name in feeding]
    tapped = _tap_quantized(device_graph if device_graph is not None else gm, names)
    pte_path = Path(pte_path)
    try:
        lowered = lower_to_qnn(tapped, inputs, pte_path, soc, allow_cpu_ops=True)
        outputs = PteModel(lowered.pte_path).outputs(*inputs)
    finally:
        pte_path.unlink(missing_ok=True)
    return compare_agreement(gm, names, outputs, inputs, tolerance, forced_only=frozenset(feeding))
