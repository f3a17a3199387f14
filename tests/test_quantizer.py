"""QuantNpuQuantizer: the converted graph carries exactly the recorded encodings (bit for bit),
is integer-only, computes what the fake-quant graph computes; the encodings file reproduces it."""

import math

import pytest
import torch

from quantnpu.graph.meta import tensor_quant
from quantnpu.graph.ops import quantize_kind
from quantnpu.passes.integer_only import integer_only_violations
from quantnpu.passes.static_calibration import attach_encodings, encodings_by_tensor
from quantnpu.quantizers.encodings import read_encodings, write_encodings
from quantnpu.quantizers.quantnpu_quantizer import quantize_with_encodings, strip_observers
from tests.passes.swiglu_block import batches, calibrated, mlp_graph


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
        candidates = [tensor_quant(reference[r.name]).input_encoding(tensor.name)
                      for r in readers if r.name in reference and tensor_quant(reference[r.name]) is not None]
        candidates.append(tensor_quant(reference[tensor.name]).encoding)
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
            encoding = tensor_quant(weight).encoding
            scale = getattr(quantized, dequantize.args[1].target)
            assert torch.equal(scale, torch.tensor(encoding.scale, dtype=torch.float32)), node.name
            assert not getattr(quantized, dequantize.args[2].target).any()
            assert dequantize.args[4:6] == (-(2 ** (encoding.bits - 1) - 1), 2 ** (encoding.bits - 1) - 1)
            checked += 1
    return checked


@pytest.mark.parametrize("bits", ["8-8-8", "4-8-8", "4-4-8"])
def test_quantizer_is_bit_exact_and_integer_only(bits):
    fake_quant, _ = calibrated(bits)
    quantized = quantize_with_encodings(fake_quant)
    assert _check_bit_exact(fake_quant, quantized) >= 10
    assert integer_only_violations(quantized) == []
    x = batches(1)[0]
    assert torch.equal(fake_quant(x), quantized(x))  # the fake-quant graph is the Q/DQ graph's arithmetic


def test_encodings_file_round_trip_reproduces_the_quantized_graph(tmp_path):
    """The file alone (tensors, parameters and re-quantizing edges) puts the same encodings on a
    fresh graph: the same quantized graph."""
    fake_quant, _ = calibrated("4-8-8")
    table = encodings_by_tensor(fake_quant)
    assert table.edges  # linears re-quantize their 16-bit inputs
    path = write_encodings(tmp_path / "encodings.json", table)
    read = read_encodings(path)
    assert read == table
    fresh = mlp_graph()
    assert attach_encodings(fresh, read) == len(table.activations) + len(table.params) + len(table.edges)
    x = batches(1)[0]
    assert torch.equal(quantize_with_encodings(fresh)(x), quantize_with_encodings(fake_quant)(x))


def test_encodings_naming_a_missing_node_is_an_error():
    from quantnpu.errors import GraphStructureError
    from quantnpu.quantizers.encodings import EncodingTable

    fake_quant, _ = calibrated("8-8-8")
    table = encodings_by_tensor(fake_quant)
    bad = EncodingTable(table.activations, table.params, {"nowhere": next(iter(table.edges.values()))})
    with pytest.raises(GraphStructureError, match="re-quantizing edge at 'nowhere'"):
        attach_encodings(mlp_graph(), bad)


def test_quantizer_without_encodings_names_the_tensor():
    from quantnpu.errors import GraphStructureError

    with pytest.raises(GraphStructureError, match=r"^node %x: quantized tensor has no encoding"):
        quantize_with_encodings(mlp_graph())
