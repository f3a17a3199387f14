"""PrepareForQnn: give the graph the exact form the QNN quantizer annotates and the NPU runs.

Three steps, all before any observer goes in, so that the graph that is observed and calibrated
is the graph that is quantized and lowered (one tensor, one encoding):
1. ExecuTorch's own QNN annotation transforms as quantnpu runs them
   (`quantizers.quantnpu_quantizer.qnn_annotation_transforms`): SiLU becomes sigmoid * x,
   scaled-dot-product attention becomes bmm / softmax (with the scale split over q and k), and so
   on; every RMSNorm, weightless ones included, becomes one `rms_norm` op (quantnpu's
   recomposition: ExecuTorch's miscompiles a norm whose weight was folded into the next linears),
   so its x * x, mean and rsqrt are never quantized on their own (see `recompose_rms_norms`; a
   weight multiply that reads the norm through a real cast stays a separate op, with a warning).
   The postcondition checks it: no rsqrt is left (`rms_norms` already rejects one that is not an
   RMSNorm's).
2. Identity ops are dropped (`Canonicalize`'s rule), should the transforms have made any: on the
   NPU each would be an op with its own requantization. A role on a dropped node moves to its input.
3. Attention masks get a finite, small masking value (`ATTENTION_MASK_VALUE`) in place of -inf.
   The mask is added to the scores and the sum is one 16-bit tensor, so its scale is set by the
   mask's magnitude: ExecuTorch's own replacement (-65535) gives the scores a step of 2.0, so a
   one-step rounding difference moves an attention probability by up to e^2 (measured on
   SmolLM2: the .pte and its fake-quant graph parted at exactly this softmax). With -255 the
   step is ~0.008 and a masked probability, exp(-255 + score span), still rounds to 0 on the
   16-bit softmax grid for any score span below ~240.
"""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.canonicalize import drop_identity_ops, is_identity
from quantnpu.graph.ops import RSQRT, SDPA, SOFTMAX

aten = torch.ops.aten
ATTENTION_MASK_VALUE = -255.0
# What counts as "minus infinity" in a mask: anything float16 cannot hold (float32.min, -inf).
_MASKING = float(torch.finfo(torch.float16).min)


def _constant_ancestors(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Every node `node` is computed from, or None if a graph input is among them."""
    seen, stack = {}, [node]
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        if current.op == "placeholder":
            return None
        seen[current.name] = current
        stack.extend(current.all_input_nodes)
    return list(seen.values())


def _is_masking(value: object) -> bool:
    return isinstance(value, float) and value <= _MASKING


def _mask_constants(softmax: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes computing the constant operand(s) of the add that feeds `softmax`."""
    if softmax.target not in SOFTMAX or not isinstance(softmax.args[0], torch.fx.Node):
        return []
    scores = softmax.args[0]
    if scores.target != aten.add.Tensor:
        return []
    return [node for operand in scores.all_input_nodes for node in _constant_ancestors(operand) or ()]


def bound_attention_masks(gm: torch.fx.GraphModule, mask_value: float = ATTENTION_MASK_VALUE) -> list[str]:
    """Replace masking values (<= float16.min, -inf included) in the constant operand of every add
    that feeds a softmax by `mask_value`; returns the names of the nodes and constants changed."""
    changed = []
    for softmax in gm.graph.nodes:
        for node in _mask_constants(softmax):
            if node.op == "call_function" and any(_is_masking(a) for a in node.args):
                node.args = tuple(mask_value if _is_masking(a) else a for a in node.args)
                changed.append(node.name)
            elif node.op == "get_attr":
                owner_path, _, name = node.target.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                value = getattr(owner, name)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and bool((value <= _MASKING).any()):
                    # a new tensor, not an in-place write: the caller's module may share this constant
                    setattr(owner, name, value.masked_fill(value <= _MASKING, mask_value))
                    changed.append(node.target)
    gm.recompile()
    return changed


def check_norms_recomposed(gm: torch.fx.GraphModule) -> None:
    """Every RMSNorm is one `rms_norm` op: an rsqrt left means a norm whose x * x, mean and rsqrt
    would be quantized one by one (norms wrong by up to 1.5x on SmolLM2, see `recompose_rms_norms`)."""
    for node in gm.graph.nodes:
        require(node.target != RSQRT, "rsqrt left after PrepareForQnn: an RMSNorm was not made one rms_norm op, "
                                      "so its x * x, mean and rsqrt would be quantized one by one", node)


class PrepareForQnn(GraphPass):
    """See the module docstring."""

    run_after = (AnnotateRoles,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from quantnpu.quantizers.quantnpu_quantizer import qnn_annotation_transforms

        before = len(gm.graph.nodes)
        gm = qnn_annotation_transforms(gm)
        drop_identity_ops(gm.graph)
        bound_attention_masks(gm)
        gm.graph.eliminate_dead_code()  # e.g. the exponent constant of a rewritten pow
        return PassResult(gm, len(gm.graph.nodes) != before)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            require(node.target != SDPA, "scaled_dot_product_attention left after PrepareForQnn", node)
            require(not is_identity(node), "identity op left after PrepareForQnn", node)
            for constant in _mask_constants(node):
                require(not any(_is_masking(a) for a in constant.args), "unbounded attention mask value left after PrepareForQnn", constant)
        check_norms_recomposed(gm)
