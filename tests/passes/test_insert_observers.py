"""InsertStaticObservers: one observer per quantized tensor, where the quantizer will put Q/DQ,
each named by the ops that make and read its tensor; weights and rotated tensors marked."""

from quantnpu.graph.meta import tensor_quant
from quantnpu.passes import InsertStaticObservers
from quantnpu.passes.insert_observers import observed_tensors
from tests.graph_testing import assert_pass_diff
from tests.passes.swiglu_block import mlp_graph


def test_insert_static_observers_graph_diff():
    """Views share their input's observer; x is rotated (gate/up read it rotated); every weight is
    rotated on some side once R1 is in the model (down_proj's on its output side)."""
    assert_pass_diff(mlp_graph(), [InsertStaticObservers()], """
        +%activation_post_process_1 = activation_post_process_1(%gate_proj_weight)  # labels=layers.0.gate_proj.weight rotated
        +%activation_post_process_5 = activation_post_process_5(%up_proj_weight)  # labels=layers.0.up_proj.weight rotated
        +%activation_post_process_8 = activation_post_process_8(%down_proj_weight)  # labels=layers.0.down_proj.weight rotated
        +%activation_post_process_0 = activation_post_process_0(%x)  # rotated
        -%linear: f32[1,4,32] = aten.linear(%x, %gate_proj_weight)  # role=layers.0.gate_proj input_rotated=True
        -%sigmoid_default: f32[1,4,32] = aten.sigmoid(%linear)
        -%mul_tensor: f32[1,4,32] = aten.mul.Tensor(%linear, %sigmoid_default)
        -%linear_1: f32[1,4,32] = aten.linear(%x, %up_proj_weight)  # role=layers.0.up_proj input_rotated=True
        -%mul: f32[1,4,32] = aten.mul.Tensor(%mul_tensor, %linear_1)
        -%linear_2: f32[1,4,16] = aten.linear(%mul, %down_proj_weight)  # role=layers.0.down_proj input_rotated=False
        -%add: f32[1,4,16] = aten.add.Tensor(%x, %linear_2)
        -return (%add,)
        +%linear: f32[1,4,32] = aten.linear(%activation_post_process_0, %activation_post_process_1)  # role=layers.0.gate_proj input_rotated=True
        +%activation_post_process_2 = activation_post_process_2(%linear)  # labels=layers.0.gate_proj.output
        +%sigmoid_default: f32[1,4,32] = aten.sigmoid(%activation_post_process_2)
        +%activation_post_process_3 = activation_post_process_3(%sigmoid_default)
        +%mul_tensor: f32[1,4,32] = aten.mul.Tensor(%activation_post_process_2, %activation_post_process_3)
        +%activation_post_process_4 = activation_post_process_4(%mul_tensor)
        +%linear_1: f32[1,4,32] = aten.linear(%activation_post_process_0, %activation_post_process_5)  # role=layers.0.up_proj input_rotated=True
        +%activation_post_process_6 = activation_post_process_6(%linear_1)  # labels=layers.0.up_proj.output
        +%mul: f32[1,4,32] = aten.mul.Tensor(%activation_post_process_4, %activation_post_process_6)
        +%activation_post_process_7 = activation_post_process_7(%mul)
        +%linear_2: f32[1,4,16] = aten.linear(%activation_post_process_7, %activation_post_process_8)  # role=layers.0.down_proj input_rotated=False
        +%activation_post_process_9 = activation_post_process_9(%linear_2)  # labels=layers.0.down_proj.output
        +%add: f32[1,4,16] = aten.add.Tensor(%activation_post_process_0, %activation_post_process_9)
        +%activation_post_process_10 = activation_post_process_10(%add)
        +return (%activation_post_process_10,)
    """)


def test_unrotated_block_marks_nothing_rotated():
    observed = InsertStaticObservers()(mlp_graph(rotated=False)).graph_module
    groups = observed_tensors(observed)
    assert len(groups) == 11
    assert not any(tensor_quant(g.nodes[0]).rotated for g in groups.values())
    assert sum(tensor_quant(g.nodes[0]).weight for g in groups.values()) == 3
