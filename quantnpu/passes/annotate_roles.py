"""AnnotateRoles: find the decoder structure in the graph and record each node's role.

Annotated nodes (`node.meta["quantnpu"].role`):
- `embedding`: the token-embedding lookup;
- `layers.N.{q,k,v,o,gate,up,down}_proj`: the linear ops of decoder layer N;
- `layers.N.input_norm` (before attention), `layers.N.post_attention_norm` (before the MLP),
  `final_norm`: the output node of each RMSNorm (its weight multiply, if it has one);
- optional per layer: `layers.N.q_norm` / `k_norm` (Qwen3, Gemma-3: RMSNorm per head on the
  query and key), `layers.N.attention_output_norm` / `mlp_output_norm` (Gemma-2/3 "sandwich"
  norms on o_proj's and down_proj's outputs before the residual add);
- `layers.N.attention`: the attention op: `scaled_dot_product_attention`, or for eager attention
  (matmul, softmax, matmul) the matmul with the values;
- `lm_head`: the output projection.

The structure is read from the graph alone, whatever the module names (they differ between
Hugging Face, ExecuTorch and other compilers, and a name can lie): RMSNorm is
`x * rsqrt(mean(x * x) + eps) [* weight]`; q/k/v are told apart by the attention input they reach,
gate from up by the activation (SiLU, GELU) it feeds, down as the linear reading the gated
product. Anything that does not fit — a LayerNorm, a fused q/k/v or gate/up projection, parallel
attention and MLP blocks, a norm somewhere else, a linear outside the pattern — is an error naming
the node. Run `Canonicalize` and `FoldConstants` first.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.graph.ops import (
    CASTS, EMBEDDING, GATE_ACTIVATIONS, LINEAR, MATMUL, SDPA, SOFTMAX,
    bfs_users, compute_nodes, fetch_attr, is_weight, skip_passthrough_backward,
    skip_passthrough_forward, tensor_meta,
)
from quantnpu.graph.patterns import RmsNorm, rms_norms
from quantnpu.graph.meta import (
    LAYER_LINEARS, LAYER_NORMS, MODEL_ROLES, NodeInfo, layer_role, model_role, node_info, set_node_info,
)

aten = torch.ops.aten
OPTIONAL_LAYER_NORMS = ("q_norm", "k_norm", "attention_output_norm", "mlp_output_norm")
# Ops that cut one projection's output into several (a fused gate/up or q/k/v projection).
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor, aten.unbind.int}
# Ops allowed between an eager attention's score matmul and its softmax (scale, soft-cap, mask).
_SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.tanh.default} | CASTS


def is_rotation_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A bias-free linear whose weight is a constant orthogonal square matrix: an online rotation
    (QuaRot/SpinQuant style), not a layer of the model."""
    if node.target != LINEAR or len(node.args) > 2 and node.args[2] is not None:
        return False
    weight = node.args[1]
    if not is_weight(weight):
        return False
    value = fetch_attr(gm, weight.target)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != value.shape[1]:
        return False
    value = value.detach().double()
    if (value.pow(2).sum(1) - 1).abs().max() > 1e-4:  # cheap: an orthogonal matrix has unit rows
        return False
    return bool((value @ value.T - torch.eye(value.shape[0], dtype=torch.float64)).abs().max() < 1e-4)


# ---- attention ------------------------------------------------------------------------------

def _eager_scores(softmax: torch.fx.Node) -> torch.fx.Node | None:
    """The matmul `q @ k^T` whose scores (scaled, capped, masked) reach `softmax`."""
    node = softmax.args[0]
    for _ in range(16):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.target in MATMUL:
            return node
        if node.target not in _SCORE_OPS:
            return None
        # follow the one input that depends on the scores (the others are constants or the mask)
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
        if len(inputs) != 1:
            inputs = [a for a in inputs if any(x.target in MATMUL for x in _upstream(a, 8))]
            if len(inputs) != 1:
                return None
        node = inputs[0]
    return None


def _upstream(node: torch.fx.Node, limit: int) -> list[torch.fx.Node]:
    order, frontier = [], [node]
    while frontier and len(order) < limit:
        current = frontier.pop(0)
        order.append(current)
        frontier.extend(current.all_input_nodes)
    return order


def attention_inputs(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """(query, key, value) as the attention op `node` reads them: SDPA's first three arguments, or
    for eager attention (`node` is the value matmul) the score matmul's operands and the values."""
    if node.target == SDPA:
        return node.args[0], node.args[1], node.args[2]
    probabilities = skip_passthrough_backward(node.args[0])
    scores = _eager_scores(probabilities) if probabilities.target in SOFTMAX else None
    if node.target not in MATMUL or scores is None:
        raise GraphStructureError("not an attention op (scaled_dot_product_attention or softmax(q k^T) v)", node.name)
    return scores.args[0], scores.args[1], node.args[1]


def attention_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Every attention op: SDPA nodes, and the value matmul of each eager softmax(q k^T) v."""
    found = []
    for node in compute_nodes(gm):
        if node.target == SDPA:
            found.append(node)
        elif node.target in SOFTMAX and _eager_scores(node) is not None:
            values = [u for u in skip_passthrough_forward(node) if u.target in MATMUL and skip_passthrough_backward(u.args[0]) is node]
            if len(values) == 1:
                found.append(values[0])
    return found


def _attention_slots(gm: torch.fx.GraphModule) -> dict[tuple[torch.fx.Node, int], tuple[torch.fx.Node, int]]:
    """(consumer, argument position) -> (attention op, 0 query | 1 key | 2 value)."""
    slots = {}
    for attention in attention_ops(gm):
        if attention.target == SDPA:
            for index in range(3):
                slots[(attention, index)] = (attention, index)
        else:
            scores = _eager_scores(skip_passthrough_backward(attention.args[0]))
            slots[(scores, 0)] = (attention, 0)
            slots[(scores, 1)] = (attention, 1)
            slots[(attention, 1)] = (attention, 2)
    return slots


def _attention_input(gm, linear: torch.fx.Node, slots, limit: int = 96) -> tuple[torch.fx.Node, int] | None:
    """The attention op and input (0 query, 1 key, 2 value) the linear's output flows into first."""
    frontier, seen = [linear], {linear}
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        for user in node.users:
            for position, arg in enumerate(user.args):
                if arg is node and (user, position) in slots:
                    return slots[(user, position)]
            if user not in seen and (user.target != LINEAR or is_rotation_linear(gm, user)):
                seen.add(user)
                frontier.append(user)
    return None


# ---- recognition ----------------------------------------------------------------------------

def _gate_activation(linear: torch.fx.Node) -> torch.fx.Node | None:
    activations = [u for u in skip_passthrough_forward(linear) if u.target in GATE_ACTIVATIONS]
    return activations[0] if len(activations) == 1 else None


def find_roles(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, NodeInfo]:
    """Roles of the graph's nodes (see the module docstring); raises GraphStructureError."""
    roles: dict[torch.fx.Node, NodeInfo] = {}
    embeddings = [n for n in compute_nodes(gm) if n.target == EMBEDDING]
    if len(embeddings) > 1:
        raise GraphStructureError(f"{len(embeddings)} embedding lookups; a decoder LM has one", embeddings[1].name)
    if embeddings:
        roles[embeddings[0]] = model_role("embedding")
    slots = _attention_slots(gm)
    norms = rms_norms(gm)
    layers = 0
    deferred: list[RmsNorm] = []
    for index, norm in enumerate(norms):
        readers = list(dict.fromkeys(u for u in skip_passthrough_forward(norm.output)
                                     if u.target == LINEAR and not is_rotation_linear(gm, u)))
        targets = [_attention_input(gm, linear, slots) for linear in readers]
        if not readers:
            deferred.append(norm)
        elif all(t is not None for t in targets) and len(readers) == 3 and len({t[0] for t in targets}) == 1 \
                and sorted(t[1] for t in targets) == [0, 1, 2]:
            layer, layers = layers, layers + 1
            roles[norm.output] = layer_role(layer, "input_norm")
            attention = targets[0][0]
            roles[attention] = layer_role(layer, "attention")
            for linear, (_, slot) in zip(readers, targets):
                roles[linear] = layer_role(layer, ("q_proj", "k_proj", "v_proj")[slot])
            outputs = [u for u in skip_passthrough_forward(attention) if u.target == LINEAR and not is_rotation_linear(gm, u)]
            if len(outputs) != 1:
                raise GraphStructureError("attention output does not feed exactly one linear (o_proj)", attention.name)
            roles[outputs[0]] = layer_role(layer, "o_proj")
        elif len(readers) == 1 and targets[0] is not None:
            raise GraphStructureError("a fused q/k/v projection (one linear for query, key and value) is not supported; "
                                      "split it into q_proj, k_proj and v_proj", readers[0].name)
        elif len(readers) == 2 and all(t is None for t in targets):
            gates = [linear for linear in readers if _gate_activation(linear) is not None]
            if len(gates) != 1:
                raise GraphStructureError("cannot tell gate_proj (feeds SiLU/GELU) from up_proj", readers[0].name)
            if layers == 0:
                raise GraphStructureError("MLP norm before any attention block", norm.output.name)
            layer = layers - 1
            gate = gates[0]
            up = next(linear for linear in readers if linear is not gate)
            roles[norm.output] = layer_role(layer, "post_attention_norm")
            roles[gate] = layer_role(layer, "gate_proj")
            roles[up] = layer_role(layer, "up_proj")
            activation = _gate_activation(gate)
            products = [u for u in skip_passthrough_forward(up) if u.target == aten.mul.Tensor
                        and any(skip_passthrough_backward(a) is activation for a in u.args)]
            # the first linear after the gated product (an online rotation may sit between)
            downs = [next((u for u in bfs_users(p) if u.target == LINEAR and not is_rotation_linear(gm, u)), None) for p in products]
            downs = [d for d in downs if d is not None]
            if len(downs) != 1:
                raise GraphStructureError("gated product act(gate_proj) * up_proj does not feed exactly one linear (down_proj)", up.name)
            roles[downs[0]] = layer_role(layer, "down_proj")
        elif len(readers) == 1 and index == len(norms) - 1:
            roles[norm.output] = model_role("final_norm")
            roles[readers[0]] = model_role("lm_head")
        elif len(readers) == 1 and any(u.target in _SPLITS for u in skip_passthrough_forward(readers[0])):
            raise GraphStructureError("a fused gate/up projection (one linear for both) is not supported; "
                                      "split it into gate_proj and up_proj", readers[0].name)
        else:
            hint = " (parallel attention and MLP blocks reading one norm are not supported)" if len(readers) > 3 else ""
            raise GraphStructureError(f"RMSNorm output feeds {len(readers)} linears; expected 3 (q/k/v), 2 (gate/up) "
                                      f"or 1 (lm_head){hint}", norm.output.name)
    for norm in deferred:
        source = skip_passthrough_backward(norm.input)
        info = roles.get(source)
        kind = {"q_proj": "q_norm", "k_proj": "k_norm", "o_proj": "attention_output_norm",
                "down_proj": "mlp_output_norm"}.get(info.kind if info else None)
        if kind is None:
            raise GraphStructureError("RMSNorm reads neither the residual stream nor a q/k/o/down projection's output; "
                                      "a norm in this place is not supported", norm.output.name)
        roles[norm.output] = layer_role(info.layer, kind)
    _validate(gm, roles)
    return roles


def _validate(gm: torch.fx.GraphModule, roles: dict[torch.fx.Node, NodeInfo]) -> None:
    by_role: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node, info in roles.items():
        by_role[info.role].append(node)
    for role, nodes in by_role.items():
        if len(nodes) > 1:
            raise GraphStructureError(f"role {role} found on {len(nodes)} nodes ({', '.join('%' + n.name for n in nodes)})", nodes[1].name)
    for kind in MODEL_ROLES:
        if kind not in by_role:
            raise GraphStructureError(f"no {kind} found: not a decoder LM graph (input_ids -> embedding -> layers -> final norm -> lm_head)")
    layers = sorted({info.layer for info in roles.values() if info.layer is not None})
    if not layers:
        raise GraphStructureError("no decoder layers found")
    if layers != list(range(len(layers))):
        raise GraphStructureError(f"decoder layer indices are not contiguous from 0: {layers}")
    for layer in layers:
        for kind in LAYER_LINEARS + LAYER_NORMS:
            if f"layers.{layer}.{kind}" not in by_role:
                raise GraphStructureError(f"decoder layer {layer} has no {kind}")
    unexplained = [n for n in compute_nodes(gm) if n.target == LINEAR and n not in roles and not is_rotation_linear(gm, n)]
    if unexplained:
        raise GraphStructureError("linear is not part of any recognised decoder layer or lm_head", unexplained[0].name)


class AnnotateRoles(GraphPass):
    """Record every structural role on its node (see the module docstring)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        roles = find_roles(gm)
        modified = False
        for node, info in roles.items():
            current = node_info(node)
            if current is None or current.role != info.role:
                set_node_info(node, info)
                modified = True
        return PassResult(gm, modified)


class DecoderDims:
    """Sizes of an annotated decoder, read from its weights and attention shapes."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        from quantnpu.graph.meta import nodes_by_role
        from quantnpu.passes.weights import weight_tensor

        by_role = nodes_by_role(gm)
        if "lm_head" not in by_role:
            raise GraphStructureError("no roles on the graph: run AnnotateRoles first")
        self.layers = 1 + max(node_info(n).layer for n in by_role.values() if node_info(n).layer is not None)
        attention = by_role["layers.0.attention"]
        query = tensor_meta(attention_inputs(attention)[0])
        if query is None or query.dim() != 4:
            raise GraphStructureError("attention query has no [batch, heads, seq, head_dim] shape metadata", attention.name)
        self.head_dim = int(query.shape[-1])
        def shape(role: str) -> torch.Size:  # a plain parameter, or (after FuseRotations) an expression of one
            weight = by_role[role].args[1]
            return weight_tensor(gm, weight).shape if weight.op == "get_attr" else tensor_meta(weight).shape

        self.hidden = int(shape("layers.0.q_proj")[1])
        self.heads = int(shape("layers.0.q_proj")[0]) // self.head_dim
        self.kv_heads = int(shape("layers.0.v_proj")[0]) // self.head_dim
