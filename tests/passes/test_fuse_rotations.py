"""FuseRotations: R1/R2 as graph ops on the weights, the rotated-input flags, Hadamard sizes."""

import copy

import pytest
import torch

from quantnpu.errors import PassFailedError
from quantnpu.graph.meta import node_info
from quantnpu.passes import BakeRotations, FoldNorms, FuseRotations, UntieEmbeddings
from tests.graph_testing import annotated_graph, assert_pass_diff, run_passes

ROTATE = [UntieEmbeddings(), FoldNorms(), FuseRotations(), BakeRotations()]


def test_fuse_rotations_puts_r1_r2_on_the_weights_as_graph_ops():
    gm = run_passes(annotated_graph(), [UntieEmbeddings(), FoldNorms()])
    fused = assert_pass_diff(gm, [FuseRotations()], """
        +%quantnpu_r1: f32[64,64] = get_attr quantnpu_R1
        +%quantnpu_r2_0: f32[16,16] = get_attr quantnpu_R2_0
        -%embedding: f32[1,8,64] = aten.embedding(%quantnpu_embedding_weight, %input_ids)  # role=embedding
        +%matmul_default: f32[128,64] = aten.matmul(%quantnpu_embedding_weight, %quantnpu_r1)
        +%embedding: f32[1,8,64] = aten.embedding(%matmul_default, %input_ids)  # role=embedding
        -%linear: f32[1,8,64] = aten.linear(%to_7, %model_model_layers_0_self_attn_q_proj_weight)  # role=layers.0.q_proj
        +%matmul_default_1: f32[64,64] = aten.matmul(%model_model_layers_0_self_attn_q_proj_weight, %quantnpu_r1)
        +%linear: f32[1,8,64] = aten.linear(%to_7, %matmul_default_1)  # role=layers.0.q_proj input_rotated=True
        -%linear_1: f32[1,8,32] = aten.linear(%to_7, %model_model_layers_0_self_attn_k_proj_weight)  # role=layers.0.k_proj
        +%matmul_default_2: f32[32,64] = aten.matmul(%model_model_layers_0_self_attn_k_proj_weight, %quantnpu_r1)
        +%linear_1: f32[1,8,32] = aten.linear(%to_7, %matmul_default_2)  # role=layers.0.k_proj input_rotated=True
        -%linear_2: f32[1,8,32] = aten.linear(%to_7, %model_model_layers_0_self_attn_v_proj_weight)  # role=layers.0.v_proj
        +%matmul_default_3: f32[32,64] = aten.matmul(%model_model_layers_0_self_attn_v_proj_weight, %quantnpu_r1)
        +%reshape_default: f32[2,16,64] = aten.reshape(%matmul_default_3, [2, 16, 64])
        +%permute_default: f32[16,16] = aten.permute(%quantnpu_r2_0, [1, 0])
        +%matmul_default_4: f32[2,16,64] = aten.matmul(%permute_default, %reshape_default)
        +%reshape_default_1: f32[32,64] = aten.reshape(%matmul_default_4, [32, 64])
        +%linear_2: f32[1,8,32] = aten.linear(%to_7, %reshape_default_1)  # role=layers.0.v_proj input_rotated=True
        -%linear_3: f32[1,8,64] = aten.linear(%reshape_3, %model_model_layers_0_self_attn_o_proj_weight)  # role=layers.0.o_proj
        +%reshape_default_2: f32[64,4,16] = aten.reshape(%model_model_layers_0_self_attn_o_proj_weight, [64, 4, 16])
        +%matmul_default_5: f32[64,4,16] = aten.matmul(%reshape_default_2, %quantnpu_r2_0)
        +%reshape_default_3: f32[64,64] = aten.reshape(%matmul_default_5, [64, 64])
        +%permute_default_1: f32[64,64] = aten.permute(%quantnpu_r1, [1, 0])
        +%matmul_default_6: f32[64,64] = aten.matmul(%permute_default_1, %reshape_default_3)
        +%linear_3: f32[1,8,64] = aten.linear(%reshape_3, %matmul_default_6)  # role=layers.0.o_proj input_rotated=True
        -%linear_4: f32[1,8,128] = aten.linear(%to_9, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj
        +%matmul_default_7: f32[128,64] = aten.matmul(%model_model_layers_0_mlp_gate_proj_weight, %quantnpu_r1)
        +%linear_4: f32[1,8,128] = aten.linear(%to_9, %matmul_default_7)  # role=layers.0.gate_proj input_rotated=True
        -%linear_5: f32[1,8,128] = aten.linear(%to_9, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj
        +%matmul_default_8: f32[128,64] = aten.matmul(%model_model_layers_0_mlp_up_proj_weight, %quantnpu_r1)
        +%linear_5: f32[1,8,128] = aten.linear(%to_9, %matmul_default_8)  # role=layers.0.up_proj input_rotated=True
        -%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
        +%permute_default_2: f32[64,64] = aten.permute(%quantnpu_r1, [1, 0])
        +%matmul_default_9: f32[64,128] = aten.matmul(%permute_default_2, %model_model_layers_0_mlp_down_proj_weight)
        +%linear_6: f32[1,8,64] = aten.linear(%mul_11, %matmul_default_9)  # role=layers.0.down_proj input_rotated=False
        -%linear_7: f32[1,8,128] = aten.linear(%alias, %model_lm_head_weight)  # role=lm_head
        +%matmul_default_10: f32[128,64] = aten.matmul(%model_lm_head_weight, %quantnpu_r1)
        +%linear_7: f32[1,8,128] = aten.linear(%alias, %matmul_default_10)  # role=lm_head input_rotated=True
    """)
    R1 = fused.quantnpu_R1
    assert torch.allclose(R1 @ R1.T, torch.eye(64), atol=1e-6)


def test_fuse_rotations_requires_folded_norms():
    with pytest.raises(PassFailedError, match="RMSNorm weights are not folded: run FoldNorms first"):
        run_passes(annotated_graph(), [UntieEmbeddings(), FuseRotations()])


def test_rotated_flags_follow_the_method():
    gm = run_passes(annotated_graph(layers=2), ROTATE)
    flags = {node_info(n).role: node_info(n).input_rotated for n in gm.graph.nodes if node_info(n) and node_info(n).input_rotated is not None}
    for layer in range(2):
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
            assert flags[f"layers.{layer}.{kind}"] is True
        assert flags[f"layers.{layer}.down_proj"] is False  # R4 is not used: unrotated input
    assert flags["lm_head"] is True


def test_size_without_hadamard_falls_back_to_qr_unless_hadamard_was_asked_for():
    gm = run_passes(annotated_graph(hidden=92, heads=2, kv_heads=1), [UntieEmbeddings(), FoldNorms()])  # 92, 46: no construction
    with pytest.raises(PassFailedError, match="pass FuseRotations failed: no Hadamard construction for order 92"):
        run_passes(copy.deepcopy(gm), [FuseRotations(strict=True)])
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 92"):
        fused = run_passes(copy.deepcopy(gm), [FuseRotations()])
    R1 = fused.quantnpu_R1.double()
    assert torch.allclose(R1 @ R1.T, torch.eye(92, dtype=torch.float64), atol=1e-6)
