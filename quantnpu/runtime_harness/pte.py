"""Run a `.pte` with ExecuTorch's Python runtime (QNN programs run on the x86 HTP simulator)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantnpu.errors import InputFileError
from quantnpu.lowering import qnn_sdk


class PteModel:
    """A loaded `.pte` method callable like a module: `PteModel(path)(input_ids) -> logits`."""

    def __init__(self, path: str | Path, method: str = "forward") -> None:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        qnn_sdk.activate()
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        self.program = runtime.load_program(str(path))
        self.method = self.program.load_method(method)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute(list(inputs))[0]

    def outputs(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the method."""
        return list(self.method.execute(list(inputs)))


def to_codes(x: torch.Tensor, encoding: dict, dtype: torch.dtype) -> torch.Tensor:
    """Float values -> the unsigned integer codes a quantized program input holds (`encoding` as in
    the program's metadata JSON: scale, signed zero point, bits, storage offset 2^(b-1))."""
    q = torch.round(x.double() / encoding["scale"]) + encoding["zero_point"] + encoding["storage_offset"]
    return q.clamp(0, 2 ** encoding["bits"] - 1).to(torch.int32).to(dtype)


def from_codes(q: torch.Tensor, encoding: dict) -> torch.Tensor:
    """Unsigned codes -> float values (float32)."""
    return ((q.to(torch.int64) - encoding["storage_offset"] - encoding["zero_point"]) * encoding["scale"]).float()


class CachedPte:
    """A `.pte` with `prefill` and `decode` methods (quantnpu.lowering.cached) driven as a runtime
    does: the cache as integer tensors at their encodings, the new K/V written into slot = position,
    the mask in its integer codes. `prefill(ids [B, t])` then `step(ids [B, T])`, as `KvCacheRunner`."""

    def __init__(self, path: str | Path) -> None:
        import json

        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        qnn_sdk.activate()
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(str(path))
        missing = {"prefill", "decode", "get_quantnpu_metadata"} - set(self.program.method_names)
        if missing:
            raise InputFileError(f"{path}: not a prefill + decode program (no method {', '.join(sorted(missing))})")
        self.meta = json.loads(self.program.load_method("get_quantnpu_metadata").execute([])[0])
        self.prefill_method = self.program.load_method("prefill")
        self.decode_method = self.program.load_method("decode")
        self.dtypes = {bits: torch.uint8 if bits <= 8 else torch.uint16 for bits in (8, 16)}
        self.k = [self._zeros(s, e) for s, e in zip(self.meta["k_shapes"], self.meta["k_cache"])]
        self.v = [self._zeros(s, e) for s, e in zip(self.meta["v_shapes"], self.meta["v_cache"])]
        self.length = 0
        self.prefill_tokens, self.cache_slots = self.meta["prefill_tokens"], self.meta["cache_slots"]
        self.decode_tokens, self.leading_tokens = self.meta["decode_tokens"], self.meta["leading_tokens"]

    def _zeros(self, shape, encoding) -> torch.Tensor:
        return to_codes(torch.zeros(shape), encoding, self.dtypes[encoding["bits"]])

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        tokens, meta = ids.shape[1], self.meta
        if not meta["leading_tokens"] <= tokens <= meta["prefill_tokens"] or tokens > meta["cache_slots"]:
            raise ValueError(f"prompt of {tokens} tokens; the prefill takes {max(1, meta['leading_tokens'])}.."
                             f"{min(meta['prefill_tokens'], meta['cache_slots'])}")
        padded = torch.zeros(ids.shape[0], meta["prefill_tokens"], dtype=torch.int64)
        padded[:, :tokens] = ids
        outputs = list(self.prefill_method.execute([padded]))
        layers = meta["layers"]
        for cache, new, encoding in zip(self.k + self.v, outputs[1:1 + 2 * layers], meta["k_cache"] + meta["v_cache"]):
            cache.copy_(self._zeros(cache.shape, encoding))
            cache[:, :, :tokens] = new[:, :, :tokens]
        self.length = tokens
        return outputs[0][:, :tokens]

    def mask(self) -> torch.Tensor:
        meta = self.meta
        slots, tokens = meta["cache_slots"], meta["decode_tokens"]
        allowed = torch.zeros(tokens, slots + tokens, dtype=torch.bool)
        allowed[:, :min(self.length, slots)] = True
        allowed[:, slots:] = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        values = torch.full(allowed.shape, meta["mask_value"], dtype=torch.float64).masked_fill(allowed, 0.0)
        values = values.reshape([1] * (len(meta["mask_shape"]) - 2) + list(allowed.shape)).expand(meta["mask_shape"])
        return to_codes(values, meta["mask"], self.dtypes[meta["mask"]["bits"]]).contiguous()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        if self.length > meta["cache_slots"]:
            raise ValueError(f"cache full: the {meta['cache_slots']} slots are written")
        positions = torch.arange(self.length, self.length + meta["decode_tokens"])
        outputs = list(self.decode_method.execute([ids, positions, self.mask(), *self.k, *self.v]))
        self.last_outputs = outputs
        kept = positions < meta["cache_slots"]
        for cache, new in zip(self.k + self.v, outputs[1:1 + 2 * meta["layers"]]):
            cache[:, :, positions[kept]] = new[:, :, kept]
        self.length += meta["decode_tokens"]
        return outputs[0]
