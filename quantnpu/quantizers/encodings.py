"""Fixed quantization encodings and their JSON file (modelled on AIMET's encodings format).

An `Encoding` is what the NPU needs for one tensor: bits, one scale per channel (one for a
per-tensor encoding), the zero point, whether the grid is symmetric, the channel axis, and
whether the signed range is restricted to +-(2^(b-1) - 1) (weights) or full (activations).

File format (`write_encodings` / `read_encodings`), as AIMET's:
    {"version": "0.6.1",
     "activation_encodings": {tensor: [entry]},
     "param_encodings": {tensor: [entry per channel]},
     "quantization_axes": {tensor: axis},        (quantnpu's addition, per-channel params only)
     "requantized_inputs": {reader: {tensor: [entry]}}}   (quantnpu's addition: edges that re-quantize)
    entry = {"bitwidth", "dtype": "int", "is_symmetric": "True"/"False", "scale", "offset", "min", "max"}
`offset` follows AIMET/QNN: the integer added to the unsigned code, i.e. `-2^(b-1)` for a symmetric
grid (x = (q_unsigned + offset) * scale), and `min`/`max` are the real values of the grid's ends.
Python floats are written with their shortest round-trip repr, so a round trip is exact. A
re-quantizing edge (a linear reading a 16-bit tensor at 8 bits, an op widening its input) has its
own encoding, kept under its reader's node name, so a file alone reproduces the quantized graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

from quantnpu.errors import InputFileError
from quantnpu.fileio import atomic_write_text, read_json_file

FORMAT_VERSION = "0.6.1"


@dataclass(frozen=True)
class Encoding:
    bits: int
    scale: tuple[float, ...]
    zero_point: int = 0
    symmetric: bool = True
    axis: int | None = None
    restricted: bool = False
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.bits < 2 or self.bits > 32:
            raise ValueError(f"bits must be in [2, 32], got {self.bits}")
        if not self.scale or any(not (s > 0) for s in self.scale):
            raise ValueError(f"scales must be positive, got {self.scale[:4]}")
        if len(self.scale) > 1 and self.axis is None:
            raise ValueError("a per-channel encoding needs its channel axis")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.restricted else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def scale_tensor(self, like: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=torch.float64)
        if self.per_channel:
            shape = [1] * like.dim()
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        return scale.to(like.dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`(clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s` with this encoding's fixed numbers.

        On float32 this runs torch's `quantized_decomposed` quantize/dequantize ops, the very ones
        `convert_pt2e` writes into the Q/DQ graph, so the fake-quant graph and the Q/DQ graph compute
        the same numbers. (`round(x / s)` differs from `round(x * (1/s))` where x/s is within an ulp
        of a midpoint; on SmolLM2 those few flips moved single logits by up to 19.)"""
        ops = torch.ops.quantized_decomposed
        if x.dtype == torch.float32:
            if self.per_channel:
                scales = torch.tensor(self.scale, dtype=torch.float32)
                zero_points = torch.full(scales.shape, self.zero_point, dtype=torch.int32)
                q = ops.quantize_per_channel(x, scales, zero_points, self.axis, self.qmin, self.qmax, torch.int32)
                return ops.dequantize_per_channel(q, scales, zero_points, self.axis, self.qmin, self.qmax, torch.int32,
                                                  out_dtype=torch.float32)
            q = ops.quantize_per_tensor(x, self.scale[0], self.zero_point, self.qmin, self.qmax, torch.int32)
            return ops.dequantize_per_tensor(q, self.scale[0], self.zero_point, self.qmin, self.qmax, torch.int32)
        scale = self.scale_tensor(x)  # float64 reference computations: the same formula
        q = torch.clamp(torch.round(x * (1.0 / scale)) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * scale

    def describe(self) -> str:
        kind = f"per-channel(axis {self.axis})" if self.per_channel else "per-tensor"
        return f"int{self.bits} {kind} {'sym' if self.symmetric else 'asym'}" + (" restricted" if self.restricted else "")


def _entries(encoding: Encoding) -> list[dict]:
    unsigned_offset = -(2 ** (encoding.bits - 1)) - encoding.zero_point
    return [{
        "bitwidth": encoding.bits, "dtype": "int", "is_symmetric": str(encoding.symmetric),
        "scale": float(s), "offset": int(unsigned_offset),
        "min": float((encoding.qmin - encoding.zero_point) * s), "max": float((encoding.qmax - encoding.zero_point) * s),
    } for s in encoding.scale]


def _from_entries(name: str, entries: list[dict], axis: int | None, path: Path) -> Encoding:
    try:
        bits = int(entries[0]["bitwidth"])
        scales = tuple(float(e["scale"]) for e in entries)
        zero_point = -(2 ** (bits - 1)) - int(entries[0]["offset"])
        symmetric = str(entries[0]["is_symmetric"]) == "True"
        restricted = round(float(entries[0]["min"]) / scales[0]) + zero_point == -(2 ** (bits - 1)) + 1
        return Encoding(bits=bits, scale=scales, zero_point=zero_point, symmetric=symmetric,
                        axis=axis if len(entries) > 1 or axis is not None else None, restricted=restricted)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputFileError(f"{path}: bad encoding for tensor {name!r}: {error}") from None


@dataclass(frozen=True)
class EncodingTable:
    """Every encoding of a quantized graph: activations by node name, parameters by parameter
    name, and re-quantizing edges by reader node name and input node name."""

    activations: dict[str, Encoding]
    params: dict[str, Encoding]
    edges: dict[str, dict[str, Encoding]] = field(default_factory=dict)


def write_encodings(path: str | Path, table: EncodingTable) -> Path:
    document = {
        "version": FORMAT_VERSION,
        "activation_encodings": {name: _entries(e) for name, e in table.activations.items()},
        "param_encodings": {name: _entries(e) for name, e in table.params.items()},
        "quantization_axes": {name: e.axis for name, e in {**table.activations, **table.params}.items() if e.per_channel},
        "requantized_inputs": {reader: {name: _entries(e) for name, e in inputs.items()} for reader, inputs in table.edges.items()},
    }
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    return Path(path)


def read_encodings(path: str | Path) -> EncodingTable:
    path = Path(path)
    document = read_json_file(path, "an encodings JSON file")
    if not isinstance(document, dict) or "activation_encodings" not in document or "param_encodings" not in document:
        raise InputFileError(f"{path}: not an encodings file (needs activation_encodings and param_encodings)")
    axes = document.get("quantization_axes", {})
    activations = {n: _from_entries(n, e, axes.get(n), path) for n, e in document["activation_encodings"].items()}
    params = {n: _from_entries(n, e, axes.get(n), path) for n, e in document["param_encodings"].items()}
    edges = {reader: {n: _from_entries(f"{reader} input {n}", e, None, path) for n, e in inputs.items()}
             for reader, inputs in document.get("requantized_inputs", {}).items()}
    return EncodingTable(activations, params, edges)
