"""Op sets and graph walkers shared by the passes (one home for each)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx

aten = torch.ops.aten
LINEAR = aten.linear.default
EMBEDDING = aten.embedding.default
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
RSQRT = aten.rsqrt.default
# Activations that gate an MLP (SwiGLU, GeGLU: `act(gate) * up`).
GATE_ACTIVATIONS = {aten.silu.default, aten.gelu.default}
LAYER_NORM = {aten.layer_norm.default, aten.native_layer_norm.default}
# Metadata assertions torch.export leaves in the graph: they consume no value.
EXPORT_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
# Ops that move or relabel data without computing.
PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default,
    aten.clone.default, aten.view.default, aten.reshape.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.contiguous.default, aten.type_as.default,
}


def fetch_attr(gm: torch.fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that consume the value (export's metadata assertions do not)."""
    return [u for u in node.users if u.target not in EXPORT_ASSERTS]


def is_passthrough(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in PASSTHROUGH


def skip_passthrough_forward(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of `node`, looking through data-movement ops."""
    found, frontier = [], data_users(node)
    while frontier:
        user = frontier.pop(0)
        if is_passthrough(user):
            frontier.extend(data_users(user))
        else:
            found.append(user)
    return found


def skip_passthrough_backward(node: torch.fx.Node) -> torch.fx.Node:
    """The value `node` relabels, looking back through data-movement ops."""
    while isinstance(node, torch.fx.Node) and is_passthrough(node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def bfs_users(node: torch.fx.Node, limit: int = 64) -> list[torch.fx.Node]:
    """Nodes downstream of `node`, nearest first, at most `limit`."""
    order, frontier, seen = [], [node], {node}
    while frontier and len(order) < limit:
        for user in frontier.pop(0).users:
            if user not in seen:
                seen.add(user)
                order.append(user)
                frontier.append(user)
    return order


def ancestors(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """Every node `node` is computed from (itself included)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            yield current
            stack.extend(current.all_input_nodes)


def tensor_meta(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def is_weight(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def insert_call(graph: torch.fx.Graph, before: torch.fx.Node, target, *args, **kwargs) -> torch.fx.Node:
    """A new call_function node before `before`, with its `val` metadata computed the way export
    records it: under the graph's fake-tensor mode when its inputs carry fake tensors (so later
    retracing, e.g. ExecuTorch's decompositions, sees one device), else on the meta device."""
    from torch._guards import detect_fake_mode
    from torch.fx.node import map_arg

    with graph.inserting_before(before):
        node = graph.call_function(target, args, kwargs)
    values = [n.meta.get("val") for n in node.all_input_nodes]
    mode = detect_fake_mode(values)
    if mode is not None:
        with mode:
            node.meta["val"] = target(*map_arg(args, lambda n: n.meta["val"]), **map_arg(kwargs, lambda n: n.meta["val"]))
    else:
        def as_meta(n: torch.fx.Node):
            val = n.meta.get("val")
            return torch.empty(val.shape, dtype=val.dtype, device="meta") if isinstance(val, torch.Tensor) else val

        node.meta["val"] = target(*map_arg(args, as_meta), **map_arg(kwargs, as_meta))
    return node


_QUANTIZE = ("quantize_per_tensor", "quantize_per_channel")
_DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel")


def quantize_kind(node: torch.fx.Node) -> str | None:
    """'quantize', 'dequantize' (PT2E's Q/DQ ops, any dialect), or None for any other node."""
    name = str(node.target)
    if any(q in name for q in _DEQUANTIZE):
        return "dequantize"
    if any(q in name for q in _QUANTIZE):
        return "quantize"
    return None
