"""Rotation-and-bit-width-aware initialization of symmetric scales (METHOD.md, Sec. 4.2).

- Max-Min: `s = max(|min x|, |max x|) / qmax`.
- Mean-based (LSQ+ init): `s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)`.
- Rule: Mean-based if the tensor is rotated AND bits <= 4, Max-Min otherwise.
Weights apply the same rule per output channel (statistics along the other axes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from quantnpu.diagnostics import QuantNpuWarning

RULE_TEXT = "Mean-based if the tensor is rotated and bits <= 4, Max-Min otherwise; unrotated tensors should have >= 8 bits"


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor (shape []) or per-channel (shape [C]) statistics of observed values."""

    minimum: torch.Tensor
    maximum: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @staticmethod
    def of(x: torch.Tensor, axis: int | None = None) -> TensorStats:
        x = x.detach().double()
        if axis is None:
            flat = x.flatten()
            return TensorStats(flat.min(), flat.max(), flat.mean(), flat.std(unbiased=False))
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return TensorStats(rows.min(1).values, rows.max(1).values, rows.mean(1), rows.std(1, unbiased=False))


def max_min_scale(stats: TensorStats, bits: int, restricted: bool = False) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.maximum(stats.minimum.abs(), stats.maximum.abs()).clamp_min(1e-12) / qmax


def mean_based_scale(stats: TensorStats, bits: int) -> torch.Tensor:
    low, high = (stats.mean - 3 * stats.std).abs(), (stats.mean + 3 * stats.std).abs()
    return torch.maximum(low, high).clamp_min(1e-12) / 2 ** (bits - 1)


def choose_rule(rotated: bool, bits: int, where: str = "tensor") -> str:
    """'mean' or 'max_min' by the rule; warns (quoting it) for an unrotated tensor below 8 bits."""
    if not rotated and bits < 8:
        warnings.warn(f"{where}: unrotated at {bits} bits goes against the rule ({RULE_TEXT})", QuantNpuWarning, stacklevel=2)
    return "mean" if rotated and bits <= 4 else "max_min"


def initial_scale(stats: TensorStats, bits: int, rotated: bool, restricted: bool = False, where: str = "tensor") -> torch.Tensor:
    if choose_rule(rotated, bits, where) == "mean":
        return mean_based_scale(stats, bits)
    return max_min_scale(stats, bits, restricted)
