"""AnnotateRoles: what it records, on which nodes, and how it fails on graphs it cannot read."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantnpu.errors import GraphStructureError, PassFailedError
from quantnpu.passes import AnnotateRoles, FoldConstants
from quantnpu.passes.annotate_roles import find_roles
from quantnpu.graph.meta import nodes_by_role
from tests.graph_testing import assert_pass_diff, run_passes, tiny_graph


def test_annotates_every_decoder_role_on_tiny_llama():
    gm = run_passes(tiny_graph("llama", layers=1), [FoldConstants()])
    assert_pass_diff(gm, [AnnotateRoles()], """
        -%embedding: f32[1,8,64] = aten.embedding(%model_lm_head_weight, %input_ids)
        +%embedding: f32[1,8,64] = aten.embedding(%model_lm_head_weight, %input_ids)  # role=embedding
        -%mul_4: f32[1,8,64] = aten.mul.Tensor(%model_model_layers_0_input_layernorm_weight, %to_7)
        -%linear: f32[1,8,64] = aten.linear(%mul_4, %model_model_layers_0_self_attn_q_proj_weight)
        +%mul_4: f32[1,8,64] = aten.mul.Tensor(%model_model_layers_0_input_layernorm_weight, %to_7)  # role=layers.0.input_norm
        +%linear: f32[1,8,64] = aten.linear(%mul_4, %model_model_layers_0_self_attn_q_proj_weight)  # role=layers.0.q_proj
        -%linear_1: f32[1,8,32] = aten.linear(%mul_4, %model_model_layers_0_self_attn_k_proj_weight)
        +%linear_1: f32[1,8,32] = aten.linear(%mul_4, %model_model_layers_0_self_attn_k_proj_weight)  # role=layers.0.k_proj
        -%linear_2: f32[1,8,32] = aten.linear(%mul_4, %model_model_layers_0_self_attn_v_proj_weight)
        +%linear_2: f32[1,8,32] = aten.linear(%mul_4, %model_model_layers_0_self_attn_v_proj_weight)  # role=layers.0.v_proj
        -%scaled_dot_product_attention: f32[1,4,8,16] = aten.scaled_dot_product_attention(%add_4, %reshape, %reshape_1, %_folded_expand_1, scale=0.25)
        +%scaled_dot_product_attention: f32[1,4,8,16] = aten.scaled_dot_product_attention(%add_4, %reshape, %reshape_1, %_folded_expand_1, scale=0.25)  # role=layers.0.attention
        -%linear_3: f32[1,8,64] = aten.linear(%reshape_3, %model_model_layers_0_self_attn_o_proj_weight)
        +%linear_3: f32[1,8,64] = aten.linear(%reshape_3, %model_model_layers_0_self_attn_o_proj_weight)  # role=layers.0.o_proj
        -%mul_10: f32[1,8,64] = aten.mul.Tensor(%model_model_layers_0_post_attention_layernorm_weight, %to_9)
        -%linear_4: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_gate_proj_weight)
        +%mul_10: f32[1,8,64] = aten.mul.Tensor(%model_model_layers_0_post_attention_layernorm_weight, %to_9)  # role=layers.0.post_attention_norm
        +%linear_4: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj
        -%linear_5: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_up_proj_weight)
        +%linear_5: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj
        -%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)
        +%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
        -%mul_13: f32[1,8,64] = aten.mul.Tensor(%model_model_norm_weight, %to_11)
        +%mul_13: f32[1,8,64] = aten.mul.Tensor(%model_model_norm_weight, %to_11)  # role=final_norm
        -%linear_7: f32[1,8,128] = aten.linear(%alias, %model_lm_head_weight)
        +%linear_7: f32[1,8,128] = aten.linear(%alias, %model_lm_head_weight)  # role=lm_head
    """)


def _roles(gm):
    return {node.name: info.role for node, info in find_roles(gm).items()}


def _without_module_names(gm):
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:  # a graph from a compiler that keeps no module metadata
        node.meta.pop("nn_module_stack", None)
    return gm


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_roles_come_from_the_structure_not_the_module_names(kind):
    gm = tiny_graph(kind, layers=3)
    roles = _roles(gm)
    assert _roles(_without_module_names(gm)) == roles
    assert len(roles) == 3 + 3 * 10


def test_weights_of_annotated_linears_are_the_right_parameters():
    gm = run_passes(tiny_graph("qwen2", layers=2), [AnnotateRoles()])
    by_role = nodes_by_role(gm)
    for layer in range(2):
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            weight = by_role[f"layers.{layer}.{kind}"].args[1]
            assert weight.target.endswith(f"layers.{layer}.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}.weight")
    assert by_role["lm_head"].args[1].target.endswith("lm_head.weight")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 12, 16]),
    tied=st.booleans(),
)
def test_roles_found_for_any_gqa_shape(layers, kv_heads, group, head_dim, tied):
    heads = kv_heads * group
    gm = tiny_graph("llama", layers=layers, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, tied=tied)
    roles = _roles(gm)
    assert roles == _roles(_without_module_names(gm))
    assert sum(r.endswith("q_proj") for r in roles.values()) == layers


class _NotADecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.proj = torch.nn.Linear(16, 32)

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))


def test_graph_without_decoder_structure_is_a_clear_error():
    gm = torch.export.export(_NotADecoder(), (torch.zeros(1, 4, dtype=torch.int64),)).module()
    with pytest.raises(PassFailedError, match="AnnotateRoles failed: .*no final_norm found"):
        run_passes(gm, [AnnotateRoles()])


def test_a_linear_outside_the_decoder_pattern_is_named():
    gm = tiny_graph("llama", layers=1)
    lm_head = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default and "lm_head" in str(n.args[1].target))
    with gm.graph.inserting_after(lm_head):  # an extra projection the pass cannot place
        extra = gm.graph.call_function(torch.ops.aten.linear.default, (lm_head, lm_head.args[1]))
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    with pytest.raises(GraphStructureError, match=f"node %{extra.name}: linear is not part of any recognised"):
        find_roles(gm)


def test_wrong_module_names_change_nothing():
    gm = tiny_graph("llama", layers=2)
    expected = _roles(gm)
    up = next(n for n, info in find_roles(gm).items() if info.role == "layers.1.up_proj")
    up.meta["nn_module_stack"] = {"x": ("model.model.layers.1.mlp.mystery", "Linear")}
    assert _roles(gm) == expected


def test_missing_layer_piece_is_named():
    gm = tiny_graph("llama", layers=2)
    roles = find_roles(gm)
    by_role = {info.role: node for node, info in roles.items()}
    up, norm = by_role["layers.1.up_proj"], by_role["layers.1.post_attention_norm"]
    up.replace_all_uses_with(up.args[0])  # layer 1's MLP loses its up projection
    gm.graph.erase_node(up)
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    with pytest.raises(GraphStructureError, match=f"node %{norm.name}: RMSNorm output feeds 1 linears; expected 3"):
        find_roles(gm)
