"""What passes learn about a node, stored on the node itself.

Two records, each a frozen dataclass that passes replace rather than mutate (so a copied graph
never shares state with its original):
- `node.meta["quantnpu"]`, a `NodeInfo`: the node's structural role in the decoder (AnnotateRoles)
  and, for linears, whether their input is rotated (FuseRotations);
- `node.meta["quantnpu_quant"]`, a `TensorQuant`: how the tensor this node computes is quantized
  (labels, bits, encoding) and which of its inputs it re-quantizes. Observer nodes carry their
  tensor's record while observing; after calibration the tensor's own node does.
The Quantizer, the reports and the tests all read these two places.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.fx

META_KEY = "quantnpu"
QUANT_KEY = "quantnpu_quant"

# Roles recorded by AnnotateRoles, per decoder layer and for the whole model.
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_NORMS = ("input_norm", "post_attention_norm")
MODEL_ROLES = ("embedding", "final_norm", "lm_head")


@dataclass(frozen=True)
class NodeInfo:
    """`role` is unique in the graph, e.g. `layers.3.q_proj`, `embedding`, `final_norm`;
    `kind` is the role without the layer (`q_proj`), `layer` its index or None.
    `input_rotated` (linears, after FuseRotations): the activation the linear reads is rotated
    (R1 for readers of the residual stream, R2 for o_proj). `smoothing` (SmoothUnrotatedInputs):
    the factor parameter and alpha scaling this linear's output rows or input columns."""

    role: str
    kind: str
    layer: int | None = None
    input_rotated: bool | None = None
    smoothing: str | None = None

    def describe(self) -> str:
        return (f"role={self.role}" + (f" input_rotated={self.input_rotated}" if self.input_rotated is not None else "")
                + (f" smoothing={self.smoothing}" if self.smoothing else ""))


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor is quantized. `labels`: the bit plan's names for it (quantizers/bit_plan.py);
    `rotated`: its values are rotated (the initialization rule reads this); `weight`: a parameter,
    quantized per output channel. Edges into this node that re-quantize what they read:
    `input_bits` (input node name, bits) and, after calibration, `input_encodings`.
    `sensitivity` / `promoted_input_bits` (down_proj, AssignBitWidths): its input's relative 8-bit
    error and, for the most sensitive layers, the bits its input is promoted to.
    `learned_input` / `learned_weight` (linears, LearnEncodings): stage one's encodings of the
    input this linear reads and of its weight; stage two keeps them frozen."""

    labels: tuple[str, ...] = ()
    rotated: bool = False
    weight: bool = False
    bits: int | None = None
    encoding: Any = None
    input_bits: tuple[tuple[str, int], ...] = ()
    input_encodings: tuple[tuple[str, Any], ...] = ()
    sensitivity: float | None = None
    promoted_input_bits: int | None = None
    learned_input: Any = None
    learned_weight: Any = None

    def input_encoding(self, name: str) -> Any:
        return dict(self.input_encodings).get(name)

    def describe(self) -> str:
        fields = []
        if self.labels:
            fields.append("labels=" + ",".join(self.labels))
        if self.rotated:
            fields.append("rotated")
        if self.bits is not None:
            fields.append(f"bits={self.bits}")
        if self.encoding is not None:
            fields.append(f"encoding={self.encoding.describe() if hasattr(self.encoding, 'describe') else self.encoding}")
        if self.sensitivity is not None:
            fields.append(f"sensitivity={self.sensitivity:.3f}" + (f"->{self.promoted_input_bits}" if self.promoted_input_bits else ""))
        for what, learned in (("input", self.learned_input), ("weight", self.learned_weight)):
            if learned is not None:
                fields.append(f"learned_{what}={learned.describe() if hasattr(learned, 'describe') else learned}")
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


def tensor_quant(node: torch.fx.Node) -> TensorQuant | None:
    return node.meta.get(QUANT_KEY)


def update_tensor_quant(node: torch.fx.Node, **changes: Any) -> TensorQuant:
    """Replace fields of the node's quantization record (creating an empty one first)."""
    record = dataclasses.replace(tensor_quant(node) or TensorQuant(), **changes)
    node.meta[QUANT_KEY] = record
    return record


def nodes_by_role(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Every annotated node keyed by its role."""
    return {info.role: node for node in gm.graph.nodes if (info := node_info(node)) is not None}
