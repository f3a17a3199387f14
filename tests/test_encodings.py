"""Encodings: the fixed-point grid, the JSON file (exact round trip), and the init rules."""

import json
import warnings

import pytest
import torch

from quantnpu.errors import InputFileError
from quantnpu.quantizers.encodings import Encoding, EncodingTable, read_encodings, write_encodings
from quantnpu.quantizers.init_rules import TensorStats, choose_rule, initial_scale, max_min_scale, mean_based_scale


def test_symmetric_grid_and_restricted_weight_range():
    activation = Encoding(bits=8, scale=(0.5,))
    assert (activation.qmin, activation.qmax) == (-128, 127)
    weight = Encoding(bits=4, scale=(1.0, 2.0), axis=0, restricted=True)
    assert (weight.qmin, weight.qmax) == (-7, 7)
    x = torch.tensor([[-100.0, 3.2, 0.26], [-100.0, 3.2, 0.26]])
    torch.testing.assert_close(weight.fake_quantize(x), torch.tensor([[-7.0, 3.0, 0.0], [-14.0, 4.0, 0.0]]))
    torch.testing.assert_close(activation.fake_quantize(torch.tensor([100.0, -100.0, 0.3])), torch.tensor([63.5, -64.0, 0.5]))


def test_fake_quantize_rounds_as_the_converted_graph_does():
    """Near a midpoint x/s and x*(1/s) round apart; convert_pt2e's quantize ops multiply by 1/s, so
    fake_quantize must too (else the fake-quant and Q/DQ graphs differ on a few elements)."""
    x = torch.tensor([-9.149999618530273, -8.149999618530273, -7.549999713897705, 0.3])  # 0.1 * (k + 1/2) in float32
    assert not torch.equal(torch.round(x / 0.1), torch.round(x * (1.0 / 0.1)))
    ops = torch.ops.quantized_decomposed
    for zero_point, qmin, qmax in ((0, -128, 127), (128, 0, 255)):  # signed, and QNN's unsigned storage
        encoding = Encoding(bits=8, scale=(0.1,), zero_point=zero_point - (128 if qmin == 0 else 0))
        stored = ops.dequantize_per_tensor(ops.quantize_per_tensor(x, 0.1, zero_point, qmin, qmax, torch.uint8 if qmin == 0 else torch.int8),
                                           0.1, zero_point, qmin, qmax, torch.uint8 if qmin == 0 else torch.int8)
        assert torch.equal(encoding.fake_quantize(x), stored)
    weight = Encoding(bits=4, scale=(0.1, 0.2), axis=0, restricted=True)
    w = torch.stack([x, 2 * x])
    scales = torch.tensor([0.1, 0.2])
    zero = torch.zeros(2, dtype=torch.int32)
    stored = ops.dequantize_per_channel(ops.quantize_per_channel(w, scales, zero, 0, -7, 7, torch.int8), scales, zero, 0, -7, 7, torch.int8)
    assert torch.equal(weight.fake_quantize(w), stored)


def test_json_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    activations = {
        "layers.0.q_proj.input": Encoding(bits=8, scale=(float(torch.rand(1)) * 1e-2,)),
        "layers.0.gate_proj.output": Encoding(bits=16, scale=(3.0517578125e-05,)),
        "asymmetric": Encoding(bits=8, scale=(0.1,), zero_point=-17, symmetric=False),
    }
    params = {
        "model.layers.0.self_attn.q_proj.weight": Encoding(bits=4, scale=tuple(torch.rand(7).double().tolist()), axis=0, restricted=True),
        "model.lm_head.weight": Encoding(bits=8, scale=(1 / 3, 2 / 3), axis=0, restricted=True),
    }
    edges = {"linear_3": {"mul_2": Encoding(bits=8, scale=(0.25,)), "x": Encoding(bits=16, scale=(1e-4,))}}
    table = EncodingTable(activations, params, edges)
    path = write_encodings(tmp_path / "enc.json", table)
    assert read_encodings(path) == table
    document = json.loads(path.read_text())
    entry = document["param_encodings"]["model.lm_head.weight"][1]
    assert entry["bitwidth"] == 8 and entry["is_symmetric"] == "True" and entry["offset"] == -128
    assert entry["min"] == pytest.approx(-127 * 2 / 3) and entry["max"] == pytest.approx(127 * 2 / 3)


def test_bad_encodings_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"activation_encodings": {"x": [{"bitwidth": 8}]}, "param_encodings": {}}')
    with pytest.raises(InputFileError, match="bad.json: bad encoding for tensor 'x'"):
        read_encodings(path)
    path.write_text("[1, 2")
    with pytest.raises(InputFileError, match="not an encodings JSON file"):
        read_encodings(path)


def _mse(x, bits, scale, restricted=False):
    encoding = Encoding(bits=bits, scale=(float(scale),), restricted=restricted)
    return ((encoding.fake_quantize(x) - x) ** 2).mean().item()


def test_the_two_rules_follow_the_formulas():
    x = torch.tensor([-3.0, 1.0, 5.0, 1.0])
    stats = TensorStats.of(x)
    assert max_min_scale(stats, 8).item() == pytest.approx(5.0 / 127)
    mu, sigma = x.mean().item(), x.std(unbiased=False).item()
    assert mean_based_scale(stats, 4).item() == pytest.approx(max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 8)


def test_rule_picks_the_lower_error_method_in_the_papers_cases():
    generator = torch.Generator().manual_seed(0)
    rotated = torch.randn(200_000, generator=generator, dtype=torch.float64)  # rotation makes tensors Gaussian-like
    stats = TensorStats.of(rotated)
    # rotated, 4 bits: mean-based clips the rare tails for a 1.5x finer grid and wins
    assert choose_rule(True, 4) == "mean"
    assert _mse(rotated, 4, mean_based_scale(stats, 4)) < _mse(rotated, 4, max_min_scale(stats, 4))
    # rotated, 8 bits: the grid is fine either way; clipping at 3 sigma costs more than it saves
    assert choose_rule(True, 8) == "max_min"
    assert _mse(rotated, 8, max_min_scale(stats, 8)) < _mse(rotated, 8, mean_based_scale(stats, 8))
    # unrotated, heavy-tailed (outlier channels): mean-based clips the outliers and fails badly
    heavy = torch.distributions.StudentT(2.0).sample((200_000,)).double()
    heavy_stats = TensorStats.of(heavy)
    assert choose_rule(False, 8) == "max_min"
    assert _mse(heavy, 8, max_min_scale(heavy_stats, 8)) < _mse(heavy, 8, mean_based_scale(heavy_stats, 8))


def test_unrotated_below_8_bits_warns_with_the_rule():
    with pytest.warns(UserWarning, match="layers.3.down_proj.input: unrotated at 4 bits goes against the rule"):
        choose_rule(False, 4, "layers.3.down_proj.input")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_rule(True, 4)
        choose_rule(False, 8)


def test_per_channel_weight_statistics():
    weight = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -0.5]])
    stats = TensorStats.of(weight, axis=0)
    torch.testing.assert_close(max_min_scale(stats, 8), torch.tensor([4.0 / 127, 0.5 / 127], dtype=torch.float64))
    assert initial_scale(stats, 4, rotated=True).shape == (2,)
