"""FuseRotations: R1 on the residual stream and R2 on each layer's value/o_proj path, as
explicit graph operations on the weights.

With `R1` (hidden x hidden, shared by all layers) and `R2_i` (head_dim x head_dim, layer i),
parameters of the graph module named `quantnpu_R1` and `quantnpu_R2_<i>`:
- embedding `E <- E R1`; readers of the stream (q, k, v, gate, up, lm_head) `W <- W R1`;
- writers of the stream (o_proj, down_proj) `W <- R1^T W`, `b <- R1^T b`;
- v_proj rows of every KV head `W_v[h] <- R2^T W_v[h]` (bias likewise);
- o_proj columns of every query head `W_o[:, h] <- W_o[:, h] R2` (grouped-query attention: every
  query head of the layer uses the layer's one R2).
Each weight's get_attr is replaced by the ops computing the rotated weight (matmul, permute,
reshape), so a later pass can learn R1/R2 through them (stage one) and BakeRotations folds them.
Linear nodes record whether their input activation is now rotated (`NodeInfo.input_rotated`).

R1 is applied only where it is exact. An RMSNorm commutes with an orthogonal map only without a
per-channel weight; input norms lose theirs to FoldNorms, but a "sandwich" norm on o_proj's or
down_proj's output (Gemma-2/3) keeps a weight between the writer and the residual add. With a
non-uniform weight there, R1 is not applied (R2 still is, inside attention), with a warning
naming the norm; `skipped_r1` says why.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx

from quantnpu.diagnostics import QuantNpuWarning
from quantnpu.errors import GraphStructureError
from quantnpu.passes.annotate_roles import AnnotateRoles, DecoderDims
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.fold_norms import FoldNorms, weighted_norms
from quantnpu.passes.folded import R1_NAME, R2_PREFIX, is_rotation_target  # noqa: F401 (re-exported)
from quantnpu.graph.meta import LAYER_LINEARS, node_info, nodes_by_role, update_node_info
from quantnpu.passes.untie_embeddings import UntieEmbeddings, embedding_is_tied
from quantnpu.passes.weights import add_weight, weight_tensor
from quantnpu.quantizers.hadamard import rotation_matrix

aten = torch.ops.aten
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITERS = ("o_proj", "down_proj")


def r1_obstruction(gm: torch.fx.GraphModule) -> tuple[torch.fx.Node, str] | None:
    """(node, reason) when rotating the residual stream by R1 would change the function, else None."""
    from quantnpu.passes.fold_norms import norm_weight

    for node in gm.graph.nodes:
        info = node_info(node)
        if info is None or info.kind not in ("attention_output_norm", "mlp_output_norm"):
            continue
        found = norm_weight(node)
        if found is not None:
            gamma = weight_tensor(gm, found[0])
            if not bool((gamma == gamma.flatten()[0]).all()):
                writer = "o_proj" if info.kind == "attention_output_norm" else "down_proj"
                return node, (f"{info.role}: an RMSNorm with a per-channel weight on {writer}'s output before the residual add "
                              "does not commute with R1")
    return None


class WeightOps:
    """Inserts weight-side ops before a consumer node, with meta shapes for the printer."""

    def __init__(self, gm: torch.fx.GraphModule, before: torch.fx.Node) -> None:
        self.gm, self.graph, self.before = gm, gm.graph, before

    def _meta(self, arg):
        if not isinstance(arg, torch.fx.Node):
            return arg
        value = weight_tensor(self.gm, arg) if arg.op == "get_attr" else arg.meta["val"]
        return torch.empty(value.shape, dtype=value.dtype, device="meta")

    def op(self, target, *args) -> torch.fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args)
        node.meta["val"] = target(*[self._meta(a) for a in args])
        return node

    def transpose(self, node):
        return self.op(aten.permute.default, node, [1, 0])


class FuseRotations(GraphPass):
    run_after = (AnnotateRoles, UntieEmbeddings, FoldNorms)

    def __init__(self, kind: str = "hadamard", seed: int = 0, r2: bool = True, strict: bool = False) -> None:
        """`strict`: a size with no Hadamard construction is an error rather than a QR fallback
        (for a user who asked for Hadamard explicitly)."""
        self.kind, self.seed, self.r2, self.strict = kind, seed, r2, strict
        self.skipped_r1: str | None = None

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if weighted_norms(gm):
            raise GraphStructureError("RMSNorm weights are not folded: run FoldNorms first", weighted_norms(gm)[0].name)
        if embedding_is_tied(gm):
            raise GraphStructureError("embedding and lm_head share a weight: run UntieEmbeddings first")
        if any(n.op == "get_attr" and is_rotation_target(n.target) for n in gm.graph.nodes):
            raise GraphStructureError("the graph already has fused rotations")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        dims = DecoderDims(gm)
        by_role = nodes_by_role(gm)
        graph = gm.graph
        dtype = weight_tensor(gm, by_role["lm_head"].args[1]).dtype
        first = next(iter(graph.nodes))
        obstruction = r1_obstruction(gm)
        self.skipped_r1 = None
        r1 = None
        if obstruction is None:
            r1 = self._parameter(gm, graph, first, R1_NAME, rotation_matrix(dims.hidden, self.kind, self.seed, self.strict), dtype)
            embedding = by_role["embedding"]
            build = WeightOps(gm, embedding)
            embedding.args = (build.op(aten.matmul.default, embedding.args[0], r1),) + tuple(embedding.args[1:])
        else:
            self.skipped_r1 = f"%{obstruction[0].name} ({obstruction[1]})"
            warnings.warn(f"R1 not applied, only R2: {self.skipped_r1}", QuantNpuWarning, stacklevel=2)

        for layer in range(dims.layers):
            r2 = None
            if self.r2:
                matrix = rotation_matrix(dims.head_dim, self.kind, self.seed + 1 + layer, self.strict)
                r2 = self._parameter(gm, graph, first, f"{R2_PREFIX}{layer}", matrix, dtype)
            for kind in LAYER_LINEARS:
                linear = by_role[f"layers.{layer}.{kind}"]
                self._rotate_linear(gm, linear, kind, r1, r2, dims)
                rotated = (kind in READERS and r1 is not None) or (kind == "o_proj" and r2 is not None)
                update_node_info(linear, input_rotated=rotated)
        lm_head = by_role["lm_head"]
        self._rotate_linear(gm, lm_head, "lm_head", r1, None, dims)
        update_node_info(lm_head, input_rotated=r1 is not None)
        return PassResult(gm, r1 is not None or self.r2)

    @staticmethod
    def _parameter(gm, graph, first, name, matrix, dtype) -> torch.fx.Node:
        add_weight(gm, name, matrix.to(dtype))
        with graph.inserting_before(first):
            node = graph.get_attr(name)
        node.meta["val"] = torch.empty(matrix.shape, dtype=dtype, device="meta")
        return node

    @staticmethod
    def _rotate_linear(gm, linear, kind, r1, r2, dims: DecoderDims) -> None:
        build = WeightOps(gm, linear)
        weight = linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        if weight.op != "get_attr":
            raise GraphStructureError("linear weight is not a plain parameter (rotated already?)", linear.name)
        if r1 is not None and (kind in READERS or kind == "lm_head"):
            weight = build.op(aten.matmul.default, weight, r1)                       # W R1
        if kind == "v_proj" and r2 is not None:
            heads = build.op(aten.reshape.default, weight, [dims.kv_heads, dims.head_dim, dims.hidden])
            heads = build.op(aten.matmul.default, build.transpose(r2), heads)         # R2^T W_v[h]
            weight = build.op(aten.reshape.default, heads, [dims.kv_heads * dims.head_dim, dims.hidden])
            if bias is not None:
                per_head = build.op(aten.reshape.default, bias, [dims.kv_heads, dims.head_dim])
                bias = build.op(aten.reshape.default, build.op(aten.matmul.default, per_head, r2), [dims.kv_heads * dims.head_dim])
        if kind == "o_proj" and r2 is not None:
            columns = build.op(aten.reshape.default, weight, [dims.hidden, dims.heads, dims.head_dim])
            columns = build.op(aten.matmul.default, columns, r2)                       # W_o[:, h] R2
            weight = build.op(aten.reshape.default, columns, [dims.hidden, dims.heads * dims.head_dim])
        if r1 is not None and kind in WRITERS:
            weight = build.op(aten.matmul.default, build.transpose(r1), weight)        # R1^T W
            if bias is not None:
                bias = build.op(aten.matmul.default, bias, r1)                         # R1^T b
        linear.args = (linear.args[0], weight) + ((bias,) if bias is not None else ()) + tuple(linear.args[3:])

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        by_role = nodes_by_role(gm)
        roles = (("layers.0.o_proj",) if self.r2 else ()) if self.skipped_r1 else ("embedding", "lm_head", "layers.0.q_proj", "layers.0.down_proj")
        for role in roles:
            node = by_role[role]
            weight = node.args[0] if role == "embedding" else node.args[1]
            require(weight.op != "get_attr", f"{role} weight was not rotated", node)
