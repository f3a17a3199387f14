"""Stage one's learnable pieces: the LSQ scale gradient (METHOD.md's formula, by hand), LSQ's
gradient scaling, the relative scale parametrization, and Cayley SGD staying orthogonal."""

import math

import pytest
import torch

from quantnpu.quantizers.hadamard import rotation_matrix
from quantnpu.quantizers.learnable import CayleySGD, LearnableQuantizer, orthogonality_error


def _lsq_gradient(x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
    """d x_hat / d s per element (METHOD.md): round(v) - v inside the range, qmin / qmax outside.
    (torch tests the range on round(v): within half a step outside the range it gives
    round(v) - v; the examples keep clear of that band.)"""
    v = x / scale
    return torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), torch.round(v) - v))


def test_per_tensor_scale_gradient_is_the_lsq_formula_times_the_grad_scale():
    # 4-bit activation grid [-8, 7], s = 0.5: values inside, below and above the range, none at a midpoint
    x = torch.tensor([0.26, -0.74, 1.1, 3.0, -5.0, 0.9])
    q = LearnableQuantizer(torch.tensor(0.5), bits=4)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, -1.0])
    (q(x) * upstream).sum().backward()
    # by hand: v = x / s = [0.52, -1.48, 2.2, 6.0, -10.0 (below qmin), 1.8]
    by_hand = torch.tensor([1 - 0.52, -1 + 1.48, 2 - 2.2, 6 - 6.0, -8.0, 2 - 1.8])
    assert torch.allclose(_lsq_gradient(x, 0.5, -8, 7), by_hand, atol=1e-6)
    grad_scale = 1 / math.sqrt(x.numel() * 7)  # LSQ: 1 / sqrt(N * qmax), N elements share the scale
    expected_ds = float((upstream * by_hand).sum()) * grad_scale
    # s = s0 * u with s0 = 0.5, so dL/du = s0 * dL/ds
    assert q.relative.grad.item() == pytest.approx(0.5 * expected_ds, rel=1e-5)


def test_per_channel_weight_scale_gradient_and_restricted_range():
    w = torch.tensor([[0.3, -1.1, 3.1, 0.05], [4.0, -7.9, 0.7, -0.26]])  # v = 7.75, -7.9: clipped
    scales = torch.tensor([0.4, 1.0])
    q = LearnableQuantizer(scales, bits=4, axis=0, restricted=True)   # grid [-7, 7]
    assert (q.qmin, q.qmax) == (-7, 7)
    q(w).sum().backward()
    expected = torch.stack([_lsq_gradient(w[c], float(scales[c]), -7, 7).sum() for c in range(2)])
    expected = expected / math.sqrt(w.shape[1] * 7)   # N = in_features per output channel
    assert torch.allclose(q.relative.grad, scales * expected, rtol=1e-5)


def test_forward_is_the_encoding_the_converted_graph_applies():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32) * 3
    for bits, scale in ((4, 0.3), (8, 0.02), (16, 1e-4)):
        q = LearnableQuantizer(torch.tensor(scale), bits)
        assert torch.equal(q(x), q.encoding().fake_quantize(x))
    w = torch.randn(8, 32)
    q = LearnableQuantizer(w.abs().amax(1) / 7, bits=4, axis=0, restricted=True)
    assert torch.equal(q(w), q.encoding().fake_quantize(w))


def test_one_relative_step_moves_8_and_16_bit_scales_by_the_same_fraction_per_unit_gradient():
    small, large = LearnableQuantizer(torch.tensor(1e-4), 16), LearnableQuantizer(torch.tensor(1e-2), 8)
    for q in (small, large):
        q.relative.grad = torch.tensor([0.5])
        torch.optim.SGD([q.relative], lr=0.1).step()
    assert small.scale.item() == pytest.approx(1e-4 * 0.95) and large.scale.item() == pytest.approx(1e-2 * 0.95)


def test_scales_stay_positive_after_a_huge_step():
    q = LearnableQuantizer(torch.tensor(0.1), 8)
    q.relative.grad = torch.tensor([1e6])
    torch.optim.SGD([q.relative], lr=1.0).step()
    q.clamp_()
    assert q.scale.item() > 0


def test_dynamic_quantizer_uses_each_tokens_max():
    x = torch.tensor([[[1.0, -0.5, 0.25], [100.0, 3.0, -50.0]]])
    y = LearnableQuantizer(torch.tensor(1.0), 8, dynamic=True)(x)
    assert y[0, 0, 0].item() == pytest.approx(1.0) and y[0, 1, 0].item() == pytest.approx(100.0)
    assert (y - x).abs()[0, 0].max() <= 1.0 / 127 / 2 + 1e-7   # token 0's grid, not token 1's


def test_cayley_sgd_keeps_orthogonality_over_100_steps_and_descends():
    torch.manual_seed(0)
    n = 24
    target = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0].float()
    x = torch.nn.Parameter(rotation_matrix(n, "random", seed=3).float())
    optimizer = CayleySGD([x], lr=0.1, momentum=0.5)
    first = None
    for _ in range(100):
        loss = (x - target).square().sum()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (master,) = optimizer.masters()
    assert orthogonality_error(master) < 1e-5
    assert orthogonality_error(x.detach()) < 1e-5
    assert (x - target).square().sum().item() < 0.5 * first


def test_cayley_sgd_refuses_a_matrix_that_is_not_orthogonal():
    x = torch.nn.Parameter(torch.eye(4) * 2)
    x.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="orthogonal"):
        CayleySGD([x]).step()
