"""RoundWeightsGptq: error-compensating rounding of the narrow linear weights (GPTQ's idea), on the
calibrated fake-quant graph, with the encodings it already has.

Round-to-nearest rounds every weight on its own. GPTQ rounds a weight matrix one input column at a
time and pushes each column's rounding error onto the columns not yet rounded, weighted by the
inverse of the layer input's second moment `H = X^T X`, so the layer's output `X W^T` moves less
than with independent rounding. Here:

- the weights it rounds: every linear weight quantized at `max_bits` bits or fewer (default 4:
  the W4 weights; 8 rounds the 8-bit ones too), per output channel, with the scales StaticCalibration
  (or stage one before it) gave them: the encodings do not change, only the integer codes;
- `H` from the calibration windows as the quantized graph sees them: each linear's input after
  its activation quantizer, every weight still rounded to nearest (one pass over the windows, not
  layer-by-layer re-propagation);
- dampening `damp * mean(diag H)` on the diagonal; column order natural or, with `act_order`, by
  decreasing `diag H`; blocks of `block` columns for the lazy updates;
- each rounded weight is written back as its dequantized values (exactly on the encoding's grid, so
  the converted graph's integer codes are GPTQ's), and kept only if its proxy error
  `tr(dW H dW^T)` is below round-to-nearest's with the same scales (else nearest stays; counted).
`layers` records both errors per weight; `report()` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from tqdm import tqdm

from quantnpu.errors import GraphStructureError, QuantNpuError
from quantnpu.graph.meta import node_info
from quantnpu.graph.ops import LINEAR, fetch_attr
from quantnpu.memory import release_freed_memory
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.static_calibration import StaticCalibration
from quantnpu.passes.stream import LayerStream
from quantnpu.passes.weights import replace_weight, weight_tensor
from quantnpu.quantizers.bit_plan import LEADING_TAG
from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.observers import EncodingObserver

WEIGHT_ROUNDING = ("nearest", "gptq")


@dataclass(frozen=True)
class RoundedWeight:
    role: str             # the linear, e.g. layers.3.down_proj
    parameter: str
    bits: int
    nearest_error: float  # tr(dW H dW^T) / tr(W H W^T) with round-to-nearest
    gptq_error: float     # the same with GPTQ's codes
    kept: bool            # GPTQ's codes written (its error is the lower)


def _observer(gm: torch.fx.GraphModule, node: object) -> EncodingObserver | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, EncodingObserver):
            return module
    return None


def _quantize_columns(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes of `w` (rows = output channels, one scale each), float64 arithmetic."""
    return torch.clamp(torch.round(w / scale), qmin, qmax)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, encoding: Encoding, damp: float = 0.01,
               act_order: bool = False, block: int = 128) -> torch.Tensor:
    """GPTQ's integer codes for `weight` [out, in] under a per-output-channel `encoding`, given the
    input second moment `hessian` [in, in]. float64 throughout."""
    if encoding.axis != 0 or len(encoding.scale) != weight.shape[0]:
        raise QuantNpuError(f"GPTQ needs one scale per output channel (axis 0), got axis {encoding.axis} "
                            f"with {len(encoding.scale)} scales for {weight.shape[0]} rows")
    w = weight.double().clone()
    h = hessian.double().clone()
    columns = w.shape[1]
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0  # an input that never fires: its column's error costs nothing
    h += damp * torch.diagonal(h).mean() * torch.eye(columns, dtype=h.dtype)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(columns)
    w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H^-1: row i holds the updates column i's error sends to later columns.
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)
    scale = torch.tensor(encoding.scale, dtype=torch.float64).reshape(-1, 1)
    codes = torch.zeros_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        local = upper[start:end, start:end]
        for i in range(end - start):
            column = part[:, i:i + 1]
            code = _quantize_columns(column, scale, encoding.qmin, encoding.qmax)
            codes[:, start + i:start + i + 1] = code
            error = (column - code * scale) / local[i, i]
            part[:, i:] -= error @ local[i:i + 1, i:]
            errors[:, i:i + 1] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    restore = torch.empty_like(order)
    restore[order] = torch.arange(columns)
    return codes[:, restore]


def proxy_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared change of the layer's outputs over the calibration rows."""
    return float(((delta @ hessian) * delta).sum())


class RoundWeightsGptq(GraphPass):
    """See the module docstring."""

    run_after = (StaticCalibration,)
    preserves_function = False  # it changes the quantized weights (on purpose); see `ensures`

    def __init__(self, calibration: Sequence[torch.Tensor], max_bits: int = 4, damp: float = 0.01,
                 act_order: bool = False, block: int = 128, progress: bool = False) -> None:
        if not 0.0 <= damp < 1.0:
            raise QuantNpuError(f"GPTQ dampening must be in [0, 1), got {damp}")
        if block < 1:
            raise QuantNpuError(f"GPTQ block must be >= 1 column, got {block}")
        self.calibration, self.max_bits, self.damp = list(calibration), max_bits, damp
        self.act_order, self.block, self.progress = act_order, block, progress
        self.layers: list[RoundedWeight] = []
        self._written: dict[str, Encoding] = {}

    def _targets(self, gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, EncodingObserver]]:
        """(linear, weight get_attr, weight observer) of every weight to round."""
        found = []
        for node in gm.graph.nodes:
            if node.target != LINEAR:
                continue
            observer = _observer(gm, node.args[1])
            if observer is None:
                continue
            if observer.encoding is None:
                raise GraphStructureError("weight quantizer has no encoding: run StaticCalibration first", node.name)
            if observer.encoding.bits > self.max_bits:
                continue
            parameter = node.args[1].args[0]
            if not isinstance(parameter, torch.fx.Node) or parameter.op != "get_attr":
                raise GraphStructureError("quantized weight is not a plain parameter", node.name)
            if _observer(gm, node.args[0]) is None:
                raise GraphStructureError("linear input is not quantized: GPTQ needs the input as the quantized graph sees it", node.name)
            found.append((node, parameter, observer))
        return found

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not self.calibration:
            raise QuantNpuError("GPTQ needs calibration batches")
        targets = self._targets(gm)
        self.layers, self._written = [], {}
        if not targets:
            return PassResult(gm, False)
        inputs = {linear.args[0] for linear, _, _ in targets}
        hessians: dict[torch.fx.Node, torch.Tensor] = {}
        rows = dict.fromkeys(inputs, 0)

        def accumulate(node, value):
            x = value.detach().reshape(-1, value.shape[-1]).float()
            gram = (x.T @ x).double()
            hessians[node] = hessians[node] + gram if node in hessians else gram
            rows[node] += x.shape[0]

        # A weight read by several linears (an MLP split by SplitLeadingTokens) is rounded once, for
        # all of its inputs together: the Hessian sums their Gram matrices.
        readers: dict[str, list] = {}
        for linear, parameter, observer in targets:
            readers.setdefault(str(parameter.target), []).append((linear, parameter, observer))
        # The windows stream layer by layer; a weight is rounded as soon as the last stage reading it
        # is done (what later stages read was computed with the weights as they were), and its
        # Hessians are dropped: one layer's Hessians at a time.
        stream = LayerStream(gm)
        due: dict[int, list[str]] = {}
        for target, group in readers.items():
            due.setdefault(max(stream.stage_of[linear] for linear, _, _ in group), []).append(target)
        readers_left = {node: sum(linear.args[0] is node for linear, _, _ in targets) for node in inputs}
        rounded: dict[str, RoundedWeight] = {}
        bar = tqdm(total=len(readers), desc="GPTQ rounding", unit="weight", disable=not self.progress)

        def round_due(stage: int) -> None:
            for target in due.get(stage, ()):
                rounded[target] = self._round(gm, readers[target], hessians, rows)
                for linear, _, _ in readers[target]:
                    readers_left[linear.args[0]] -= 1
                    if not readers_left[linear.args[0]]:  # q/k/v (and gate/up) share one input's Hessian
                        hessians.pop(linear.args[0])
                bar.update()

        with torch.no_grad():
            stream.run(self.calibration, accumulate, targets=inputs, after_stage=round_due,
                       progress="GPTQ statistics" if self.progress else None)
        bar.close()
        self.layers = [rounded[target] for target in readers]
        hessians.clear()
        release_freed_memory()
        return PassResult(gm, bool(self._written))

    def _round(self, gm: torch.fx.GraphModule, group: list, hessians: dict, rows: dict) -> RoundedWeight:
        """GPTQ codes for one weight (read by the linears of `group`), kept where they beat round-to-nearest."""
        linear, parameter, observer = min(group, key=lambda t: getattr(node_info(t[0]), "role", "").endswith(LEADING_TAG))
        encoding = observer.encoding
        if any(other.encoding != encoding for _, _, other in group):
            raise GraphStructureError("one weight read with two different encodings", group[-1][0].name)
        weight = weight_tensor(gm, parameter)
        hessian = sum(hessians[t[0].args[0]] for t in group) / max(sum(rows[t[0].args[0]] for t in group), 1)
        original = weight.double()
        scale = torch.tensor(encoding.scale, dtype=torch.float64).reshape(-1, 1)
        nearest = encoding.fake_quantize(weight.detach()).double()
        codes = gptq_codes(original, hessian, encoding, self.damp, self.act_order, self.block)
        rounded = encoding.fake_quantize((codes * scale).to(weight.dtype))
        reference = max(proxy_error(original, hessian), 1e-300)
        nearest_error = proxy_error(nearest - original, hessian) / reference
        gptq_error = proxy_error(rounded.double() - original, hessian) / reference
        kept = gptq_error < nearest_error
        if kept:
            replace_weight(gm, str(parameter.target), rounded)
            self._written[str(parameter.target)] = encoding
        info = node_info(linear)
        return RoundedWeight(info.role if info else linear.name, str(parameter.target), encoding.bits, nearest_error, gptq_error, kept)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        # What was written lies exactly on its encoding's grid: the converted graph's integer codes
        # are GPTQ's, and quantizing it again changes nothing.
        for target, encoding in self._written.items():
            weight = fetch_attr(gm, target)
            if not torch.equal(encoding.fake_quantize(weight), weight):
                raise QuantNpuError(f"GPTQ-rounded {target} is off its encoding's grid")

    def report(self) -> str:
        """One line per rounded weight: output error (relative, on the calibration inputs) with
        round-to-nearest and with GPTQ."""
        lines = [f"{r.role:<22} W{r.bits}  nearest {r.nearest_error:.3e}  gptq {r.gptq_error:.3e}"
                 + ("" if r.kept else "  (nearest kept)") for r in self.layers]
        kept = sum(r.kept for r in self.layers)
        return "\n".join(lines + [f"GPTQ codes kept for {kept} of {len(self.layers)} weights"])
