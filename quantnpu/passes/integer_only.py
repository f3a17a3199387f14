"""IntegerOnlyCheck: verify a converted (Q/DQ) graph is integer-only and fully static.

In PT2E's converted form an integer op `f` appears as `dequantize -> f -> quantize`. So every
compute node must
- read only dequantized tensors, integer/bool tensors (token ids, masks), or Python scalars, and
- if it produces a float tensor, hand it only to quantize ops (a float value flowing on to another
  op would run in float on the NPU).
Quantize/dequantize ops take their scale and zero point as constants: a scale computed from the
data (dynamic quantization) is a violation too. Violations are listed by node name.
The lowered-program half of the check (nothing but the input quantize and output dequantize
outside QNN delegates) is `quantnpu.lowering.lower.non_delegated_ops`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.graph.ops import EXPORT_ASSERTS, quantize_kind
from quantnpu.passes.base import GraphPass, PassResult

_IGNORED = {operator.getitem} | EXPORT_ASSERTS


def _is_float(node) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def integer_only_violations(gm: torch.fx.GraphModule) -> list[str]:
    """`%node: reason` for every place the graph is not integer-only and static."""
    violations = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in _IGNORED:
            continue
        kind = quantize_kind(node)
        if kind is not None:
            dynamic = [a for a in node.args[1:3] if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
            if dynamic:
                violations.append(f"%{node.name}: {kind} with a scale/zero point computed at run time (%{dynamic[0].name})")
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and not _is_float(arg):
                continue
            if arg.op == "placeholder" and not _is_float(arg):
                continue
            if quantize_kind(arg) == "dequantize":
                continue
            violations.append(f"%{node.name}: reads float %{arg.name} that is not a dequantized tensor")
            break
        if _is_float(node):
            bad = [u for u in node.users if u.target not in _IGNORED and quantize_kind(u) != "quantize"]
            if bad:
                violations.append(f"%{node.name}: float output used by %{bad[0].name} without being quantized")
    return violations


class IntegerOnlyCheck(GraphPass):
    """Raises, listing every violation, unless the converted graph is integer-only and static."""

    preserves_function = False  # reads a quantized graph; nothing to compare with the float one

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        violations = integer_only_violations(gm)
        if violations:
            shown = "; ".join(violations[:10]) + (f"; ... ({len(violations)} in all)" if len(violations) > 10 else "")
            raise GraphStructureError(f"not integer-only: {shown}")
        return PassResult(gm, False)
