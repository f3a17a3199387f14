"""What passes learn about a node, stored on the node itself under `node.meta["quantnpu"]`.

One frozen dataclass per node; passes replace it (`update_node_info`) rather than mutate it,
so a copied graph never shares state with its original. The Quantizer, the reports and the
tests all read this one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.fx

META_KEY = "quantnpu"

# Roles recorded by AnnotateRoles, per decoder layer and for the whole model.
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_NORMS = ("input_norm", "post_attention_norm")
MODEL_ROLES = ("embedding", "final_norm", "lm_head")


@dataclass(frozen=True)
class NodeInfo:
    """`role` is unique in the graph, e.g. `layers.3.q_proj`, `embedding`, `final_norm`;
    `kind` is the role without the layer (`q_proj`), `layer` its index or None."""

    role: str
    kind: str
    layer: int | None = None
    rotated: bool | None = None
    bits: int | None = None
    encoding: Any = None
    labels: tuple[str, ...] = ()  # the bit plan's names for the tensor (see quantizers/bit_plan.py)
    # Edges that re-quantize what they read: (input node name, bits) and (input node name, Encoding).
    input_bits: tuple[tuple[str, int], ...] = ()
    input_encodings: tuple[tuple[str, Any], ...] = ()

    def input_encoding(self, name: str) -> Any:
        return dict(self.input_encodings).get(name)

    def describe(self) -> str:
        fields = [f"role={self.role}"]
        if self.labels:
            fields.append("labels=" + ",".join(self.labels))
        for name in ("rotated", "bits", "encoding"):
            value = getattr(self, name)
            if value is not None:
                fields.append(f"{name}={value.describe() if hasattr(value, 'describe') else value}")
        if self.input_bits:
            fields.append("inputs=" + ",".join(f"%{n}:{b}" for n, b in self.input_bits))
        return " ".join(fields)


def layer_role(layer: int, kind: str) -> NodeInfo:
    return NodeInfo(role=f"layers.{layer}.{kind}", kind=kind, layer=layer)


def model_role(kind: str) -> NodeInfo:
    return NodeInfo(role=kind, kind=kind)


def node_info(node: torch.fx.Node) -> NodeInfo | None:
    return node.meta.get(META_KEY)


def set_node_info(node: torch.fx.Node, info: NodeInfo) -> None:
    node.meta[META_KEY] = info


def update_node_info(node: torch.fx.Node, **changes: Any) -> NodeInfo:
    info = node_info(node)
    if info is None:
        raise KeyError(f"node %{node.name} has no {META_KEY} info to update")
    info = dataclasses.replace(info, **changes)
    set_node_info(node, info)
    return info


def nodes_by_role(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Every annotated node keyed by its role."""
    return {info.role: node for node in gm.graph.nodes if (info := node_info(node)) is not None}
