"""The one observer module quantnpu puts in a graph: it gathers statistics, then holds an encoding.

`EncodingObserver` is a torchao PT2E observer (`ObserverBase`), so `prepare_pt2e` can insert it and
`convert_pt2e` can turn it into quantize/dequantize ops:
- while it has no encoding it observes: streaming min, max, sum, sum of squares and count (in
  float64, per channel for weights) and a histogram of |x| over fixed power-of-two bins, so its
  memory does not grow with the calibration set;
- once `encoding` is set it is a fixed fake-quantizer: `forward` quantize-dequantizes with those
  numbers and `calculate_qparams` returns them, so convert writes exactly them into the graph.

Storage follows QNN: activations unsigned with offset 2^(b-1) (8-bit in uint8, 16-bit in int32
holding the uint16 range, as ExecuTorch's QNN quantizer does), weights signed with a restricted
range. The signed symmetric encoding and its unsigned storage are the same grid.
"""

from __future__ import annotations

import math
import weakref

import torch
from torchao.quantization.pt2e.observer import ObserverBase

from quantnpu.errors import QuantNpuError
from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.init_rules import TensorStats

# |x| histogram: bin k holds values in [2^(k+LOW), 2^(k+1+LOW)); bin 0 also takes everything smaller.
HISTOGRAM_LOW_EXPONENT = -24
HISTOGRAM_BINS = 64
HISTOGRAM_SAMPLE = 1 << 16  # elements per update that go into the histogram (evenly strided)


def storage(bits: int, weight: bool, signed_activation: bool = False) -> tuple[torch.dtype, int, int, torch.qscheme]:
    """(dtype, quant_min, quant_max, qscheme) that carry a symmetric `bits` grid through PT2E to QNN.
    `signed_activation`: a 16-bit activation stored signed (QNN's 16-bit MatMul second input)."""
    if weight:
        return torch.int8 if bits <= 8 else torch.int32, -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, torch.per_channel_symmetric
    if signed_activation:
        return torch.int16 if bits == 16 else torch.int8, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.per_tensor_symmetric
    return torch.uint8 if bits <= 8 else torch.int32, 0, 2**bits - 1, torch.per_tensor_symmetric


class RunningStats:
    """Streaming statistics of everything observed, per channel along `axis` or per tensor."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.count = 0
        self.minimum = self.maximum = self.total = self.total_squares = None
        self.histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.int64)
        self._last_seen: tuple[weakref.ref, int] | None = None

    def update(self, x: torch.Tensor) -> None:
        # A constant (weight, table) arrives as the same live tensor object, unmodified, every
        # batch: count it once. Identity, not the storage address: the allocator hands a freed
        # activation's address to the next window's activation, which must be counted.
        if self._last_seen is not None and self._last_seen[0]() is x and self._last_seen[1] == x._version:
            return
        self._last_seen = (weakref.ref(x), x._version)  # weak: an activation is freed after its forward
        x = x.detach()
        if self.axis is None:
            rows = x.reshape(1, -1)
        else:
            rows = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        reductions = (rows.amin(1).double(), rows.amax(1).double(), rows.sum(1, dtype=torch.float64),
                      rows.square().sum(1, dtype=torch.float64))
        if self.count == 0:
            self.minimum, self.maximum, self.total, self.total_squares = reductions
        else:
            self.minimum = torch.minimum(self.minimum, reductions[0])
            self.maximum = torch.maximum(self.maximum, reductions[1])
            self.total = self.total + reductions[2]
            self.total_squares = self.total_squares + reductions[3]
        self.count += rows.shape[1]
        flat = rows.flatten()
        sample = flat[:: max(1, flat.numel() // HISTOGRAM_SAMPLE)]
        exponents = torch.floor(torch.log2(sample.abs().float().clamp_min(2.0**HISTOGRAM_LOW_EXPONENT)))
        bins = (exponents - HISTOGRAM_LOW_EXPONENT).clamp(0, HISTOGRAM_BINS - 1).long()
        self.histogram += torch.bincount(bins, minlength=HISTOGRAM_BINS)

    def tensor_stats(self) -> TensorStats:
        if self.count == 0:
            raise ValueError("nothing was observed")
        mean = self.total / self.count
        variance = (self.total_squares / self.count - mean.square()).clamp_min(0.0)
        squeeze = (lambda t: t[0]) if self.axis is None else (lambda t: t)
        return TensorStats(squeeze(self.minimum), squeeze(self.maximum), squeeze(mean), squeeze(variance.sqrt()))

    def histogram_edges(self) -> list[float]:
        """Bin edges of `histogram` (|x|, powers of two), for reports."""
        return [2.0 ** (HISTOGRAM_LOW_EXPONENT + k) for k in range(HISTOGRAM_BINS + 1)]


class EncodingObserver(ObserverBase):
    """Observes until it is given an encoding, then fake-quantizes with it (see the module doc)."""

    def __init__(
        self,
        dtype: torch.dtype = torch.int32,
        quant_min: int = 0,
        quant_max: int = 2**16 - 1,
        qscheme: torch.qscheme = torch.per_tensor_symmetric,
        ch_axis: int = 0,
        encoding: Encoding | None = None,
        is_dynamic: bool = False,
        **_unused,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.quant_min, self.quant_max, self.qscheme, self.ch_axis = quant_min, quant_max, qscheme, ch_axis
        self.stats = RunningStats(ch_axis if self.per_channel else None)
        self.encoding = encoding

    @property
    def per_channel(self) -> bool:
        return self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)

    def set_storage(self, bits: int, weight: bool, signed_activation: bool = False) -> None:
        self.dtype, self.quant_min, self.quant_max, self.qscheme = storage(bits, weight, signed_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoding is None:
            self.stats.update(x)
            return x
        return self.encoding.fake_quantize(x)

    def storage_zero_point(self) -> int:
        """The zero point in this observer's storage: the encoding's plus 2^(b-1) when unsigned."""
        if self.encoding is None:
            raise QuantNpuError("EncodingObserver has no encoding yet: run StaticCalibration (or attach encodings) first")
        shift = 0 if self.quant_min < 0 else 2 ** (self.encoding.bits - 1)
        return self.encoding.zero_point + shift

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoding is None:
            raise RuntimeError("EncodingObserver has no encoding yet: run StaticCalibration (or attach encodings) first")
        scale = torch.tensor(self.encoding.scale, dtype=torch.float32)
        zero_point = torch.full_like(scale, self.storage_zero_point(), dtype=torch.int32)
        if not self.per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return scale, zero_point

    def extra_repr(self) -> str:
        if self.encoding is not None:
            return f"encoding={self.encoding.describe()}"
        return f"observing count={self.stats.count} dtype={self.dtype} range=[{self.quant_min}, {self.quant_max}]"


def float32_exact(values: torch.Tensor) -> tuple[float, ...]:
    """Scales as Python floats that are exactly float32 numbers (QNN stores float32 scales)."""
    return tuple(float(v) for v in values.float().flatten().tolist())


def is_finite_stats(stats: TensorStats) -> bool:
    return all(math.isfinite(float(t.abs().max())) for t in (stats.minimum, stats.maximum))
