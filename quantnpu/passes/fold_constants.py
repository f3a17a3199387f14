"""FoldConstants: replace every input-independent subgraph by its value.

With a static sequence length the causal mask, the position ids and the RoPE cos/sin tables
depend on no graph input, yet Hugging Face's export computes them with ops the QNN backend
rejects (cumsum, integer `index.Tensor`, rank-4 boolean logic). This pass evaluates each such
subgraph once and leaves a `get_attr` of the result (a buffer named `_folded_<node>`), so the
lowered graph keeps only embedding, linear, RMSNorm pieces, RoPE mul/add, attention and SiLU.

Only nodes whose value feeds input-dependent computation are materialized; export's metadata
assertions on folded values are checked while folding and then dropped. A plain parameter
feeding an op stays a parameter: only computed values are folded.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.node import map_arg

from quantnpu.passes.base import GraphPass, PassResult

from quantnpu.graph.ops import EXPORT_ASSERTS, fetch_attr

aten = torch.ops.aten
_NONDETERMINISTIC = {aten.rand.default, aten.randn.default, aten.randint.default, aten.dropout.default,
                     aten.bernoulli.default, aten.normal.Tensor_float, aten.empty.memory_format}


def evaluate_nodes(
    gm: torch.fx.GraphModule, nodes: set[torch.fx.Node], compute_dtype: torch.dtype | None = None,
) -> dict[torch.fx.Node, object]:
    """Values of `nodes` (input-independent call_functions) and the get_attrs they read.

    With `compute_dtype`, floating tensors read from the module are upcast to it first (so e.g.
    weight rotations are multiplied in float64); results keep that dtype.
    """
    values: dict[torch.fx.Node, object] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "get_attr" and any(u in nodes for u in node.users):
                value = fetch_attr(gm, node.target)
                if compute_dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
                    value = value.to(compute_dtype)
                values[node] = value
            elif node in nodes:
                args = map_arg(node.args, lambda n: values[n])
                kwargs = map_arg(node.kwargs, lambda n: values[n])
                values[node] = node.target(*args, **kwargs)
    return values


def input_independent_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """call_function nodes whose value is fixed once the module's attributes are."""
    constant: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op == "call_function" and node.target not in _NONDETERMINISTIC:
            inputs = node.all_input_nodes
            if all(i in constant for i in inputs):
                constant.add(node)
    return {n for n in constant if n.op == "call_function"}


class FoldConstants(GraphPass):
    """Evaluate input-independent subgraphs and keep only their results (module docstring)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        foldable = input_independent_nodes(gm)
        if not foldable:
            return PassResult(gm, False)
        values = evaluate_nodes(gm, foldable)
        graph = gm.graph
        for node in list(graph.nodes):
            if node in foldable and node.target in EXPORT_ASSERTS:
                graph.erase_node(node)  # it held while folding (evaluation above would have raised)
        boundary = [
            n for n in graph.nodes
            if n in foldable and isinstance(values[n], torch.Tensor)
            and any(u not in foldable for u in n.users)
        ]
        # Every layer re-derives the same RoPE tables; equal values share one buffer.
        buffers: list[tuple[str, torch.Tensor]] = []
        for node in boundary:
            value = values[node]
            name = next((n for n, b in buffers if b.shape == value.shape and b.dtype == value.dtype
                         and torch.equal(b, value)), None)
            if name is None:
                name = f"_folded_{node.name}"
                gm.register_buffer(name, value.detach().clone().contiguous())
                buffers.append((name, value))
            with graph.inserting_before(node):
                folded = graph.get_attr(name)
            folded.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
            node.replace_all_uses_with(folded, delete_user_cb=lambda user: user not in foldable)
        graph.eliminate_dead_code()
        drop_unused_submodules(gm)
        return PassResult(gm, bool(boundary))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n for n in input_independent_nodes(gm) if n.users]
        if left:
            raise AssertionError(f"input-independent node %{left[0].name} ({left[0].target}) was not folded")


def drop_unused_submodules(gm: torch.fx.GraphModule) -> None:
    """Higher-order ops reference submodules by get_attr; drop those no node uses any more."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, child in list(gm.named_children()):
        if isinstance(child, torch.fx.GraphModule) and name not in used:
            delattr(gm, name)
