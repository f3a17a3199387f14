"""PrepareForQnn: give the graph the exact form the QNN quantizer annotates and the NPU runs.

Two steps, both before any observer goes in, so that the graph that is observed and calibrated is
the graph that is quantized and lowered (one tensor, one encoding):
1. ExecuTorch's own QNN annotation transforms (`QnnQuantizer.transform_for_annotation`): SiLU
   becomes sigmoid * x, scaled-dot-product attention becomes bmm / softmax (with the scale split
   over q and k), RMSNorm is recomposed where its pattern allows, and so on.
2. `pow(x, 2)` becomes `x * x`: QNN would take the exponent as a float constant input, the one
   tensor of the graph that is not quantized (IntegerOnlyCheck flags it).
3. Identity ops are dropped: clone, alias, and casts to the dtype a tensor already has (Hugging
   Face's RMSNorm casts to float32 and back). On the NPU each would be an op with its own
   requantization; here they compute nothing. A role on a dropped node moves to its input.
"""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.meta import node_info, set_node_info

aten = torch.ops.aten
_IDENTITY = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
SDPA = aten.scaled_dot_product_attention.default


def _is_identity(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target in _IDENTITY:
        return True
    if node.target in _CASTS:
        source, result = node.args[0].meta.get("val"), node.meta.get("val")
        return isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor) and source.dtype == result.dtype
    return False


def _is_square(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.target not in (aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar) or len(node.args) != 2:
        return False
    exponent = node.args[1]
    if isinstance(exponent, torch.fx.Node) and exponent.op == "get_attr":
        value = gm.get_buffer(exponent.target) if exponent.target in dict(gm.named_buffers()) else getattr(gm, exponent.target)
        return isinstance(value, torch.Tensor) and value.numel() == 1 and float(value) == 2.0
    return exponent == 2 or exponent == 2.0


def squares_to_products(gm: torch.fx.GraphModule) -> int:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if _is_square(gm, node):
            with gm.graph.inserting_before(node):
                product = gm.graph.call_function(aten.mul.Tensor, (node.args[0], node.args[0]))
            product.meta = dict(node.meta)
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
            rewritten += 1
    return rewritten


def drop_identity_ops(gm: torch.fx.GraphModule) -> int:
    dropped = 0
    for node in list(gm.graph.nodes):
        if not _is_identity(node):
            continue
        source = node.args[0]
        info = node_info(node)
        if info is not None and node_info(source) is None:
            set_node_info(source, info)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        dropped += 1
    return dropped


class PrepareForQnn(GraphPass):
    """See the module docstring."""

    run_after = (AnnotateRoles,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from quantnpu.quantizers.quantnpu_quantizer import qnn_annotation_transforms

        before = len(gm.graph.nodes)
        gm = qnn_annotation_transforms(gm)
        squares_to_products(gm)
        drop_identity_ops(gm)
        return PassResult(gm, len(gm.graph.nodes) != before)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            require(node.target != SDPA, "scaled_dot_product_attention left after PrepareForQnn", node)
            require(not _is_identity(node), "identity op left after PrepareForQnn", node)
