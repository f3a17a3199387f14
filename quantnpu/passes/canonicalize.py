"""Canonicalize: one graph form however a decoder was exported.

Runs first, before any pass that reads structure. Each rewrite keeps the function exactly:
- export's metadata assertions (`_assert_tensor_metadata`, `_assert_scalar`) are dropped;
- identity ops are dropped: `alias`, `clone`, `contiguous`, `detach`/`detach_`, `lift_fresh_copy`
  (a lifted constant used as is), inference-mode `dropout` and casts to the dtype a tensor already has (`to`, `_to_copy`,
  `type_as`, as ExecuTorch's and Hugging Face's RMSNorms write them);
- empty operands of `cat` are dropped (Hugging Face's default export starts each KV cache as an
  empty constant and concatenates onto it; a full-width RoPE concatenates an empty pass-through
  slice), and a `cat` of one tensor is that tensor;
- `repeat_interleave(x, n, dim)` (ExecuTorch's grouped-query attention) becomes
  `reshape(expand(unsqueeze(x, dim + 1)))`, Hugging Face's `repeat_kv` form;
- `aten.rms_norm` over the last dimension (`torch.nn.RMSNorm`, kept whole by `torch.export`)
  becomes `x * rsqrt(mean(x * x) + eps) [* weight]`, the form model code writes by hand.
"""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.graph.ops import CASTS, EXPORT_ASSERTS, insert_call, tensor_meta
from quantnpu.graph.meta import node_info, set_node_info

aten = torch.ops.aten
_IDENTITY = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
             aten.detach_.default, aten.lift_fresh_copy.default}
REPEAT_INTERLEAVE = aten.repeat_interleave.self_int


def is_identity(node: torch.fx.Node) -> bool:
    """An op whose result equals its first argument (value, dtype and device)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target in _IDENTITY:
        return True
    if node.target == aten.dropout.default:  # dropout(x, p, train): identity in eval or with p = 0
        return node.args[1] == 0 or not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True))
    if node.target in CASTS:
        source, result = tensor_meta(node.args[0]), tensor_meta(node)
        return (source is not None and result is not None and source.dtype == result.dtype
                and source.device == result.device)
    return False


def drop_identity_ops(graph: torch.fx.Graph) -> int:
    """Erase export assertions and identity ops (`is_identity`); a role on a dropped node moves to
    its input. Returns how many nodes went."""
    dropped = 0
    for node in list(graph.nodes):
        if node.target in EXPORT_ASSERTS:
            graph.erase_node(node)
            dropped += 1
        elif is_identity(node):
            source = node.args[0]
            if (info := node_info(node)) is not None and node_info(source) is None:
                set_node_info(source, info)
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            dropped += 1
    return dropped


def _drop_empty_concatenations(graph: torch.fx.Graph) -> int:
    changed = 0
    for node in list(graph.nodes):
        if node.target != aten.cat.default:
            continue
        pieces = list(node.args[0])
        kept = [p for p in pieces if (value := tensor_meta(p)) is None or value.numel() > 0]
        if len(kept) == len(pieces) or not kept:
            continue
        if len(kept) == 1 and tensor_meta(kept[0]) is not None and tensor_meta(kept[0]).shape == tensor_meta(node).shape:
            node.replace_all_uses_with(kept[0])
            graph.erase_node(node)
        else:
            node.args = (kept,) + tuple(node.args[1:])
        changed += 1
    return changed


def _expand_repeat_interleave(graph: torch.fx.Graph) -> int:
    changed = 0
    for node in list(graph.nodes):
        if node.target != REPEAT_INTERLEAVE or node.kwargs.get("output_size") is not None:
            continue
        source = node.args[0]
        repeats = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        value = tensor_meta(source)
        if value is None or dim is None or not isinstance(repeats, int):
            continue  # the flattening form (dim=None) or a tensor of repeats: left as is
        dim = dim % value.dim()
        shape = list(value.shape)
        unsqueezed = insert_call(graph, node, aten.unsqueeze.default, source, dim + 1)
        expanded = insert_call(graph, node, aten.expand.default, unsqueezed, shape[:dim + 1] + [repeats] + shape[dim + 1:])
        merged = shape[:dim] + [shape[dim] * repeats] + shape[dim + 1:]
        reshaped = insert_call(graph, node, aten.reshape.default, expanded, merged)
        node.replace_all_uses_with(reshaped)
        graph.erase_node(node)
        changed += 1
    return changed


def _decompose_rms_norms(graph: torch.fx.Graph) -> int:
    changed = 0
    for node in list(graph.nodes):
        if node.target != aten.rms_norm.default:
            continue
        x, shape = node.args[0], node.args[1]
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        value = tensor_meta(x)
        if value is None or len(shape) != 1:
            continue  # a norm over several dimensions stays whole (recognition then names it)
        if eps is None:
            eps = torch.finfo(value.dtype).eps
        square = insert_call(graph, node, aten.mul.Tensor, x, x)
        mean = insert_call(graph, node, aten.mean.dim, square, [-1], True)
        rsqrt = insert_call(graph, node, aten.rsqrt.default, insert_call(graph, node, aten.add.Tensor, mean, eps))
        result = insert_call(graph, node, aten.mul.Tensor, x, rsqrt)
        if weight is not None:
            result = insert_call(graph, node, aten.mul.Tensor, result, weight)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        changed += 1
    return changed


class Canonicalize(GraphPass):
    """See the module docstring."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        changed = (drop_identity_ops(graph) + _drop_empty_concatenations(graph) + _expand_repeat_interleave(graph)
                   + _decompose_rms_norms(graph))
        graph.eliminate_dead_code()
        return PassResult(gm, bool(changed))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            require(not is_identity(node) and node.target not in EXPORT_ASSERTS, "identity op left after Canonicalize", node)
