"""StaticCalibration: which initialization rule sets each encoding, per tensor and per
re-quantizing edge, from the statistics of the calibration batches."""

import math

import pytest
import torch

from quantnpu.graph.meta import node_info, tensor_quant
from tests.passes.swiglu_block import HIDDEN, INTERMEDIATE, batches, calibrated


def test_static_calibration_applies_the_initialization_rule():
    fake_quant, _ = calibrated("4-4-8")
    stacked = torch.cat(batches())
    x = next(n for n in fake_quant.graph.nodes if n.name == "x")
    # the input itself: 16 bits, Max-Min
    assert tensor_quant(x).encoding.scale == (float(torch.tensor(float(stacked.abs().max()) / 32767, dtype=torch.float32)),)
    up = next(n for n in fake_quant.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.up_proj")
    edge = tensor_quant(up).input_encoding("x")  # rotated linear input at 4 bits: Mean-based
    mean, std = stacked.double().mean(), stacked.double().std(unbiased=False)
    expected = max(abs(mean - 3 * std), abs(mean + 3 * std)) / 8
    assert edge.bits == 4 and math.isclose(edge.scale[0], float(expected), rel_tol=1e-6)
    torch.manual_seed(0)  # Mlp's seed; gate_proj is its first parameter
    gate_weight = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False).weight.double()
    gate = next(n for n in fake_quant.graph.nodes if n.op == "get_attr" and n.target == "gate_proj.weight")
    encoding = tensor_quant(gate).encoding  # rotated 4-bit weight: Mean-based per output channel
    rows_mean, rows_std = gate_weight.mean(1), gate_weight.std(1, unbiased=False)
    expected = torch.maximum((rows_mean - 3 * rows_std).abs(), (rows_mean + 3 * rows_std).abs()) / 8
    assert encoding.per_channel and encoding.restricted and encoding.bits == 4
    assert torch.allclose(torch.tensor(encoding.scale, dtype=torch.float64), expected, rtol=1e-6)


def test_unrotated_low_bits_only_by_override_and_with_a_warning():
    fake_quant, _ = calibrated("8-4-8", rotated=False)  # the default plan keeps unrotated inputs at 8
    up = next(n for n in fake_quant.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.up_proj")
    assert tensor_quant(up).input_encoding("x").bits == 8
    with pytest.warns(UserWarning, match=r"unrotated at 4 bits goes against the rule \(Mean-based if the tensor is rotated"):
        fake_quant, _ = calibrated("8-4-8", rotated=False, overrides=("*.up_proj.input=4",))
    up = next(n for n in fake_quant.graph.nodes if (i := node_info(n)) is not None and i.role == "layers.0.up_proj")
    assert tensor_quant(up).input_encoding("x").bits == 4
