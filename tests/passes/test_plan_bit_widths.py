"""PlanBitWidths: bits per tensor and per re-quantizing edge from the bit plan; HTP legalization
raises what an op's single width forces, and says so."""

from quantnpu.graph.meta import node_info, tensor_quant
from quantnpu.passes import InsertStaticObservers, PlanBitWidths
from quantnpu.passes.plan_bit_widths import BitDeviation
from quantnpu.quantizers.bit_plan import BitPlan
from tests.graph_testing import assert_pass_diff, run_passes
from tests.passes.swiglu_block import mlp_graph


def _observed():
    return run_passes(mlp_graph(), [InsertStaticObservers()])


def test_plan_bit_widths_graph_diff():
    """Linears read their input at A bits (`inputs=%x:8`), 8-bit linear outputs are widened where a
    16-bit op reads them; gate_proj writes 16 bits, so it also reads 16."""
    planner = PlanBitWidths(BitPlan.parse("4-8-8"))
    assert_pass_diff(_observed(), [planner], """
        -%activation_post_process_1 = activation_post_process_1(%gate_proj_weight)  # labels=layers.0.gate_proj.weight rotated
        +%activation_post_process_1 = activation_post_process_1(%gate_proj_weight)  # labels=layers.0.gate_proj.weight rotated bits=4
        -%activation_post_process_5 = activation_post_process_5(%up_proj_weight)  # labels=layers.0.up_proj.weight rotated
        +%activation_post_process_5 = activation_post_process_5(%up_proj_weight)  # labels=layers.0.up_proj.weight rotated bits=4
        -%activation_post_process_8 = activation_post_process_8(%down_proj_weight)  # labels=layers.0.down_proj.weight rotated
        +%activation_post_process_8 = activation_post_process_8(%down_proj_weight)  # labels=layers.0.down_proj.weight rotated bits=4
        -%activation_post_process_0 = activation_post_process_0(%x)  # rotated
        +%activation_post_process_0 = activation_post_process_0(%x)  # rotated bits=16
        -%activation_post_process_2 = activation_post_process_2(%linear)  # labels=layers.0.gate_proj.output
        +%activation_post_process_2 = activation_post_process_2(%linear)  # labels=layers.0.gate_proj.output bits=16
        -%activation_post_process_3 = activation_post_process_3(%sigmoid_default)
        +%activation_post_process_3 = activation_post_process_3(%sigmoid_default)  # bits=16
        -%activation_post_process_4 = activation_post_process_4(%mul_tensor)
        -%linear_1: f32[1,4,32] = aten.linear(%activation_post_process_0, %activation_post_process_5)  # role=layers.0.up_proj input_rotated=True
        -%activation_post_process_6 = activation_post_process_6(%linear_1)  # labels=layers.0.up_proj.output
        -%mul: f32[1,4,32] = aten.mul.Tensor(%activation_post_process_4, %activation_post_process_6)
        -%activation_post_process_7 = activation_post_process_7(%mul)
        -%linear_2: f32[1,4,16] = aten.linear(%activation_post_process_7, %activation_post_process_8)  # role=layers.0.down_proj input_rotated=False
        -%activation_post_process_9 = activation_post_process_9(%linear_2)  # labels=layers.0.down_proj.output
        -%add: f32[1,4,16] = aten.add.Tensor(%activation_post_process_0, %activation_post_process_9)
        -%activation_post_process_10 = activation_post_process_10(%add)
        +%activation_post_process_4 = activation_post_process_4(%mul_tensor)  # bits=16
        +%linear_1: f32[1,4,32] = aten.linear(%activation_post_process_0, %activation_post_process_5)  # role=layers.0.up_proj input_rotated=True inputs=%x:8
        +%activation_post_process_6 = activation_post_process_6(%linear_1)  # labels=layers.0.up_proj.output bits=8
        +%mul: f32[1,4,32] = aten.mul.Tensor(%activation_post_process_4, %activation_post_process_6)  # inputs=%linear_1:16
        +%activation_post_process_7 = activation_post_process_7(%mul)  # bits=16
        +%linear_2: f32[1,4,16] = aten.linear(%activation_post_process_7, %activation_post_process_8)  # role=layers.0.down_proj input_rotated=False inputs=%mul:8
        +%activation_post_process_9 = activation_post_process_9(%linear_2)  # labels=layers.0.down_proj.output bits=8
        +%add: f32[1,4,16] = aten.add.Tensor(%activation_post_process_0, %activation_post_process_9)  # inputs=%linear_2:16
        +%activation_post_process_10 = activation_post_process_10(%add)  # bits=16
    """)
    assert planner.deviations == [BitDeviation("linear", "layers.0.gate_proj", "input %x", 8, 16, "A (rotated)")]
    assert planner.deviations[0].describe() == "%linear (layers.0.gate_proj): input %x 8 -> 16 bits (HTP op width; plan: A (rotated))"


def test_without_legalization_the_plan_is_kept():
    planner = PlanBitWidths(BitPlan.parse("4-8-8"), legalize=False)
    planned = run_passes(_observed(), [planner])
    gate = next(n for n in planned.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.gate_proj")
    assert planner.deviations == [] and tensor_quant(gate).input_bits == (("x", 8),)


def test_a_copied_graph_plans_the_same():
    """Bits do not depend on the graph object: PT2E's annotations in a copy still name the original's nodes."""
    import copy

    from quantnpu.graph.text import graph_text

    observed = _observed()
    first = run_passes(copy.deepcopy(observed), [PlanBitWidths(BitPlan.parse("8-8-8"))])
    second = run_passes(copy.deepcopy(copy.deepcopy(observed)), [PlanBitWidths(BitPlan.parse("8-8-8"))])
    assert graph_text(first) == graph_text(second)
