"""AnnotateRoles: find the decoder structure in the graph and record each node's role.

Annotated nodes (`node.meta["quantnpu"].role`):
- `embedding`: the token-embedding lookup;
- `layers.N.{q,k,v,o,gate,up,down}_proj`: the linear ops of decoder layer N;
- `layers.N.input_norm`, `layers.N.post_attention_norm`, `final_norm`: the output node of each
  RMSNorm (its weight multiply);
- `layers.N.attention`: the scaled-dot-product attention op;
- `lm_head`: the output projection.

The structure is read from `nn_module_stack` metadata when the export kept it (Hugging Face
module names: `layers.N.self_attn.q_proj`, `layers.N.input_layernorm`, `norm`, `lm_head`, ...)
and otherwise from the graph's shape: RMSNorm as pow/mean/add/rsqrt/mul, q/k/v told apart by
the attention input they reach, gate by the SiLU it feeds. A graph that does not yield a
complete decoder (every layer with its seven linears and two norms, one embedding, one final
norm, one lm_head) is an error naming what is missing or the node that does not fit.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.fold_constants import EXPORT_ASSERTS, fetch_attr
from quantnpu.passes.meta import (
    LAYER_LINEARS, LAYER_NORMS, MODEL_ROLES, NodeInfo, layer_role, model_role, node_info, set_node_info,
)

aten = torch.ops.aten
LINEAR = aten.linear.default
EMBEDDING = aten.embedding.default
SDPA = aten.scaled_dot_product_attention.default

# Ops that move or relabel data without computing: seen between a norm and its linears.
PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default,
    aten.clone.default, aten.view.default, aten.reshape.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.contiguous.default,
}

_LAYER_LINEAR_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
_LAYER_NORM_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(input_layernorm|post_attention_layernorm)$")
_LAYER_ATTENTION_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")
_FINAL_NORM_PATH = re.compile(r"(?:^|\.)(?:model\.)?norm$")
_LM_HEAD_PATH = re.compile(r"(?:^|\.)lm_head$")
_NORM_KIND = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm"}


def is_rotation_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A bias-free linear whose weight is a constant orthogonal square matrix: an online rotation
    (QuaRot/SpinQuant style), not a layer of the model."""
    if node.target != LINEAR or len(node.args) > 2 and node.args[2] is not None:
        return False
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return False
    value = fetch_attr(gm, weight.target)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != value.shape[1]:
        return False
    value = value.detach().double()
    if (value.pow(2).sum(1) - 1).abs().max() > 1e-4:  # cheap: an orthogonal matrix has unit rows
        return False
    return bool((value @ value.T - torch.eye(value.shape[0], dtype=torch.float64)).abs().max() < 1e-4)


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _roles_from_module_stack(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, NodeInfo]:
    roles: dict[torch.fx.Node, NodeInfo] = {}
    norm_outputs: dict[str, torch.fx.Node] = {}  # norm module path -> last node inside it
    norm_info: dict[str, NodeInfo] = {}
    for node in _compute_nodes(gm):
        path = _module_path(node)
        if path is None:
            continue
        if node.target == LINEAR:
            if match := _LAYER_LINEAR_PATH.search(path):
                roles[node] = layer_role(int(match.group(1)), match.group(2))
            elif _LM_HEAD_PATH.search(path):
                roles[node] = model_role("lm_head")
        elif node.target == EMBEDDING:
            roles[node] = model_role("embedding")
        elif node.target == SDPA and (match := _LAYER_ATTENTION_PATH.search(path)):
            roles[node] = layer_role(int(match.group(1)), "attention")
        elif match := _LAYER_NORM_PATH.search(path):
            norm_outputs[path] = node
            norm_info[path] = layer_role(int(match.group(1)), _NORM_KIND[match.group(2)])
        elif _FINAL_NORM_PATH.search(path):
            norm_outputs[path] = node
            norm_info[path] = model_role("final_norm")
    for path, node in norm_outputs.items():
        roles[node] = norm_info[path]
    return roles


# ---- structural fallback -------------------------------------------------------------------

def _data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that consume the value (export's metadata assertions do not)."""
    return [u for u in node.users if u.target not in EXPORT_ASSERTS]


def skip_passthrough_forward(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of `node`, looking through data-movement ops."""
    found, frontier = [], _data_users(node)
    while frontier:
        user = frontier.pop(0)
        if user.op == "call_function" and user.target in PASSTHROUGH:
            frontier.extend(_data_users(user))
        else:
            found.append(user)
    return found


def _is_weight(node: torch.fx.Node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _norm_outputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Output node of every RMSNorm (x * rsqrt(mean(x^2) + eps) [* weight]), in graph order."""
    outputs = []
    for node in _compute_nodes(gm):
        if node.target != aten.rsqrt.default:
            continue
        normalized = [u for u in _data_users(node) if u.target == aten.mul.Tensor]
        if len(normalized) != 1:
            raise GraphStructureError("rsqrt is not followed by the single multiply of an RMSNorm", node.name)
        output = normalized[0]
        while True:  # through casts to an optional multiply by the norm weight
            users = _data_users(output)
            nxt = [u for u in users if u.op == "call_function" and (
                u.target in (aten.to.dtype, aten._to_copy.default, aten.alias.default)
                or (u.target == aten.mul.Tensor and any(_is_weight(a) for a in u.args))
            )]
            if len(users) == 1 and len(nxt) == 1:
                output = nxt[0]
                if output.target == aten.mul.Tensor:
                    break
            else:
                break
        outputs.append(output)
    return outputs


def _attention_input_index(linear: torch.fx.Node, limit: int = 64) -> int | None:
    """Which SDPA argument (0 = query, 1 = key, 2 = value) the linear's output flows into."""
    frontier, seen = [linear], {linear}
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        for user in node.users:
            if user.target == SDPA:
                return user.args.index(node)
            if user not in seen and (user.target != LINEAR or is_rotation_linear(linear.graph.owning_module, user)):
                seen.add(user)
                frontier.append(user)
    return None


def _roles_from_structure(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, NodeInfo]:
    roles: dict[torch.fx.Node, NodeInfo] = {}
    embeddings = [n for n in _compute_nodes(gm) if n.target == EMBEDDING]
    if len(embeddings) == 1:
        roles[embeddings[0]] = model_role("embedding")
    norms = _norm_outputs(gm)
    attention_norms = 0
    for norm in norms:
        linears = list(dict.fromkeys(u for u in skip_passthrough_forward(norm) if u.target == LINEAR and not is_rotation_linear(gm, u)))
        if len(linears) == 3:  # attention block: q, k, v
            layer = attention_norms
            attention_norms += 1
            roles[norm] = layer_role(layer, "input_norm")
            for linear in linears:
                index = _attention_input_index(linear)
                if index not in (0, 1, 2):
                    raise GraphStructureError("linear after an attention norm reaches no attention input", linear.name)
                roles[linear] = layer_role(layer, ("q_proj", "k_proj", "v_proj")[index])
                sdpa = next(u for u in _bfs_users(linear) if u.target == SDPA)
                roles[sdpa] = layer_role(layer, "attention")
                outputs = [u for u in skip_passthrough_forward(sdpa) if u.target == LINEAR and not is_rotation_linear(gm, u)]
                if len(outputs) != 1:
                    raise GraphStructureError("attention output does not feed exactly one linear (o_proj)", sdpa.name)
                roles[outputs[0]] = layer_role(layer, "o_proj")
        elif len(linears) == 2:  # MLP block: gate, up -> down
            layer = attention_norms - 1
            if layer < 0:
                raise GraphStructureError("MLP norm before any attention block", norm.name)
            roles[norm] = layer_role(layer, "post_attention_norm")
            gates = [l for l in linears if any(u.target == aten.silu.default for u in skip_passthrough_forward(l))]
            if len(gates) != 1:
                raise GraphStructureError("cannot tell gate_proj (feeds SiLU) from up_proj", linears[0].name)
            gate = gates[0]
            up = next(l for l in linears if l is not gate)
            roles[gate] = layer_role(layer, "gate_proj")
            roles[up] = layer_role(layer, "up_proj")
            products = [u for u in skip_passthrough_forward(up) if u.target == aten.mul.Tensor]
            # the first linear after the gated product (an online rotation may sit between)
            downs = [next((u for u in _bfs_users(p) if u.target == LINEAR and not is_rotation_linear(gm, u)), None) for p in products]
            downs = [d for d in downs if d is not None]
            if len(downs) != 1:
                raise GraphStructureError("gated product does not feed exactly one linear (down_proj)", up.name)
            roles[downs[0]] = layer_role(layer, "down_proj")
        elif len(linears) == 1 and norm is norms[-1]:
            roles[norm] = model_role("final_norm")
            roles[linears[0]] = model_role("lm_head")
        else:
            raise GraphStructureError(f"RMSNorm output feeds {len(linears)} linears; expected 3 (q/k/v), 2 (gate/up) or 1 (lm_head)", norm.name)
    return roles


def _bfs_users(node: torch.fx.Node, limit: int = 64) -> list[torch.fx.Node]:
    order, frontier, seen = [], [node], {node}
    while frontier and len(order) < limit:
        for user in frontier.pop(0).users:
            if user not in seen:
                seen.add(user)
                order.append(user)
                frontier.append(user)
    return order


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
    unexplained = [n for n in _compute_nodes(gm) if n.target == LINEAR and n not in roles and not is_rotation_linear(gm, n)]
    if unexplained:
        raise GraphStructureError("linear is not part of any recognised decoder layer or lm_head", unexplained[0].name)


def find_roles(gm: torch.fx.GraphModule, use_module_stack: bool = True) -> dict[torch.fx.Node, NodeInfo]:
    """Roles of the graph's nodes (see the module docstring); raises GraphStructureError."""
    has_stack = any(_module_path(n) for n in _compute_nodes(gm))
    if use_module_stack and has_stack:
        roles = _roles_from_module_stack(gm)
        try:
            _validate(gm, roles)
            return roles
        except GraphStructureError:
            pass  # module names of another model family: read the structure instead
    roles = _roles_from_structure(gm)
    _validate(gm, roles)
    return roles


class AnnotateRoles(GraphPass):
    """Record every structural role on its node (see the module docstring)."""

    def __init__(self, use_module_stack: bool = True) -> None:
        self.use_module_stack = use_module_stack

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        roles = find_roles(gm, self.use_module_stack)
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
        from quantnpu.passes.meta import nodes_by_role
        from quantnpu.passes.weights import weight_tensor

        by_role = nodes_by_role(gm)
        if "lm_head" not in by_role:
            raise GraphStructureError("no roles on the graph: run AnnotateRoles first")
        self.layers = 1 + max(node_info(n).layer for n in by_role.values() if node_info(n).layer is not None)
        attention = by_role["layers.0.attention"]
        query = attention.args[0].meta.get("val") if isinstance(attention.args[0], torch.fx.Node) else None
        if query is None or query.dim() != 4:
            raise GraphStructureError("attention query has no [batch, heads, seq, head_dim] shape metadata", attention.name)
        self.head_dim = int(query.shape[-1])
        self.hidden = int(weight_tensor(gm, by_role["layers.0.q_proj"].args[1]).shape[1])
        self.heads = int(weight_tensor(gm, by_role["layers.0.q_proj"].args[1]).shape[0]) // self.head_dim
        self.kv_heads = int(weight_tensor(gm, by_role["layers.0.v_proj"].args[1]).shape[0]) // self.head_dim
