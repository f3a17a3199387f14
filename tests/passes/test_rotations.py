"""UntieEmbeddings, FoldNorms, FuseRotations, BakeRotations: what each does to the graph, and that
together they compute the same function (float64: 1e-6 relative, float32: 1e-4)."""

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantnpu.errors import PassFailedError
from quantnpu.passes import AnnotateRoles, BakeRotations, FoldConstants, FoldNorms, FuseRotations, UntieEmbeddings
from quantnpu.graph.meta import nodes_by_role, node_info
from tests.graph_testing import as_float64, assert_pass_diff, run_passes, tiny_graph

ROTATE = [UntieEmbeddings(), FoldNorms(), FuseRotations(), BakeRotations()]


def _param(gm, target):
    return gm.get_parameter(target)


def _annotated(kind="llama", layers=1, **config):
    return run_passes(tiny_graph(kind, layers=layers, **config), [FoldConstants(), AnnotateRoles()])


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_untie_gives_the_embedding_its_own_weight():
    gm = _annotated()
    untied = assert_pass_diff(gm, [UntieEmbeddings()], """
        -%embedding: f32[1,8,64] = aten.embedding(%model_lm_head_weight, %input_ids)  # role=embedding
        +%quantnpu_embedding_weight: f32[128,64] = get_attr quantnpu_embedding_weight
        +%embedding: f32[1,8,64] = aten.embedding(%quantnpu_embedding_weight, %input_ids)  # role=embedding
    """)
    assert torch.equal(untied.quantnpu_embedding_weight, gm.model.lm_head.weight)
    assert UntieEmbeddings()(_annotated("qwen2")).modified is False  # Qwen2-style: untied already


def test_fold_norms_moves_gamma_into_the_readers():
    gm = run_passes(_annotated(), [UntieEmbeddings()])
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
    gamma = _param(gm, "model.model.layers.0.input_layernorm.weight")
    torch.testing.assert_close(_param(folded, "model.model.layers.0.self_attn.q_proj.weight"),
                               _param(gm, "model.model.layers.0.self_attn.q_proj.weight") * gamma)
    # the caller's parameters are not touched
    assert not torch.equal(_param(folded, "model.model.layers.0.self_attn.q_proj.weight"), _param(gm, "model.model.layers.0.self_attn.q_proj.weight"))


def test_fold_norms_refuses_a_weight_shared_with_the_embedding():
    with pytest.raises(PassFailedError, match="weight of lm_head is shared with .*run UntieEmbeddings first"):
        run_passes(_annotated(), [FoldNorms()])


def test_fuse_rotations_puts_r1_r2_on_the_weights_as_graph_ops():
    gm = run_passes(_annotated(), [UntieEmbeddings(), FoldNorms()])
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


def test_bake_rotations_folds_the_weight_ops_back_into_the_parameters():
    fused = run_passes(_annotated(), [UntieEmbeddings(), FoldNorms(), FuseRotations(r2=False)])
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
    fused = run_passes(_annotated(), [UntieEmbeddings(), FoldNorms(), FuseRotations()])
    names = {name for name, _ in fused.named_parameters()} - {"quantnpu_R1", "quantnpu_R2_0"}
    baked = run_passes(copy.deepcopy(fused), [BakeRotations()])
    assert {name for name, _ in baked.named_parameters()} == names
    targets = {str(n.target) for n in baked.graph.nodes}
    assert not {"aten.matmul.default", "aten.permute.default"} & targets
    for role, node in nodes_by_role(baked).items():
        if node.target == torch.ops.aten.linear.default:
            assert node.args[1].op == "get_attr", role
    ids = torch.randint(0, 128, (1, 8))
    assert _relative(baked(ids), fused(ids)) < 1e-5


def test_fuse_rotations_requires_folded_norms():
    with pytest.raises(PassFailedError, match="RMSNorm weights are not folded: run FoldNorms first"):
        run_passes(_annotated(), [UntieEmbeddings(), FuseRotations()])


def test_rotated_flags_follow_the_method():
    gm = run_passes(_annotated(layers=2), ROTATE)
    flags = {node_info(n).role: node_info(n).input_rotated for n in gm.graph.nodes if node_info(n) and node_info(n).input_rotated is not None}
    for layer in range(2):
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
            assert flags[f"layers.{layer}.{kind}"] is True
        assert flags[f"layers.{layer}.down_proj"] is False  # R4 is not used: unrotated input
    assert flags["lm_head"] is True


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("rotation", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(kind, rotation):
    ids = torch.randint(0, 128, (2, 1, 8))
    passes = [UntieEmbeddings(), FoldNorms(), FuseRotations(kind=rotation, seed=3), BakeRotations()]
    exact = as_float64(_annotated(kind, layers=2))
    rotated = run_passes(copy.deepcopy(exact), passes)
    single = _annotated(kind, layers=2)
    rotated_single = run_passes(copy.deepcopy(single), passes)
    for window in ids:
        assert _relative(rotated(window), exact(window)) < 1e-6
        assert _relative(rotated_single(window), single(window)) < 1e-4


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 12, 20]),
    kind=st.sampled_from(["llama", "qwen2"]),
    seed=st.integers(0, 1000),
)
def test_rotation_is_exact_for_any_head_layout(layers, kv_heads, group, head_dim, kind, seed):
    """Hidden sizes and head counts that are not powers of two, any GQA ratio."""
    heads = kv_heads * group
    config = dict(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, intermediate=3 * head_dim * heads)
    gm = as_float64(_annotated(kind, layers=layers, **config))
    with warnings.catch_warnings():  # sizes without a Hadamard construction fall back to QR, warning
        warnings.simplefilter("ignore", UserWarning)
        rotated = run_passes(copy.deepcopy(gm), [UntieEmbeddings(), FoldNorms(), FuseRotations(seed=seed), BakeRotations()])
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(seed))
    assert _relative(rotated(ids), gm(ids)) < 1e-6


def test_size_without_hadamard_falls_back_to_qr_unless_hadamard_was_asked_for():
    gm = run_passes(_annotated(hidden=92, heads=2, kv_heads=1), [UntieEmbeddings(), FoldNorms()])  # 92, 46: no construction
    with pytest.raises(PassFailedError, match="pass FuseRotations failed: no Hadamard construction for order 92"):
        run_passes(copy.deepcopy(gm), [FuseRotations(strict=True)])
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 92"):
        fused = run_passes(copy.deepcopy(gm), [FuseRotations()])
    R1 = fused.quantnpu_R1.double()
    assert torch.allclose(R1 @ R1.T, torch.eye(92, dtype=torch.float64), atol=1e-6)
