"""InsertStaticObservers and StaticCalibration: where observers go, what bits they get, which rule
sets each encoding, and that QuantNpuQuantizer turns them into exactly those quantize/dequantize ops."""

import copy
import math
import warnings

import pytest
import torch

from quantnpu.passes import InsertStaticObservers, PassManager, PrepareForQnn, StaticCalibration
from quantnpu.passes.integer_only import integer_only_violations, quantize_kind
from quantnpu.passes.meta import NodeInfo, node_info, set_node_info
from quantnpu.passes.static_observers import attach_encodings, encodings_by_tensor
from quantnpu.quantizers.bit_plan import BitPlan
from quantnpu.quantizers.encodings import read_encodings, write_encodings
from quantnpu.quantizers.quantnpu_quantizer import quantize_with_encodings, strip_observers
from tests.graph_testing import assert_pass_diff, run_passes

HIDDEN, INTERMEDIATE = 16, 32


class Mlp(torch.nn.Module):
    """A residual SwiGLU block, the smallest graph with every kind of bit-plan decision."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate_proj = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = torch.nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _mlp_graph(rotated: bool = True) -> torch.fx.GraphModule:
    gm = torch.export.export(Mlp(), (torch.randn(1, 4, HIDDEN),)).module()
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            kind = node.args[1].target.split(".")[0]
            set_node_info(node, NodeInfo(role=f"layers.0.{kind}", kind=kind, layer=0, rotated=rotated and kind != "down_proj"))
    return run_passes(gm, [PrepareForQnn()])


def _batches(count: int = 4):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 4, HIDDEN, generator=generator) for _ in range(count)]


def _calibrated(bits: str = "4-8-8", rotated: bool = True, overrides=()):
    observe = InsertStaticObservers(BitPlan.parse(bits, overrides))
    fake_quant = run_passes(_mlp_graph(rotated), [observe, StaticCalibration(_batches(), progress=False)])
    return fake_quant, observe.deviations


def test_insert_static_observers_graph_diff():
    """One observer per tensor; linears read their input at A bits (`inputs=%x:8`), 8-bit linear
    outputs are widened where a 16-bit op reads them; gate_proj writes 16 bits, so it also reads 16."""
    observe = InsertStaticObservers(BitPlan.parse("4-8-8"))
    assert_pass_diff(_mlp_graph(), [observe], """
        +%activation_post_process_1 = activation_post_process_1(%gate_proj_weight)  # role=activation_post_process_1 labels=layers.0.gate_proj.weight rotated=True bits=4
        +%activation_post_process_5 = activation_post_process_5(%up_proj_weight)  # role=activation_post_process_5 labels=layers.0.up_proj.weight rotated=True bits=4
        +%activation_post_process_8 = activation_post_process_8(%down_proj_weight)  # role=activation_post_process_8 labels=layers.0.down_proj.weight rotated=True bits=4
        +%activation_post_process_0 = activation_post_process_0(%x)  # role=activation_post_process_0 rotated=True bits=16
        -%linear: f32[1,4,32] = aten.linear(%x, %gate_proj_weight)  # role=layers.0.gate_proj rotated=True
        -%sigmoid_default: f32[1,4,32] = aten.sigmoid(%linear)
        -%mul_tensor: f32[1,4,32] = aten.mul.Tensor(%linear, %sigmoid_default)
        -%linear_1: f32[1,4,32] = aten.linear(%x, %up_proj_weight)  # role=layers.0.up_proj rotated=True
        -%mul: f32[1,4,32] = aten.mul.Tensor(%mul_tensor, %linear_1)
        -%linear_2: f32[1,4,16] = aten.linear(%mul, %down_proj_weight)  # role=layers.0.down_proj rotated=False
        -%add: f32[1,4,16] = aten.add.Tensor(%x, %linear_2)
        -return (%add,)
        +%linear: f32[1,4,32] = aten.linear(%activation_post_process_0, %activation_post_process_1)  # role=layers.0.gate_proj rotated=True
        +%activation_post_process_2 = activation_post_process_2(%linear)  # role=activation_post_process_2 labels=layers.0.gate_proj.output rotated=False bits=16
        +%sigmoid_default: f32[1,4,32] = aten.sigmoid(%activation_post_process_2)
        +%activation_post_process_3 = activation_post_process_3(%sigmoid_default)  # role=activation_post_process_3 rotated=False bits=16
        +%mul_tensor: f32[1,4,32] = aten.mul.Tensor(%activation_post_process_2, %activation_post_process_3)
        +%activation_post_process_4 = activation_post_process_4(%mul_tensor)  # role=activation_post_process_4 rotated=False bits=16
        +%linear_1: f32[1,4,32] = aten.linear(%activation_post_process_0, %activation_post_process_5)  # role=layers.0.up_proj rotated=True inputs=%x:8
        +%activation_post_process_6 = activation_post_process_6(%linear_1)  # role=activation_post_process_6 labels=layers.0.up_proj.output rotated=False bits=8
        +%mul: f32[1,4,32] = aten.mul.Tensor(%activation_post_process_4, %activation_post_process_6)  # role=mul inputs=%linear_1:16
        +%activation_post_process_7 = activation_post_process_7(%mul)  # role=activation_post_process_7 rotated=False bits=16
        +%linear_2: f32[1,4,16] = aten.linear(%activation_post_process_7, %activation_post_process_8)  # role=layers.0.down_proj rotated=False inputs=%mul:8
        +%activation_post_process_9 = activation_post_process_9(%linear_2)  # role=activation_post_process_9 labels=layers.0.down_proj.output rotated=False bits=8
        +%add: f32[1,4,16] = aten.add.Tensor(%activation_post_process_0, %activation_post_process_9)  # role=add inputs=%linear_2:16
        +%activation_post_process_10 = activation_post_process_10(%add)  # role=activation_post_process_10 rotated=False bits=16
        +return (%activation_post_process_10,)
    """)
    assert observe.deviations == ["%linear (layers.0.gate_proj): input %x 8 -> 16 bits (HTP op width; plan: A (rotated))"]


def test_without_legalization_the_plan_is_kept():
    observe = InsertStaticObservers(BitPlan.parse("4-8-8"), legalize=False)
    observed = run_passes(_mlp_graph(), [observe])
    gate = next(n for n in observed.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.gate_proj")
    assert observe.deviations == [] and node_info(gate).input_bits == (("x", 8),)


def test_static_calibration_applies_the_initialization_rule():
    fake_quant, _ = _calibrated("4-4-8")
    stacked = torch.cat(_batches())
    x = next(n for n in fake_quant.graph.nodes if n.name == "x")
    # the input itself: 16 bits, Max-Min
    assert node_info(x).encoding.scale == (float(torch.tensor(float(stacked.abs().max()) / 32767, dtype=torch.float32)),)
    up = next(n for n in fake_quant.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.up_proj")
    edge = node_info(up).input_encoding("x")  # rotated linear input at 4 bits: Mean-based
    mean, std = stacked.double().mean(), stacked.double().std(unbiased=False)
    expected = max(abs(mean - 3 * std), abs(mean + 3 * std)) / 8
    assert edge.bits == 4 and math.isclose(edge.scale[0], float(expected), rel_tol=1e-6)
    torch.manual_seed(0)  # Mlp's seed; gate_proj is its first parameter
    gate_weight = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False).weight.double()
    gate = next(n for n in fake_quant.graph.nodes if n.op == "get_attr" and n.target == "gate_proj.weight")
    encoding = node_info(gate).encoding  # rotated 4-bit weight: Mean-based per output channel
    rows_mean, rows_std = gate_weight.mean(1), gate_weight.std(1, unbiased=False)
    expected = torch.maximum((rows_mean - 3 * rows_std).abs(), (rows_mean + 3 * rows_std).abs()) / 8
    assert encoding.per_channel and encoding.restricted and encoding.bits == 4
    assert torch.allclose(torch.tensor(encoding.scale, dtype=torch.float64), expected, rtol=1e-6)


def test_unrotated_low_bits_only_by_override_and_with_a_warning():
    fake_quant, _ = _calibrated("8-4-8", rotated=False)  # the default plan keeps unrotated inputs at 8
    up = next(n for n in fake_quant.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.up_proj")
    assert node_info(up).input_encoding("x").bits == 8
    with pytest.warns(UserWarning, match=r"unrotated at 4 bits goes against the rule \(Mean-based if the tensor is rotated"):
        fake_quant, _ = _calibrated("8-4-8", rotated=False, overrides=("*.up_proj.input=4",))
    up = next(n for n in fake_quant.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.up_proj")
    assert node_info(up).input_encoding("x").bits == 4


def _expected_zero_point(quantize: torch.fx.Node, bits: int) -> int:
    quant_min = quantize.args[3]
    return 0 if quant_min < 0 else 2 ** (bits - 1)


def _check_bit_exact(fake_quant: torch.fx.GraphModule, quantized: torch.fx.GraphModule) -> int:
    """Every quantize op of the converted graph carries its encoding's scale and zero point exactly."""
    reference = {n.name: n for n in strip_observers(fake_quant).graph.nodes}
    checked = 0
    for node in quantized.graph.nodes:
        if quantize_kind(node) != "quantize" or "per_tensor" not in str(node.target):
            continue
        source = node.args[0]
        tensor = source.args[0].args[0] if quantize_kind(source) == "dequantize" else source
        bits = round(math.log2(node.args[4] - node.args[3] + 1))
        readers = [r for dq in node.users for r in dq.users]
        candidates = [node_info(reference[r.name]).input_encoding(tensor.name)
                      for r in readers if r.name in reference and node_info(reference[r.name]) is not None]
        candidates.append(node_info(reference[tensor.name]).encoding)
        matching = [e for e in candidates if e is not None and e.bits == bits]
        assert matching, node.name
        encoding = matching[0]
        assert float(node.args[1]) == encoding.scale[0], (node.name, node.args[1], encoding.scale)
        assert node.args[2] == _expected_zero_point(node, encoding.bits), node.name
        checked += 1
    for node in quantized.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            dequantize = node.args[1]
            weight = reference[node.name].args[1]
            encoding = node_info(weight).encoding
            scale = getattr(quantized, dequantize.args[1].target)
            assert torch.equal(scale, torch.tensor(encoding.scale, dtype=torch.float32)), node.name
            assert not getattr(quantized, dequantize.args[2].target).any()
            assert dequantize.args[4:6] == (-(2 ** (encoding.bits - 1) - 1), 2 ** (encoding.bits - 1) - 1)
            checked += 1
    return checked


@pytest.mark.parametrize("bits", ["8-8-8", "4-8-8", "4-4-8"])
def test_quantizer_is_bit_exact_and_integer_only(bits):
    fake_quant, _ = _calibrated(bits)
    quantized = quantize_with_encodings(fake_quant)
    assert _check_bit_exact(fake_quant, quantized) >= 10
    assert integer_only_violations(quantized) == []
    x = _batches(1)[0]
    assert torch.equal(fake_quant(x), quantized(x))  # the fake-quant graph is the Q/DQ graph's arithmetic


def test_encodings_file_round_trip_reproduces_the_quantized_graph(tmp_path):
    fake_quant, _ = _calibrated("4-8-8")
    activations, params = encodings_by_tensor(fake_quant)
    path = write_encodings(tmp_path / "encodings.json", activations, params)
    read_activations, read_params = read_encodings(path)
    assert read_activations == activations and read_params == params
    # A fresh graph given the file's encodings (plus the re-quantizing edges, which stay on the readers)
    fresh = _mlp_graph()
    reference = {n.name: n for n in strip_observers(fake_quant).graph.nodes}
    for node in fresh.graph.nodes:
        info = node_info(reference[node.name]) if node.name in reference else None
        if info is not None and info.input_encodings:
            set_node_info(node, info)
    assert attach_encodings(fresh, read_activations, read_params) == len(activations) + len(params)
    x = _batches(1)[0]
    assert torch.equal(quantize_with_encodings(fresh)(x), quantize_with_encodings(fake_quant)(x))


def test_quantizer_without_encodings_names_the_tensor():
    from quantnpu.errors import GraphStructureError

    with pytest.raises(GraphStructureError, match=r"^node %x: quantized tensor has no encoding"):
        quantize_with_encodings(_mlp_graph())
