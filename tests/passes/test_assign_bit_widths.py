"""AssignBitWidths: the down_proj input with the largest 8-bit Max-Min error is promoted, the
bit planning follows, and an explicit override still has the last word."""

import copy

import pytest
import torch

from quantnpu.errors import PassFailedError, QuantNpuError
from quantnpu.graph.equivalence import sample_token_ids
from quantnpu.graph.meta import nodes_by_role, tensor_quant
from quantnpu.passes import AssignBitWidths, InsertStaticObservers, PassManager, PlanBitWidths, PrepareForQnn
from quantnpu.passes.assign_bit_widths import promoted_count
from quantnpu.passes.weights import replace_weight, weight_tensor
from quantnpu.pipeline import float_passes
from quantnpu.quantizers.bit_plan import BitPlan
from tests.graph_testing import assert_pass_diff, tiny_graph


def _float_graph_with_an_outlier(layer: int = 1, layers: int = 3) -> torch.fx.GraphModule:
    """Rotated float graph in which one up_proj row is 50x larger: one channel of that layer's
    down_proj input carries outliers that wreck an 8-bit Max-Min grid."""
    gm = PassManager(float_passes("hadamard")).run(tiny_graph("llama", layers=layers, seq_len=16))
    up = nodes_by_role(gm)[f"layers.{layer}.up_proj"]
    weight = weight_tensor(gm, up.args[1]).clone()
    weight[3] *= 50
    replace_weight(gm, up.args[1].target, weight)
    return gm


def _calibration(gm, count: int = 3):
    return [sample_token_ids(gm, seed) for seed in range(count)]


def test_assign_bit_widths_graph_diff():
    """Nothing but records: each down_proj's sensitivity r, and `->16` on the promoted one."""
    gm = _float_graph_with_an_outlier(layer=1)
    assert_pass_diff(gm, [AssignBitWidths(_calibration(gm), fraction=0.3)], """
        -%linear_6: f32[1,16,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj input_rotated=False
        +%linear_6: f32[1,16,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj input_rotated=False sensitivity=0.027
        -%linear_13: f32[1,16,64] = aten.linear(%mul_20, %model_model_layers_1_mlp_down_proj_weight)  # role=layers.1.down_proj input_rotated=False
        +%linear_13: f32[1,16,64] = aten.linear(%mul_20, %model_model_layers_1_mlp_down_proj_weight)  # role=layers.1.down_proj input_rotated=False sensitivity=0.065->16
        -%linear_20: f32[1,16,64] = aten.linear(%mul_29, %model_model_layers_2_mlp_down_proj_weight)  # role=layers.2.down_proj input_rotated=False
        +%linear_20: f32[1,16,64] = aten.linear(%mul_29, %model_model_layers_2_mlp_down_proj_weight)  # role=layers.2.down_proj input_rotated=False sensitivity=0.020
    """)


def test_the_planted_outlier_layer_ranks_first_and_is_promoted():
    gm = _float_graph_with_an_outlier(layer=1)
    assign = AssignBitWidths(_calibration(gm), fraction=0.3)
    PassManager([assign]).run(gm)
    ranked = sorted(assign.sensitivities, key=lambda s: s.r, reverse=True)
    assert ranked[0].role == "layers.1.down_proj" and ranked[0].r > 2 * ranked[1].r
    assert [s.role for s in assign.sensitivities if s.promoted] == ["layers.1.down_proj"]
    assert all(0 < s.r < 1 for s in assign.sensitivities)
    record = tensor_quant(nodes_by_role(gm)["layers.1.down_proj"])
    assert record.promoted_input_bits == 16 and record.sensitivity == ranked[0].r
    assert "layers.1.down_proj" in assign.report() and "-> 16 bits" in assign.report()


def test_sensitivity_is_the_relative_error_of_8_bit_max_min():
    """r recomputed by hand for one layer, from the down_proj input values themselves."""
    gm = _float_graph_with_an_outlier(layer=0, layers=1)
    batches = _calibration(gm, 2)
    assign = AssignBitWidths(batches, fraction=1.0)
    PassManager([assign]).run(gm)
    down = nodes_by_role(gm)["layers.0.down_proj"]
    captured = []

    class Grab(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node is down.args[0]:
                captured.append(value.double())
            return value

    for batch in batches:
        Grab(gm).run(batch)
    x = torch.cat([c.flatten() for c in captured])
    scale = torch.tensor(float(x.abs().max()) / 127, dtype=torch.float32).double()
    x_hat = (x / scale).round().clamp(-128, 127) * scale
    expected = float((x - x_hat).norm() / x.norm())
    assert assign.sensitivities[0].r == pytest.approx(expected, rel=1e-3)


def test_plan_follows_the_promotion_and_an_override_wins():
    gm = _float_graph_with_an_outlier(layer=1)
    assign = AssignBitWidths(_calibration(gm), fraction=0.3)
    gm = PassManager([assign, PrepareForQnn()]).run(gm)

    def down_input_bits(plan):
        planned = PassManager([InsertStaticObservers(), PlanBitWidths(plan)], verify=False).run(copy.deepcopy(gm))
        bits = {}
        for layer in range(3):
            down = nodes_by_role(planned)[f"layers.{layer}.down_proj"]
            edges = dict(tensor_quant(down).input_bits)
            bits[layer] = edges.get(down.args[0].args[0].name, 16)  # no re-quantizing edge: reads the 16-bit tensor
        return bits

    assert down_input_bits(BitPlan.parse("8-8-8")) == {0: 8, 1: 16, 2: 8}
    assert down_input_bits(BitPlan.parse("8-8-8", ["layers.1.down_proj.input=8"])) == {0: 8, 1: 8, 2: 8}


def test_promoted_count():
    assert promoted_count(0.1, 30) == 3 and promoted_count(0.1, 2) == 1 and promoted_count(0.0, 30) == 0
    assert promoted_count(1.0, 30) == 30


def test_bad_fraction_and_missing_roles_are_errors():
    with pytest.raises(QuantNpuError, match="promote fraction must be in"):
        AssignBitWidths([], fraction=1.5)
    gm = tiny_graph("llama", layers=1)
    with pytest.raises(PassFailedError, match="no down_proj found"):
        PassManager([AssignBitWidths([sample_token_ids(gm)])]).run(gm)
