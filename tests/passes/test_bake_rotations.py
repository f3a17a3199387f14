"""BakeRotations: the weight-side rotation ops folded back into the parameters they came from."""

import copy

import torch

from quantnpu.graph.meta import nodes_by_role
from quantnpu.passes import BakeRotations, FoldNorms, FuseRotations, UntieEmbeddings
from tests.graph_testing import annotated_graph, assert_pass_diff, relative_max, run_passes


def test_bake_rotations_folds_the_weight_ops_back_into_the_parameters():
    fused = run_passes(annotated_graph(), [UntieEmbeddings(), FoldNorms(), FuseRotations(r2=False)])
    assert_pass_diff(fused, [BakeRotations()], """
        -%quantnpu_r1: f32[64,64] = get_attr quantnpu_R1
        -%matmul_default: f32[128,64] = aten.matmul(%quantnpu_embedding_weight, %quantnpu_r1)
        -%embedding: f32[1,8,64] = aten.embedding(%matmul_default, %input_ids)  # role=embedding
        +%embedding: f32[1,8,64] = aten.embedding(%quantnpu_embedding_weight, %input_ids)  # role=embedding
        -%matmul_default_1: f32[64,64] = aten.matmul(%model_model_layers_0_self_attn_q_proj_weight, %quantnpu_r1)
        -%linear: f32[1,8,64] = aten.linear(%to_7, %matmul_default_1)  # role=layers.0.q_proj input_rotated=True
        +%linear: f32[1,8,64] = aten.linear(%to_7, %model_model_layers_0_self_attn_q_proj_weight)  # role=layers.0.q_proj input_rotated=True
        -%matmul_default_2: f32[32,64] = aten.matmul(%model_model_layers_0_self_attn_k_proj_weight, %quantnpu_r1)
        -%linear_1: f32[1,8,32] = aten.linear(%to_7, %matmul_default_2)  # role=layers.0.k_proj input_rotated=True
        +%linear_1: f32[1,8,32] = aten.linear(%to_7, %model_model_layers_0_self_attn_k_proj_weight)  # role=layers.0.k_proj input_rotated=True
        -%matmul_default_3: f32[32,64] = aten.matmul(%model_model_layers_0_self_attn_v_proj_weight, %quantnpu_r1)
        -%linear_2: f32[1,8,32] = aten.linear(%to_7, %matmul_default_3)  # role=layers.0.v_proj input_rotated=True
        +%linear_2: f32[1,8,32] = aten.linear(%to_7, %model_model_layers_0_self_attn_v_proj_weight)  # role=layers.0.v_proj input_rotated=True
        -%permute_default: f32[64,64] = aten.permute(%quantnpu_r1, [1, 0])
        -%matmul_default_4: f32[64,64] = aten.matmul(%permute_default, %model_model_layers_0_self_attn_o_proj_weight)
        -%linear_3: f32[1,8,64] = aten.linear(%reshape_3, %matmul_default_4)  # role=layers.0.o_proj input_rotated=False
        +%linear_3: f32[1,8,64] = aten.linear(%reshape_3, %model_model_layers_0_self_attn_o_proj_weight)  # role=layers.0.o_proj input_rotated=False
        -%matmul_default_5: f32[128,64] = aten.matmul(%model_model_layers_0_mlp_gate_proj_weight, %quantnpu_r1)
        -%linear_4: f32[1,8,128] = aten.linear(%to_9, %matmul_default_5)  # role=layers.0.gate_proj input_rotated=True
        +%linear_4: f32[1,8,128] = aten.linear(%to_9, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj input_rotated=True
        -%matmul_default_6: f32[128,64] = aten.matmul(%model_model_layers_0_mlp_up_proj_weight, %quantnpu_r1)
        -%linear_5: f32[1,8,128] = aten.linear(%to_9, %matmul_default_6)  # role=layers.0.up_proj input_rotated=True
        +%linear_5: f32[1,8,128] = aten.linear(%to_9, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj input_rotated=True
        -%permute_default_1: f32[64,64] = aten.permute(%quantnpu_r1, [1, 0])
        -%matmul_default_7: f32[64,128] = aten.matmul(%permute_default_1, %model_model_layers_0_mlp_down_proj_weight)
        -%linear_6: f32[1,8,64] = aten.linear(%mul_11, %matmul_default_7)  # role=layers.0.down_proj input_rotated=False
        +%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj input_rotated=False
        -%matmul_default_8: f32[128,64] = aten.matmul(%model_lm_head_weight, %quantnpu_r1)
        -%linear_7: f32[1,8,128] = aten.linear(%alias, %matmul_default_8)  # role=lm_head input_rotated=True
        +%linear_7: f32[1,8,128] = aten.linear(%alias, %model_lm_head_weight)  # role=lm_head input_rotated=True
    """)


def test_bake_rotations_leaves_only_plain_weights_under_their_own_names():
    fused = run_passes(annotated_graph(), [UntieEmbeddings(), FoldNorms(), FuseRotations()])
    names = {name for name, _ in fused.named_parameters()} - {"quantnpu_R1", "quantnpu_R2_0"}
    baked = run_passes(copy.deepcopy(fused), [BakeRotations()])
    assert {name for name, _ in baked.named_parameters()} == names
    targets = {str(n.target) for n in baked.graph.nodes}
    assert not {"aten.matmul.default", "aten.permute.default"} & targets
    for role, node in nodes_by_role(baked).items():
        if node.target == torch.ops.aten.linear.default:
            assert node.args[1].op == "get_attr", role
    ids = torch.randint(0, 128, (1, 8))
    assert relative_max(baked(ids), fused(ids)) < 1e-5
