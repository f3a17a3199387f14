"""UntieEmbeddings: give the token embedding its own weight when it shares lm_head's.

Tied embeddings must be untied before R1 and norm folding: the rotated embedding is `E R1`,
while lm_head becomes `W diag(gamma) R1` — different tensors from then on.
"""

from __future__ import annotations

import torch.fx

from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.graph.meta import nodes_by_role
from quantnpu.passes.weights import add_weight, same_storage, weight_tensor

UNTIED_EMBEDDING = "quantnpu_embedding_weight"


def embedding_is_tied(gm: torch.fx.GraphModule) -> bool:
    by_role = nodes_by_role(gm)
    embedding, lm_head = by_role["embedding"], by_role["lm_head"]
    return same_storage(weight_tensor(gm, embedding.args[0]), weight_tensor(gm, lm_head.args[1]))


class UntieEmbeddings(GraphPass):
    run_after = (AnnotateRoles,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not embedding_is_tied(gm):
            return PassResult(gm, False)
        embedding = nodes_by_role(gm)["embedding"]
        shared = weight_tensor(gm, embedding.args[0])
        target = add_weight(gm, UNTIED_EMBEDDING, shared.clone())
        with gm.graph.inserting_before(embedding):
            own = gm.graph.get_attr(target)
        own.meta["val"] = embedding.args[0].meta.get("val")
        embedding.args = (own,) + tuple(embedding.args[1:])
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        require(not embedding_is_tied(gm), "embedding still shares lm_head's weight", nodes_by_role(gm)["embedding"])
