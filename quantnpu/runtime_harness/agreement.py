"""Where does a `.pte` stop agreeing with its fake-quant graph? A per-tensor comparison.

`tap_tensors` returns a copy of a converted (Q/DQ) graph that also outputs the dequantized value of
every quantized tensor it is asked about; lowering that copy and running it on the HTP simulator
gives each tensor as the NPU computed it. `compare_taps` puts each beside the same tensor of the
Q/DQ graph run in PyTorch and measures the difference in steps of the tensor's own quantization
grid (1 step = one scale). The first tensor, in graph order, that is many steps off is where
the two part; everything after it inherits the difference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
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
    """A copy of `gm` returning its outputs followed by the named dequantize nodes."""
    tapped = copy.deepcopy(gm)
    by_name = {n.name: n for n in tapped.graph.nodes}
    output = next(n for n in tapped.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (tuple(values) + tuple(by_name[name] for name in names),)
    # export's pytree output spec names one output; plain codegen returns the tuple as it is
    tapped.graph._codegen = torch.fx.graph.CodeGen()
    tapped.recompile()
    return tapped


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
        bits = (int(dequantize.args[4]) - int(dequantize.args[3]) + 1).bit_length() - 1
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
