"""Orthogonal matrices for R1/R2: random Hadamard of any order k * 2^m we can construct, else QR.

Constructions, all built here:
- Sylvester: H_1 = [1], H_2n = [[H, H], [H, -H]];
- Paley I: order q + 1 for a prime power q = 3 (mod 4);
- Paley II: order 2(q + 1) for a prime power q = 1 (mod 4);
- Kronecker products of those with Sylvester matrices.
Finite fields GF(p^n) for the Paley constructions are built from an irreducible polynomial
found by search, so prime powers (25, 27, ...) work as well as primes.

This covers k in {1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 108, ...}: SmolLM2 needs 576 = 36 * 16
(Paley II, q = 17, times H_16) and 64.
"""

from __future__ import annotations

import itertools
import warnings
from functools import lru_cache

import torch

from quantnpu.diagnostics import QuantNpuWarning
from quantnpu.errors import QuantNpuError


class NoHadamardConstruction(QuantNpuError):
    """No Hadamard matrix of the asked order can be built here."""


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, n) with q = p^n for a prime p, or None."""
    if q < 2:
        return None
    for p in range(2, q + 1):
        if q % p == 0:
            n, rest = 0, q
            while rest % p == 0:
                rest //= p
                n += 1
            return (p, n) if rest == 1 else None
    return None


class _GaloisField:
    """GF(p^n): elements are coefficient tuples (low degree first) modulo an irreducible polynomial."""

    def __init__(self, p: int, n: int) -> None:
        if n > 3:
            raise NoHadamardConstruction(f"GF({p}^{n}) is not supported (degree > 3)")
        self.p, self.n = p, n
        self.elements = list(itertools.product(range(p), repeat=n))
        self.modulus = self._irreducible() if n > 1 else None

    def _irreducible(self) -> tuple[int, ...]:
        p, n = self.p, self.n
        for low in itertools.product(range(p), repeat=n):  # monic polynomials x^n + low
            if low[0] == 0:
                continue
            poly = low + (1,)
            # A polynomial of degree 2 or 3 is irreducible exactly when it has no root.
            if not any(self._poly_eval(poly, x) == 0 for x in range(p)):
                return poly
        raise AssertionError(f"no irreducible polynomial of degree {n} over GF({p})")

    def _poly_eval(self, poly: tuple[int, ...], x: int) -> int:
        return sum(c * x**i for i, c in enumerate(poly)) % self.p

    def add(self, a, b):
        return tuple((x + y) % self.p for x, y in zip(a, b))

    def sub(self, a, b):
        return tuple((x - y) % self.p for x, y in zip(a, b))

    def mul(self, a, b):
        p, n = self.p, self.n
        product = [0] * (2 * n - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                product[i + j] = (product[i + j] + x * y) % p
        for degree in range(2 * n - 2, n - 1, -1):  # reduce by the monic modulus
            coefficient = product[degree]
            if coefficient:
                for i, m in enumerate(self.modulus):
                    product[degree - n + i] = (product[degree - n + i] - coefficient * m) % p
        return tuple(product[:n])

    def quadratic_character(self) -> dict:
        zero = (0,) * self.n
        squares = {self.mul(x, x) for x in self.elements if x != zero}
        return {x: 0 if x == zero else (1 if x in squares else -1) for x in self.elements}


def _jacobsthal(q: int) -> torch.Tensor:
    p, n = _prime_power(q)
    field = _GaloisField(p, n)
    chi = field.quadratic_character()
    elements = field.elements
    return torch.tensor([[chi[field.sub(a, b)] for b in elements] for a in elements], dtype=torch.float64)


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1, q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1), q = 1 mod 4: replace the entries of the symmetric conference matrix."""
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    blocks = [[zero if C[i, j] == 0 else C[i, j] * plus for j in range(q + 1)] for i in range(q + 1)]
    return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)


def _sylvester(order: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < order:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@lru_cache(maxsize=64)
def _hadamard_cached(order: int) -> torch.Tensor:
    if order == 1 or (order & (order - 1)) == 0:
        return _sylvester(order)
    # Largest power-of-two factor last, so the base is the smallest constructible k.
    for two_power in sorted((1 << m for m in range(order.bit_length()) if order % (1 << m) == 0), reverse=True):
        k = order // two_power
        base = _base_hadamard(k)
        if base is not None:
            return torch.kron(base, _sylvester(two_power))
    raise NoHadamardConstruction(f"no Hadamard construction for order {order} (need k * 2^m with a Paley order k)")


def _base_hadamard(k: int) -> torch.Tensor | None:
    if k == 1:
        return _sylvester(1)
    if k % 4 != 0 and k != 2:
        return None
    q = k - 1
    if (pp := _prime_power(q)) and q % 4 == 3 and pp[1] <= 3:
        return _paley_one(q)
    q = k // 2 - 1
    if k % 2 == 0 and (pp := _prime_power(q)) and q % 4 == 1 and pp[1] <= 3:
        return _paley_two(q)
    return None


def hadamard_matrix(order: int) -> torch.Tensor:
    """A +-1 matrix H of the given order with H H^T = order * I (float64)."""
    if order < 1:
        raise NoHadamardConstruction(f"Hadamard order must be positive, got {order}")
    return _hadamard_cached(order).clone()


def has_hadamard(order: int) -> bool:
    try:
        _hadamard_cached(order)
        return True
    except NoHadamardConstruction:
        return False


def random_hadamard(order: int, seed: int = 0) -> torch.Tensor:
    """H diag(+-1) / sqrt(order): orthogonal, float64, random signs from `seed`."""
    signs = torch.randint(0, 2, (order,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64) * 2 - 1
    return hadamard_matrix(order) * signs.to(torch.float64) / order**0.5


def random_orthogonal(order: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    gaussian = torch.randn(order, order, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def rotation_matrix(order: int, kind: str = "hadamard", seed: int = 0, strict: bool = False) -> torch.Tensor:
    """`kind` 'hadamard' (random Hadamard; QR with a warning when no construction exists, an
    error instead when `strict`) or 'random' (QR)."""
    if kind == "random":
        return random_orthogonal(order, seed)
    if kind != "hadamard":
        raise QuantNpuError(f"unknown rotation kind {kind!r}: use 'hadamard' or 'random'")
    if has_hadamard(order):
        return random_hadamard(order, seed)
    if strict:
        raise NoHadamardConstruction(f"no Hadamard construction for order {order}")
    warnings.warn(f"no Hadamard matrix of order {order} can be built here; using a random orthogonal matrix", QuantNpuWarning, stacklevel=2)
    return random_orthogonal(order, seed)
