"""RemoveOnlineRotations (and its inverse, InsertOnlineRotations, used to make test graphs)."""

import copy

import pytest
import torch

from quantnpu.errors import PassFailedError
from quantnpu.passes import AnnotateRoles, FoldConstants, InsertOnlineRotations, RemoveOnlineRotations
from quantnpu.graph.meta import nodes_by_role
from tests.graph_testing import as_float64, assert_pass_diff, run_passes, tiny_graph


def _param(gm, target):
    return gm.get_parameter(target)


def _annotated(layers=1):
    return run_passes(tiny_graph("llama", layers=layers), [FoldConstants(), AnnotateRoles()])


def test_insert_puts_r3_before_attention_and_r4_before_down_proj():
    assert_pass_diff(_annotated(), [InsertOnlineRotations()], """
        +%quantnpu_online_r3: f32[16,16] = get_attr quantnpu_online_R3
        +%quantnpu_online_r4: f32[128,128] = get_attr quantnpu_online_R4
        -%scaled_dot_product_attention: f32[1,4,8,16] = aten.scaled_dot_product_attention(%add_4, %reshape, %reshape_1, %_folded_expand_1, scale=0.25)  # role=layers.0.attention
        +%matmul_default_1: f32[1,4,8,16] = aten.matmul(%add_4, %quantnpu_online_r3)
        +%matmul_default_2: f32[1,4,8,16] = aten.matmul(%reshape, %quantnpu_online_r3)
        +%scaled_dot_product_attention: f32[1,4,8,16] = aten.scaled_dot_product_attention(%matmul_default_1, %matmul_default_2, %reshape_1, %_folded_expand_1, scale=0.25)  # role=layers.0.attention
        -%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
        +%matmul_default: f32[1,8,128] = aten.matmul(%mul_11, %quantnpu_online_r4)
        +%linear_6: f32[1,8,64] = aten.linear(%matmul_default, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
    """)


def test_removes_r3_on_query_and_key_and_r4_on_down_proj_input():
    gm = run_passes(_annotated(), [InsertOnlineRotations()])
    assert_pass_diff(gm, [RemoveOnlineRotations()], """
        -%quantnpu_online_r3: f32[16,16] = get_attr quantnpu_online_R3
        -%quantnpu_online_r4: f32[128,128] = get_attr quantnpu_online_R4
        -%matmul_default_1: f32[1,4,8,16] = aten.matmul(%add_4, %quantnpu_online_r3)
        -%matmul_default_2: f32[1,4,8,16] = aten.matmul(%reshape, %quantnpu_online_r3)
        -%scaled_dot_product_attention: f32[1,4,8,16] = aten.scaled_dot_product_attention(%matmul_default_1, %matmul_default_2, %reshape_1, %_folded_expand_1, scale=0.25)  # role=layers.0.attention
        +%scaled_dot_product_attention: f32[1,4,8,16] = aten.scaled_dot_product_attention(%add_4, %reshape, %reshape_1, %_folded_expand_1, scale=0.25)  # role=layers.0.attention
        -%matmul_default: f32[1,8,128] = aten.matmul(%mul_11, %quantnpu_online_r4)
        -%linear_6: f32[1,8,64] = aten.linear(%matmul_default, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
        +%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
    """)


@pytest.mark.parametrize("form", ["matmul", "linear", "executorch-fast-hadamard"])
def test_removal_restores_the_function_and_the_weights(form):
    use_custom_op = form == "executorch-fast-hadamard"
    original = as_float64(_annotated(layers=2))
    with_online = run_passes(copy.deepcopy(original), [InsertOnlineRotations(seed=5, use_custom_op=use_custom_op, as_linear=form == "linear")])
    ids = torch.randint(0, 128, (1, 8))
    expected = original(ids)
    assert not torch.equal(_param(with_online, "model.model.layers.0.mlp.down_proj.weight"), _param(original, "model.model.layers.0.mlp.down_proj.weight"))
    removed = run_passes(with_online, [RemoveOnlineRotations()])
    tolerance = 1e-8 if use_custom_op else 1e-12  # ExecuTorch's op computes in float32
    assert ((removed(ids) - expected).abs().max() / expected.abs().max()).item() < tolerance
    for layer in range(2):
        torch.testing.assert_close(_param(removed, f"model.model.layers.{layer}.mlp.down_proj.weight"),
                                   _param(original, f"model.model.layers.{layer}.mlp.down_proj.weight"), rtol=0, atol=tolerance)
    remaining = {str(n.target) for n in removed.graph.nodes}
    assert "aten.matmul.default" not in remaining and "llama.fast_hadamard_transform.default" not in remaining


@pytest.mark.parametrize("as_linear", [False, True], ids=["matmul", "linear"])
def test_roles_are_found_through_online_rotations_without_module_metadata(as_linear):
    gm = run_passes(_annotated(layers=2), [InsertOnlineRotations(as_linear=as_linear)])
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
        node.meta.pop("quantnpu", None)
    removed = run_passes(gm, [AnnotateRoles(), RemoveOnlineRotations()])
    assert "aten.matmul.default" not in {str(n.target) for n in removed.graph.nodes}
    assert sum(n.target == torch.ops.aten.linear.default for n in removed.graph.nodes) == 2 * 7 + 1


def test_rotation_on_query_only_is_an_error():
    gm = run_passes(_annotated(), [InsertOnlineRotations()])
    attention = nodes_by_role(gm)["layers.0.attention"]
    key_rotation = attention.args[1]
    attention.update_arg(1, key_rotation.args[0])
    with pytest.raises(PassFailedError, match="layers.0.attention: query and key are not rotated by the same online matrix"):
        run_passes(gm, [RemoveOnlineRotations()])


def test_graph_without_online_rotations_is_unchanged():
    assert RemoveOnlineRotations()(_annotated()).modified is False
