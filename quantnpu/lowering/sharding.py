"""Splitting a decoder's Q/DQ graph into contiguous shards of layers, one QNN context each.

A QNN HTP context binary is mapped whole into the DSP's address space when a phone loads it, and
QNN's offline prepare holds the whole context's graph and weights in host memory several times over
while it compiles. Both scale with the weights in one context, so a large decoder is lowered as
several contexts, each compiled on its own (ExecuTorch's Qualcomm llama example does the same with
`num_sharding`, by inserting a CPU fallback op between shards; here the partitioner cuts the graph
itself, so nothing runs on the CPU between them).

The plan is made on the Q/DQ graph, from the layer indices AnnotateRoles recorded
(`quantnpu.graph.meta.node_info`): every node belongs to a decoder layer (its own role's, else the
latest layer among its inputs, else for nodes fed only by constants or graph inputs the earliest
layer of its users), so the embedding goes with layer 0 and the final norm and lm_head with the last
layer, and every edge runs from a layer to the same or a later one. The layers are grouped into
contiguous shards that balance the weight bytes each context will hold (each weight at its
quantized bit width, which is what QNN stores), either as many as asked or the fewest that keep
every context under a size limit. Each node's shard travels to ExecuTorch's edge program in
`node.meta["custom"]`, the metadata torch.export and ExportPass retracing carry along, and the
sharding partitioner splits QNN's partitions by it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx

from quantnpu.errors import QuantNpuError
from quantnpu.graph.meta import node_info
from quantnpu.graph.ops import fetch_attr, quantize_kind

SHARD_KEY = "quantnpu_shard"

# The largest QNN context (the weights it holds, at their stored bit widths) lowered without
# splitting. A context is mapped whole into one HTP process domain (PD) at load time; a PD maps
# about 3.5 GB in all (llama.cpp's Hexagon backend notes) and holds everything else the session
# maps too, ExecuTorch's first sharded Llama was made after a 1.07 GiB weights buffer failed to
# map on an SM8650 phone (pytorch/executorch#4923), and the configurations ExecuTorch's llama
# example ships shard the 2.7-4 GB programs into contexts of 0.5-0.9 GB each while keeping the
# 1.1-1.8 GB ones whole (backends/qualcomm/tests/test_qnn_delegate.py, examples/qualcomm/
# oss_scripts/llama/__init__.py). 1 GiB keeps a context in the range that is known to load.
DEFAULT_CONTEXT_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class ShardPlan:
    """`first_layers[i]`: the first decoder layer of shard i; `weight_bytes[i]`: the weights its QNN
    context will hold (each at its quantized bit width); `layers`: the decoder's layer count.
    `node_shard`: the shard of each node of the planned graph, by name."""

    shards: int
    first_layers: tuple[int, ...]
    weight_bytes: tuple[int, ...]
    layers: int
    node_shard: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        bounds = list(self.first_layers) + [self.layers]
        return ", ".join(f"layers {bounds[i]}-{bounds[i + 1] - 1} ({self.weight_bytes[i] / 2**20:.1f} MiB)"
                         for i in range(self.shards))


def _quant_range(node: torch.fx.Node) -> tuple[int, int] | None:
    """(quant_min, quant_max) of a PT2E quantize/dequantize node."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    values = dict(zip((a.name for a in schema.arguments), node.args))
    values.update(node.kwargs)
    if "quant_min" not in values or "quant_max" not in values:
        return None
    return int(values["quant_min"]), int(values["quant_max"])


def stored_bytes(tensor: torch.Tensor, users: list[torch.fx.Node]) -> int:
    """Bytes a constant takes in a QNN context: at the bit width of the encoding its dequantize
    reads it with (an 8-bit weight held as int8, a 16-bit one held as int32 by PT2E, a 4-bit one
    held as int8), else at its own element size."""
    bits = tensor.element_size() * 8
    for user in users:
        if quantize_kind(user) == "dequantize" and (bounds := _quant_range(user)) is not None:
            bits = max(1, math.ceil(math.log2(bounds[1] - bounds[0] + 1)))
            break
    return math.ceil(tensor.numel() * bits / 8)


def layer_units(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    """The decoder layer each call_function and constant node belongs to (see the module's
    docstring); empty when no node carries a layer index."""
    nodes = list(gm.graph.nodes)
    unit: dict[torch.fx.Node, int] = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        info = node_info(node)
        found = [unit[i] for i in node.all_input_nodes if i in unit]
        if info is not None and info.layer is not None:
            found.append(info.layer)
        if found:
            unit[node] = max(found)
    if not unit:
        return {}
    last = max(unit.values())
    for node in reversed(nodes):
        if node.op in ("call_function", "get_attr") and node not in unit:
            later = [unit[u] for u in node.users if u in unit]
            unit[node] = min(later) if later else last
    return unit


def _min_max_groups(sizes: list[int], groups: int) -> tuple[int, list[int]]:
    """Split `sizes` into `groups` contiguous non-empty runs minimizing the largest run's sum:
    (that sum, the start index of each run)."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][i]: the smallest largest-run sum splitting sizes[:i] into k runs; start[k][i]: where the last run starts
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    start = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for k in range(1, groups + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], start[k][i] = cost, j
    starts, i = [], n
    for k in range(groups, 0, -1):
        i = start[k][i]
        starts.append(i)
    return int(best[groups][n]), starts[::-1]


def plan_shards(gm: torch.fx.GraphModule, shards: int | None = None,
                context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES) -> ShardPlan:
    """Group the decoder's layers into `shards` contiguous shards balancing their weight bytes, or,
    with `shards=None`, into the fewest whose QNN contexts each hold at most `context_limit_bytes`.
    A graph without layer indices is one shard (asking for more is an error)."""
    if shards is not None and shards < 1:
        raise QuantNpuError(f"shards must be at least 1, not {shards}")
    unit = layer_units(gm)
    sizes_by_unit: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node in unit:
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                sizes_by_unit[unit[node]] = sizes_by_unit.get(unit[node], 0) + stored_bytes(value, list(node.users))
    total = sum(sizes_by_unit.values())
    if not unit:
        if shards not in (None, 1):
            raise QuantNpuError(f"cannot split the graph into {shards} shards: none of its nodes carries a decoder "
                                "layer index (AnnotateRoles did not run on it)")
        return ShardPlan(1, (0,), (total,), 0)
    layers = max(unit.values()) + 1
    sizes = [sizes_by_unit.get(i, 0) for i in range(layers)]
    if shards is not None:
        if shards > layers:
            raise QuantNpuError(f"cannot split a decoder of {layers} layers into {shards} shards")
        largest, starts = _min_max_groups(sizes, shards)
    else:
        for shards in range(1, layers + 1):
            largest, starts = _min_max_groups(sizes, shards)
            if largest <= context_limit_bytes:
                break
        else:
            worst = max(range(layers), key=sizes.__getitem__)
            raise QuantNpuError(f"decoder layer {worst} alone holds {sizes[worst] / 2**20:.1f} MiB of weights, over the "
                                f"per-context limit of {context_limit_bytes / 2**20:.1f} MiB: no split by layers fits")
    bounds = starts + [layers]
    shard_of_unit = {u: s for s in range(shards) for u in range(bounds[s], bounds[s + 1])}
    weight_bytes = tuple(sum(sizes[bounds[s]:bounds[s + 1]]) for s in range(shards))
    return ShardPlan(shards, tuple(starts), weight_bytes, layers,
                     {node.name: shard_of_unit[u] for node, u in unit.items()})


@contextlib.contextmanager
def shards_in_meta(gm: torch.fx.GraphModule, plan: ShardPlan) -> Iterator[None]:
    """Record each node's shard in `node.meta["custom"]` (which torch.export, decompositions and
    ExecuTorch's retracing passes carry to the nodes made from it) while the block runs; the
    graph's meta is as before afterwards."""
    saved = {}
    for node in gm.graph.nodes:
        if node.name in plan.node_shard:
            saved[node] = node.meta.get("custom")
            node.meta["custom"] = {**(saved[node] or {}), SHARD_KEY: plan.node_shard[node.name]}
    try:
        yield
    finally:
        for node, custom in saved.items():
            if custom is None:
                node.meta.pop("custom", None)
            else:
                node.meta["custom"] = custom


def edge_shards(graph: torch.fx.Graph, shards: int) -> dict[torch.fx.Node, int]:
    """The shard of each call_function node of an edge graph: the one its source node was planned
    in, never earlier than any of its inputs' (a node a backend pass made without a source takes
    its inputs' latest shard, or its users' earliest when it reads only constants)."""
    shard: dict[torch.fx.Node, int] = {}
    nodes = list(graph.nodes)
    for node in nodes:
        if node.op != "call_function":
            continue
        found = [shard[i] for i in node.all_input_nodes if i in shard]
        own = (node.meta.get("custom") or {}).get(SHARD_KEY)
        if own is not None:
            found.append(own)
        if found:
            shard[node] = max(found)
    for node in reversed(nodes):
        if node.op == "call_function" and node not in shard:
            later = [shard[u] for u in node.users if u in shard]
            shard[node] = min(later) if later else shards - 1
    return shard
