"""AssignBitWidths: sensitivity-based mixed precision for down_proj inputs (METHOD.md, "Adaptive
mixed precision"; paper Sec. 4.4).

No rotation reaches a down_proj input (R4 is removed), so its outliers survive; how much 8 bits
lose there differs a lot between layers. For every down_proj input X, over the calibration
windows: the 8-bit Max-Min encoding (global max over all windows, the scale stage two would set),
then the sensitivity `r = ||X - x_hat(X)||_2 / ||X||_2` (~0 lossless, ~1 destroyed). The top
`fraction` of layers by `r` (default 10%: 3 of SmolLM2's 30) read their input at `bits` (16).

Two streaming passes over the calibration batches (max, then error): memory does not grow with
the number of windows. Each down_proj node records its `sensitivity` and, when promoted,
`promoted_input_bits` (its `TensorQuant`); `PlanBitWidths` uses that as the rule for the edge, and
a user's `--override` still has the last word. `report` lists every layer's r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from quantnpu.graph.meta import node_info, update_tensor_quant
from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.fuse_rotations import FuseRotations
from quantnpu.passes.stream import LayerStream
from quantnpu.passes.smooth_inputs import SmoothUnrotatedInputs
from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.init_rules import max_min_scale
from quantnpu.quantizers.observers import RunningStats, float32_exact


@dataclass(frozen=True)
class Sensitivity:
    role: str          # the down_proj's role, e.g. layers.2.down_proj
    r: float           # relative 8-bit Max-Min error of its input over the calibration set
    promoted: bool


def promoted_count(fraction: float, layers: int) -> int:
    """How many of `layers` the top `fraction` is (10% of 30 -> 3; any positive fraction -> >= 1)."""
    return min(layers, math.ceil(round(fraction * layers, 6)))


class AssignBitWidths(GraphPass):
    """See the module docstring."""

    run_after = (AnnotateRoles, FuseRotations, SmoothUnrotatedInputs)  # smoothing changes who is sensitive

    def __init__(self, calibration: Sequence[torch.Tensor], fraction: float = 0.1, bits: int = 16,
                 progress: bool = False, skip_leading: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            from quantnpu.errors import QuantNpuError

            raise QuantNpuError(f"promote fraction must be in [0, 1], got {fraction}")
        self.calibration, self.fraction, self.bits, self.progress = list(calibration), fraction, bits, progress
        # leading positions left out of the statistics (their own 16-bit MLP copy: SplitLeadingTokens)
        self.skip_leading = skip_leading
        self.sensitivities: list[Sensitivity] = []

    def _stream(self, stream: LayerStream, inputs: dict[torch.fx.Node, torch.fx.Node], visit, what: str) -> None:
        with torch.no_grad():
            stream.run(self.calibration, visit, targets=set(inputs), progress=f"sensitivity ({what})" if self.progress else None)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        downs = [n for n in gm.graph.nodes if (info := node_info(n)) is not None and info.kind == "down_proj"]
        require(bool(downs), "no down_proj found: run AnnotateRoles first")
        require(bool(self.calibration), "sensitivity needs calibration batches")
        # the activations of the baked model (what is quantized), one layer at a time: no baked copy
        measured = LayerStream(gm, baked=True)
        inputs = {down.args[0]: down for down in downs}
        stats = {node: RunningStats() for node in inputs}
        skip = self.skip_leading
        self._stream(measured, inputs, lambda node, x: stats[node].update(x[:, skip:]), "max")
        encodings = {node: Encoding(bits=8, scale=float32_exact(max_min_scale(s.tensor_stats(), 8)))
                     for node, s in stats.items()}
        error = dict.fromkeys(inputs, 0.0)
        total = dict.fromkeys(inputs, 0.0)

        def accumulate(node, x):
            x = x.detach()[:, skip:]
            error[node] += float((x - encodings[node].fake_quantize(x)).double().square().sum())
            total[node] += float(x.double().square().sum())

        self._stream(measured, inputs, accumulate, "error")
        ranked = sorted(inputs, key=lambda n: math.sqrt(error[n] / max(total[n], 1e-300)), reverse=True)
        promoted = set(ranked[:promoted_count(self.fraction, len(ranked))])
        self.sensitivities = []
        for node in inputs:
            down = inputs[node]
            r = math.sqrt(error[node] / max(total[node], 1e-300))
            update_tensor_quant(down, sensitivity=r, promoted_input_bits=self.bits if node in promoted else None)
            self.sensitivities.append(Sensitivity(node_info(down).role, r, node in promoted))
        return PassResult(gm, False)

    def report(self) -> str:
        """One line per down_proj, in layer order: r, and the promoted ones marked."""
        return "\n".join(f"{s.role:<22} r = {s.r:.4f}{f'  -> {self.bits} bits' if s.promoted else ''}" for s in self.sensitivities)
