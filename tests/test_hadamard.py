"""Orthogonal matrices for R1/R2: Hadamard constructions and the QR fallback."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantnpu.quantizers.hadamard import (
    NoHadamardConstruction, has_hadamard, hadamard_matrix, random_hadamard, random_orthogonal, rotation_matrix,
)

# k * 2^m for every k the issue names, SmolLM2's sizes (576 = 36 * 16, 64), and prime-power Paley
# fields (28: q = 27 = 3^3; 52: q = 25 = 5^2).
ORDERS = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 52, 56, 60, 64, 72, 104, 108, 120, 576, 1152, 1536]


@pytest.mark.parametrize("order", ORDERS)
def test_hadamard_is_plus_minus_one_with_orthogonal_rows(order):
    H = hadamard_matrix(order)
    assert H.shape == (order, order)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, order * torch.eye(order, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([1, 12, 20, 28, 36, 40, 52, 60]), m=st.integers(0, 5), seed=st.integers(0, 10**6))
def test_random_hadamard_is_orthogonal_for_every_k_times_power_of_two(k, m, seed):
    order = k * 2**m
    R = random_hadamard(order, seed)
    assert torch.allclose(R @ R.T, torch.eye(order, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(R.abs(), torch.full_like(R, order**-0.5))


def test_random_signs_depend_on_the_seed():
    assert not torch.equal(random_hadamard(64, 0), random_hadamard(64, 1))
    assert torch.equal(random_hadamard(64, 3), random_hadamard(64, 3))


@pytest.mark.parametrize("order", [3, 6, 92])  # no Hadamard exists (3, 6) or none is built here (92)
def test_orders_without_construction_fall_back_to_qr_with_a_warning(order):
    assert not has_hadamard(order)
    with pytest.warns(UserWarning, match=f"no Hadamard matrix of order {order}"):
        R = rotation_matrix(order, "hadamard", seed=0)
    assert torch.allclose(R @ R.T, torch.eye(order, dtype=torch.float64), atol=1e-12)
    with pytest.raises(NoHadamardConstruction, match=f"order {order}"):
        rotation_matrix(order, "hadamard", strict=True)


def test_random_orthogonal():
    R = random_orthogonal(50, seed=2)
    assert torch.allclose(R.T @ R, torch.eye(50, dtype=torch.float64), atol=1e-12)
    assert torch.equal(rotation_matrix(50, "random", seed=2), R)
