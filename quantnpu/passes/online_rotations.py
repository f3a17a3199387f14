"""RemoveOnlineRotations: delete the online Hadamards R3/R4 of a SpinQuant/QuaRot-style graph.

An NPU program has no online rotation. Recognised rotations `x -> x M` (M orthogonal):
- `matmul`/`mm` of an activation with a constant square matrix, or a bias-free `linear` with one
  (then M is the weight's transpose);
- ExecuTorch's `llama.fast_hadamard_transform` custom op (its matrix is read by applying it to I).
Positions:
- R4, on down_proj's input: deleted, and down_proj compensated `W <- W M^T` (the other half of
  the rotation was fused into W, so `(x M) W^T = x (W M^T)^T`);
- R3, on attention's query and key after RoPE: deleted from both, no compensation, since
  `(q M)(k M)^T = q k^T`. A rotation on only one of them, or different ones, is an error.

`InsertOnlineRotations` does the opposite (QuaRot-style R3 and R4, with R4's other half fused into
down_proj), so tests and benchmarks have real online rotations to remove.
"""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.passes.annotate_roles import AnnotateRoles, DecoderDims, attention_inputs, is_rotation_linear
from quantnpu.graph.ops import PASSTHROUGH
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.fold_constants import input_independent_nodes
from quantnpu.graph.meta import node_info, nodes_by_role
from quantnpu.passes.weights import replace_weight, weight_tensor
from quantnpu.quantizers.hadamard import random_hadamard

aten = torch.ops.aten
FAST_HADAMARD = "llama.fast_hadamard_transform.default"
ORTHOGONALITY_TOLERANCE = 1e-4


def rotation_matrix_of(gm: torch.fx.GraphModule, node: torch.fx.Node, constant: set) -> torch.Tensor | None:
    """M (float64) when `node` computes `x M` for an orthogonal M, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node in constant:
        return None
    matrix = None
    if node.target in (aten.matmul.default, aten.mm.default) and len(node.args) == 2:
        other = node.args[1]
        if isinstance(other, torch.fx.Node) and other.op == "get_attr":
            value = weight_tensor(gm, other)
            if value.dim() == 2 and value.shape[0] == value.shape[1]:
                matrix = value.to(torch.float64)
    elif node.target == aten.linear.default and is_rotation_linear(gm, node):
        matrix = weight_tensor(gm, node.args[1]).to(torch.float64).T
    elif str(node.target) == FAST_HADAMARD:
        value = node.args[0].meta.get("val")
        if value is not None:
            size = int(value.shape[-1])
            matrix = node.target(torch.eye(size, dtype=torch.float32)).to(torch.float64)
    if matrix is None:
        return None
    identity = torch.eye(matrix.shape[0], dtype=torch.float64)
    return matrix if (matrix @ matrix.T - identity).abs().max() < ORTHOGONALITY_TOLERANCE else None


def _producer_through_passthrough(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and node.target in PASSTHROUGH:
        node = node.args[0]
    return node


def _online_rotations(gm: torch.fx.GraphModule):
    """(R4 list of (rotation, down_proj, M), R3 list of (attention, q rotation, k rotation, M))."""
    constant = input_independent_nodes(gm)
    r4, r3 = [], []
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is None:
            continue
        if info.kind == "down_proj":
            producer = node.args[0]
            if (matrix := rotation_matrix_of(gm, producer, constant)) is not None:
                r4.append((producer, node, matrix))
        elif info.kind == "attention":
            q, k = (_producer_through_passthrough(a) for a in attention_inputs(node)[:2])
            mq, mk = rotation_matrix_of(gm, q, constant), rotation_matrix_of(gm, k, constant)
            if mq is None and mk is None:
                continue
            if mq is None or mk is None or mq.shape != mk.shape or not torch.allclose(mq, mk, atol=1e-6):
                raise GraphStructureError(f"{info.role}: query and key are not rotated by the same online matrix; cannot remove it", node.name)
            r3.append((node, q, k, mq))
    return r4, r3


class RemoveOnlineRotations(GraphPass):
    run_after = (AnnotateRoles,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        r4, r3 = _online_rotations(gm)
        for rotation, down_proj, matrix in r4:
            weight = weight_tensor(gm, down_proj.args[1])
            replace_weight(gm, down_proj.args[1].target, weight.to(torch.float64) @ matrix.T)
            rotation.replace_all_uses_with(rotation.args[0])
            gm.graph.erase_node(rotation)
        for _, q, k, _ in r3:
            for rotation in (q, k):
                rotation.replace_all_uses_with(rotation.args[0])
                gm.graph.erase_node(rotation)
        gm.graph.eliminate_dead_code()
        _drop_unused_buffers(gm, ONLINE_BUFFERS)
        return PassResult(gm, bool(r4 or r3))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        r4, r3 = _online_rotations(gm)
        if r4 or r3:
            rotation = r4[0][0] if r4 else r3[0][1]
            raise GraphStructureError("an online rotation is left after RemoveOnlineRotations", rotation.name)


ONLINE_BUFFERS = ("quantnpu_online_R3", "quantnpu_online_R4")


def _drop_unused_buffers(gm: torch.fx.GraphModule, names) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names:
        if name in gm._buffers and name not in used:
            del gm._buffers[name]


class InsertOnlineRotations(GraphPass):
    """QuaRot-style online R3 (query/key after RoPE) and R4 (down_proj input), function-preserving.

    `use_custom_op` puts ExecuTorch's `llama.fast_hadamard_transform` at R4 (power-of-two
    intermediate sizes only) instead of a matmul with a random Hadamard; `as_linear` writes R4
    as a bias-free linear instead of a matmul.
    """

    run_after = (AnnotateRoles,)

    def __init__(self, seed: int = 0, use_custom_op: bool = False, as_linear: bool = False) -> None:
        self.seed, self.use_custom_op, self.as_linear = seed, use_custom_op, as_linear

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        dims = DecoderDims(gm)
        by_role = nodes_by_role(gm)
        graph = gm.graph
        dtype = weight_tensor(gm, by_role["lm_head"].args[1]).dtype
        intermediate = weight_tensor(gm, by_role["layers.0.down_proj"].args[1]).shape[1]
        first = next(iter(graph.nodes))
        r3 = self._buffer(gm, first, "quantnpu_online_R3", random_hadamard(dims.head_dim, self.seed).to(dtype))
        if self.use_custom_op:
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the op)

            op = torch.ops.llama.fast_hadamard_transform.default
            r4_matrix = op(torch.eye(intermediate, dtype=torch.float32)).to(torch.float64)
            r4 = None
        else:
            r4_matrix = random_hadamard(intermediate, self.seed + 1)
            # as a linear, the stored weight is M^T (linear(x, M^T) = x M)
            stored = r4_matrix.T if self.as_linear else r4_matrix
            r4 = self._buffer(gm, first, "quantnpu_online_R4", stored.to(dtype).contiguous())
        for layer in range(dims.layers):
            down = by_role[f"layers.{layer}.down_proj"]
            with graph.inserting_before(down):
                if r4 is None:
                    rotated = graph.call_function(op, (down.args[0],))
                elif self.as_linear:
                    rotated = graph.call_function(aten.linear.default, (down.args[0], r4))
                else:
                    rotated = graph.call_function(aten.matmul.default, (down.args[0], r4))
            rotated.meta["val"] = down.args[0].meta.get("val")
            down.update_arg(0, rotated)
            weight = weight_tensor(gm, down.args[1])
            replace_weight(gm, down.args[1].target, weight.to(torch.float64) @ r4_matrix)
            attention = by_role[f"layers.{layer}.attention"]
            for index in (0, 1):
                with graph.inserting_before(attention):
                    rotated = graph.call_function(aten.matmul.default, (attention.args[index], r3))
                rotated.meta["val"] = attention.args[index].meta.get("val")
                attention.update_arg(index, rotated)
        return PassResult(gm, True)

    @staticmethod
    def _buffer(gm, first, name, value) -> torch.fx.Node:
        gm.register_buffer(name, value.contiguous())
        with gm.graph.inserting_before(first):
            node = gm.graph.get_attr(name)
        node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        return node
