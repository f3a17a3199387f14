"""FoldNorms: RMSNorm weights move into the linears that read the norm."""

import pytest
import torch

from quantnpu.errors import PassFailedError
from quantnpu.passes import FoldNorms, UntieEmbeddings
from tests.graph_testing import annotated_graph, assert_pass_diff, run_passes


def test_fold_norms_moves_gamma_into_the_readers():
    gm = run_passes(annotated_graph(), [UntieEmbeddings()])
    folded = assert_pass_diff(gm, [FoldNorms()], """
        -%model_model_layers_0_input_layernorm_weight: f32[64] = get_attr model.model.layers.0.input_layernorm.weight
        -%model_model_layers_0_post_attention_layernorm_weight: f32[64] = get_attr model.model.layers.0.post_attention_layernorm.weight
        -%model_model_norm_weight: f32[64] = get_attr model.model.norm.weight
        -%to_7: f32[1,8,64] = aten.to.dtype(%mul_3, f32)
        -%mul_4: f32[1,8,64] = aten.mul.Tensor(%model_model_layers_0_input_layernorm_weight, %to_7)  # role=layers.0.input_norm
        -%linear: f32[1,8,64] = aten.linear(%mul_4, %model_model_layers_0_self_attn_q_proj_weight)  # role=layers.0.q_proj
        +%to_7: f32[1,8,64] = aten.to.dtype(%mul_3, f32)  # role=layers.0.input_norm
        +%linear: f32[1,8,64] = aten.linear(%to_7, %model_model_layers_0_self_attn_q_proj_weight)  # role=layers.0.q_proj
        -%linear_1: f32[1,8,32] = aten.linear(%mul_4, %model_model_layers_0_self_attn_k_proj_weight)  # role=layers.0.k_proj
        +%linear_1: f32[1,8,32] = aten.linear(%to_7, %model_model_layers_0_self_attn_k_proj_weight)  # role=layers.0.k_proj
        -%linear_2: f32[1,8,32] = aten.linear(%mul_4, %model_model_layers_0_self_attn_v_proj_weight)  # role=layers.0.v_proj
        +%linear_2: f32[1,8,32] = aten.linear(%to_7, %model_model_layers_0_self_attn_v_proj_weight)  # role=layers.0.v_proj
        -%to_9: f32[1,8,64] = aten.to.dtype(%mul_9, f32)
        -%mul_10: f32[1,8,64] = aten.mul.Tensor(%model_model_layers_0_post_attention_layernorm_weight, %to_9)  # role=layers.0.post_attention_norm
        -%linear_4: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj
        +%to_9: f32[1,8,64] = aten.to.dtype(%mul_9, f32)  # role=layers.0.post_attention_norm
        +%linear_4: f32[1,8,128] = aten.linear(%to_9, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj
        -%linear_5: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj
        +%linear_5: f32[1,8,128] = aten.linear(%to_9, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj
        -%to_11: f32[1,8,64] = aten.to.dtype(%mul_12, f32)
        -%mul_13: f32[1,8,64] = aten.mul.Tensor(%model_model_norm_weight, %to_11)  # role=final_norm
        -%alias: f32[1,8,64] = aten.alias(%mul_13)
        +%to_11: f32[1,8,64] = aten.to.dtype(%mul_12, f32)  # role=final_norm
        +%alias: f32[1,8,64] = aten.alias(%to_11)
    """)
    gamma = gm.get_parameter("model.model.layers.0.input_layernorm.weight")
    torch.testing.assert_close(folded.get_parameter("model.model.layers.0.self_attn.q_proj.weight"),
                               gm.get_parameter("model.model.layers.0.self_attn.q_proj.weight") * gamma)
    # the caller's parameters are not touched
    assert not torch.equal(folded.get_parameter("model.model.layers.0.self_attn.q_proj.weight"), gm.get_parameter("model.model.layers.0.self_attn.q_proj.weight"))


def test_fold_norms_refuses_a_weight_shared_with_the_embedding():
    with pytest.raises(PassFailedError, match="weight of lm_head is shared with .*run UntieEmbeddings first"):
        run_passes(annotated_graph(), [FoldNorms()])
