"""UntieEmbeddings: the embedding gets its own copy of a weight it shares with lm_head."""

import torch

from quantnpu.passes import UntieEmbeddings
from tests.graph_testing import annotated_graph, assert_pass_diff


def test_untie_gives_the_embedding_its_own_weight():
    gm = annotated_graph()
    untied = assert_pass_diff(gm, [UntieEmbeddings()], """
        -%embedding: f32[1,8,64] = aten.embedding(%model_lm_head_weight, %input_ids)  # role=embedding
        +%quantnpu_embedding_weight: f32[128,64] = get_attr quantnpu_embedding_weight
        +%embedding: f32[1,8,64] = aten.embedding(%quantnpu_embedding_weight, %input_ids)  # role=embedding
    """)
    assert torch.equal(untied.quantnpu_embedding_weight, gm.model.lm_head.weight)
    assert UntieEmbeddings()(annotated_graph("qwen2")).modified is False  # Qwen2-style: untied already
