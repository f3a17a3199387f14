"""Stage one's two learnable pieces: an LSQ fake-quantizer and Cayley SGD for orthogonal matrices.

`LearnableQuantizer` quantize-dequantizes with torch's own learnable fake-quant ops
(`torch._fake_quantize_learnable_per_tensor_affine` / `..._per_channel_affine`): straight-through
for `round`, and the LSQ gradient of the scale, `round(v) - v` inside the range and `qmin` / `qmax`
at the clips (v = x / s; torch decides "at the clips" on round(v), so half a step beyond the range
still gets round(v) - v). Their forward is the same arithmetic as the `quantized_decomposed` Q/DQ
ops the converted graph runs (`round(x * (1/s))`, clamp, multiply back). `grad_factor` carries
LSQ's gradient scaling `1 / sqrt(N * qmax)`, N the elements sharing one scale.

The scale is learned relative to its initial value: `s = s0 * u`, u a parameter starting at 1. A
plain SGD step of `lr` on u moves every scale by the same fraction of its own size, so one learning
rate serves an 8-bit scale of 1e-2 and a 16-bit scale of 1e-4 alike (in the raw parametrization
the same step is `lr * s0^2 * dL/ds`, which no single lr fits across widths).

`CayleySGD` keeps orthogonal matrices orthogonal (SpinQuant's SGDG idea): with the Euclidean
gradient G of X, the skew matrix `A = G X^T - X G^T` and the Cayley step
`X <- (I + a/2 A)^-1 (I - a/2 A) X`, `a = min(lr, 1 / ||A||_1)`, solved in float64 on a float64
master copy; the graph's parameter gets the float32 (or its own dtype) copy.
"""

from __future__ import annotations

import math

import torch

from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.observers import float32_exact

# u is kept above this, so a scale never reaches zero or flips sign
MIN_RELATIVE_SCALE = 1e-3


class LearnableQuantizer(torch.nn.Module):
    """Symmetric b-bit fake-quant with a learnable scale (per tensor, or per channel on `axis`).

    `restricted`: weights' signed range +-(2^(b-1) - 1). `learn=False` keeps the scale fixed.
    `dynamic`: per-token scales from each token's |max| instead (activations, SpinQuant's
    simulation), with the straight-through gradient and nothing learned. `enabled=False` passes
    values through (the float model). With `record_error`, `last_error` holds this forward's
    `mean((x - x_hat)^2)` (the local loss term)."""

    def __init__(self, initial_scale: torch.Tensor, bits: int, axis: int | None = None, restricted: bool = False,
                 learn: bool = True, dynamic: bool = False) -> None:
        super().__init__()
        initial_scale = torch.as_tensor(initial_scale, dtype=torch.float32).reshape(-1)
        if not bool((initial_scale > 0).all()):
            raise ValueError("initial scales must be positive")
        if axis is None and initial_scale.numel() != 1:
            raise ValueError("a per-tensor quantizer has one scale")
        self.bits, self.axis, self.restricted, self.dynamic = bits, axis, restricted, dynamic
        self.qmin = -(2 ** (bits - 1)) + (1 if restricted else 0)
        self.qmax = 2 ** (bits - 1) - 1
        self.register_buffer("initial_scale", initial_scale)
        self.register_buffer("zero_point", torch.zeros_like(initial_scale))
        self.relative = torch.nn.Parameter(torch.ones_like(initial_scale), requires_grad=learn)
        self.enabled = True
        self.record_error = False
        self.last_error: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self.initial_scale * self.relative

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale 1/sqrt(N * qmax), N = elements per scale in this forward."""
        per_scale = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
        return 1.0 / math.sqrt(per_scale * self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.dynamic:
            y = self._per_token(x)
        elif self.axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale, self.zero_point, self.qmin, self.qmax, self.grad_factor(x))
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(
                x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax, self.grad_factor(x))
        if self.record_error:
            self.last_error = (x - y).square().mean()
        return y

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = (rows.detach().abs().amax(-1) / self.qmax).clamp_min(1e-12)
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(rows, scale, zero, 0, self.qmin, self.qmax).reshape(x.shape)

    def clamp_(self) -> None:
        """Keep every scale positive after an optimizer step."""
        with torch.no_grad():
            self.relative.clamp_(min=MIN_RELATIVE_SCALE)

    def encoding(self, note: str = "stage one") -> Encoding:
        """The current scale as an `Encoding` (float32 numbers, as QNN stores them)."""
        return Encoding(bits=self.bits, scale=float32_exact(self.scale.detach()), zero_point=0, symmetric=True,
                        axis=self.axis, restricted=self.restricted, note=note)

    def extra_repr(self) -> str:
        kind = "dynamic per-token" if self.dynamic else ("per-channel" if self.axis is not None else "per-tensor")
        return f"bits={self.bits}, {kind}, learn={self.relative.requires_grad}"


class CayleySGD(torch.optim.Optimizer):
    """SGD on the Stiefel manifold of square orthogonal matrices (see the module docstring).

    Each parameter keeps a float64 master copy in the optimizer state; `momentum` (optional) is
    heavy-ball on the Euclidean gradient before the skew projection."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "master" not in state:
            master = p.detach().double()
            error = orthogonality_error(master)
            if error > 1e-4:
                raise ValueError(f"CayleySGD needs orthogonal parameters; ||X^T X - I|| = {error:.2e}")
            # the parameter is orthogonal to its dtype's precision; the master is the nearest exactly
            # orthogonal matrix (polar factor), so float64 steps keep ||X^T X - I|| at ~1e-14
            u, _, vh = torch.linalg.svd(master)
            state["master"] = u @ vh
        return state["master"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                x = self._master(p)
                gradient = p.grad.double()
                if group["momentum"]:
                    buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(gradient))
                    buffer.mul_(group["momentum"]).add_(gradient)
                    gradient = buffer
                skew = gradient @ x.T - x @ gradient.T
                norm = float(torch.linalg.matrix_norm(skew, ord=1))
                if norm == 0.0:
                    continue
                a = min(group["lr"], 1.0 / norm)
                eye = torch.eye(x.shape[0], dtype=x.dtype)
                x = torch.linalg.solve(eye + (a / 2) * skew, (eye - (a / 2) * skew) @ x)
                self.state[p]["master"] = x
                p.copy_(x.to(p.dtype))
        return loss

    def masters(self) -> list[torch.Tensor]:
        """The float64 matrices (after at least one step, or the parameters as float64)."""
        return [self._master(p) for group in self.param_groups for p in group["params"]]


def orthogonality_error(x: torch.Tensor) -> float:
    """||X^T X - I|| (Frobenius), in float64."""
    x = x.double()
    return float(torch.linalg.matrix_norm(x.T @ x - torch.eye(x.shape[1], dtype=x.dtype)))
