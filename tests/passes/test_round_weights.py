"""RoundWeightsGptq: GPTQ's codes beat round-to-nearest on the layer's output with the same scales,
the weights stay on their encodings' grid, and the pipeline converts them unchanged."""

import copy

import pytest
import torch

from quantnpu.errors import QuantNpuError
from quantnpu.graph.equivalence import logits_of
from quantnpu.passes import PassManager
from quantnpu.passes.round_weights import RoundWeightsGptq, gptq_codes
from quantnpu.passes.static_calibration import encodings_by_tensor
from quantnpu.pipeline import STATIC, fake_quant_end, find_pass, pipeline
from quantnpu.quantizers.encodings import Encoding
from tests.graph_testing import tiny_graph


def _layer(rows: int = 512, columns: int = 64, out: int = 32):
    generator = torch.Generator().manual_seed(0)
    # correlated inputs with a few strong directions, as a linear's input is
    mixing = torch.randn(columns, columns, generator=generator) * torch.logspace(0, -2, columns).reshape(1, -1)
    x = torch.randn(rows, columns, generator=generator, dtype=torch.float64) @ mixing.double()
    w = torch.randn(out, columns, generator=generator, dtype=torch.float64)
    encoding = Encoding(bits=4, scale=tuple((w.abs().amax(1) / 7).tolist()), axis=0, restricted=True)
    return x, w, encoding


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_round_to_nearest_with_the_same_scales(act_order):
    x, w, encoding = _layer()
    scale = torch.tensor(encoding.scale, dtype=torch.float64).reshape(-1, 1)
    nearest = encoding.fake_quantize(w)
    codes = gptq_codes(w, x.T @ x / x.shape[0], encoding, act_order=act_order, block=16)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 7     # integers in the restricted int4 range
    gptq = codes * scale
    nearest_error = (x @ (nearest - w).T).norm()
    gptq_error = (x @ (gptq - w).T).norm()
    assert gptq_error < 0.8 * nearest_error, (float(gptq_error), float(nearest_error))


def test_gptq_with_identity_hessian_is_round_to_nearest():
    _, w, encoding = _layer()
    codes = gptq_codes(w, torch.eye(w.shape[1], dtype=torch.float64), encoding, damp=0.0)
    assert torch.equal(codes * torch.tensor(encoding.scale, dtype=torch.float64).reshape(-1, 1), encoding.fake_quantize(w))


def _calibration(count: int = 4, seq_len: int = 16):
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (1, seq_len), generator=generator) for _ in range(count)]


def test_pipeline_rounds_the_4_bit_weights_on_their_grid_and_keeps_the_encodings():
    graph = tiny_graph("llama", layers=2, seq_len=16)
    calibration = _calibration()
    nearest_passes = pipeline("4-8-8", calibration, STATIC)
    nearest = PassManager(nearest_passes, stop_after=fake_quant_end(nearest_passes)).run(copy.deepcopy(graph))
    passes = pipeline("4-8-8", calibration, STATIC, weight_rounding="gptq")
    assert fake_quant_end(passes) == "RoundWeightsGptq"
    rounded = PassManager(passes, stop_after=fake_quant_end(passes)).run(copy.deepcopy(graph))
    gptq = find_pass(passes, RoundWeightsGptq)
    assert len(gptq.layers) == 14                      # 7 linears x 2 layers at 4 bits; lm_head (8 bits) not
    assert all(r.bits == 4 for r in gptq.layers)
    assert sum(r.kept for r in gptq.layers) >= 12
    assert all(r.gptq_error < r.nearest_error for r in gptq.layers if r.kept)
    assert encodings_by_tensor(rounded).params == encodings_by_tensor(nearest).params   # same scales
    params = dict(rounded.named_parameters())
    for r in gptq.layers:
        encoding = encodings_by_tensor(rounded).params[r.parameter]
        weight = params[r.parameter]
        assert torch.equal(encoding.fake_quantize(weight.detach()), weight.detach())
    # the quantized model's logits move less from the float model's with GPTQ
    window = _calibration(1, 16)[0]
    reference = logits_of(graph(window))
    assert (logits_of(rounded(window)) - reference).norm() < (logits_of(nearest(window)) - reference).norm()
    # conversion carries the rounded weights as they are: the Q/DQ graph computes the fake-quant graph
    converted = PassManager(passes, verify=False).run(rounded, start_after=fake_quant_end(passes))
    assert torch.allclose(logits_of(converted(window)), logits_of(rounded(window)), rtol=1e-4, atol=1e-4)
    assert "GPTQ codes kept for" in gptq.report()


def test_bad_gptq_settings_are_one_line_errors():
    with pytest.raises(QuantNpuError, match="dampening must be in"):
        RoundWeightsGptq([], damp=1.5)
    with pytest.raises(QuantNpuError, match="unknown weight rounding 'stochastic'"):
        pipeline("4-8-8", _calibration(), STATIC, weight_rounding="stochastic")
    _, w, _ = _layer()
    with pytest.raises(QuantNpuError, match="one scale per output channel"):
        gptq_codes(w, torch.eye(w.shape[1]), Encoding(bits=4, scale=(0.1,)))
