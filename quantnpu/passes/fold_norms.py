"""FoldNorms: fold every RMSNorm weight gamma into the linears that read the norm's output.

`W <- W diag(gamma)` (computed in float64) for q/k/v after `input_norm`, gate/up after
`post_attention_norm`, and lm_head after `final_norm`; the norm's multiply by gamma disappears and
its role moves to the normalized tensor before it. The function is unchanged; afterwards every
norm is weightless, which R1 needs (RMSNorm commutes with an orthogonal map only when gamma = 1).
"""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.graph.ops import skip_passthrough_forward
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.graph.meta import node_info, nodes_by_role, set_node_info
from quantnpu.passes.untie_embeddings import UntieEmbeddings
from quantnpu.passes.weights import replace_weight, weight_tensor

NORM_CONSUMERS = {
    "input_norm": ("q_proj", "k_proj", "v_proj"),
    "post_attention_norm": ("gate_proj", "up_proj"),
    "final_norm": ("lm_head",),
}
aten = torch.ops.aten


def norm_weight(norm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(gamma get_attr, normalized input) if `norm` is a multiply by a parameter, else None."""
    if norm.target != aten.mul.Tensor:
        return None
    a, b = norm.args
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        return a, b
    if isinstance(b, torch.fx.Node) and b.op == "get_attr":
        return b, a
    return None


def weighted_norms(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if (info := node_info(n)) is not None
            and info.kind in NORM_CONSUMERS and norm_weight(n) is not None]


class FoldNorms(GraphPass):
    run_after = (AnnotateRoles, UntieEmbeddings)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        by_role = nodes_by_role(gm)
        readers_by_storage: dict[int, list[torch.fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and isinstance(value := weight_tensor(gm, node), torch.Tensor):
                readers_by_storage.setdefault(value.untyped_storage().data_ptr(), []).extend(node.users)
        folded = False
        for norm in weighted_norms(gm):
            info = node_info(norm)
            gamma_node, normalized = norm_weight(norm)
            gamma = weight_tensor(gm, gamma_node).to(torch.float64)
            prefix = f"layers.{info.layer}." if info.layer is not None else ""
            consumers = [by_role[prefix + kind] for kind in NORM_CONSUMERS[info.kind]]
            readers = {u for u in skip_passthrough_forward(norm)}
            for linear in consumers:
                if linear not in readers:
                    raise GraphStructureError(f"{node_info(linear).role} does not read {info.role}", linear.name)
            if readers - set(consumers):
                other = sorted(readers - set(consumers), key=lambda n: n.name)[0]
                raise GraphStructureError(f"{info.role} output is also read by %{other.name}; cannot fold its weight", norm.name)
            for linear in consumers:
                weight = weight_tensor(gm, linear.args[1])
                self._check_not_shared(gm, linear, readers_by_storage)
                replace_weight(gm, linear.args[1].target, weight.to(torch.float64) * gamma)
            norm.replace_all_uses_with(normalized)
            set_node_info(normalized, info)
            gm.graph.erase_node(norm)
            folded = True
        gm.graph.eliminate_dead_code()
        return PassResult(gm, folded)

    @staticmethod
    def _check_not_shared(gm: torch.fx.GraphModule, linear: torch.fx.Node, readers_by_storage: dict) -> None:
        """Folding gamma into a weight another node also reads would change that node too."""
        weight = weight_tensor(gm, linear.args[1])
        others = [u for u in readers_by_storage[weight.untyped_storage().data_ptr()] if u is not linear]
        if others:
            raise GraphStructureError(
                f"the weight of {node_info(linear).role} is shared with %{others[0].name}; run UntieEmbeddings first", linear.name)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = weighted_norms(gm)
        if left:
            raise GraphStructureError("RMSNorm weight left after FoldNorms", left[0].name)
