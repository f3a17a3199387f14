"""One `.pte` with a `prefill` and a `decode` method: the two Q/DQ graphs of `convert_cached`, each
lowered to one QNN delegate, in one ExecuTorch program.

Method I/O (what a runtime passes; `CachedProgram` reads it back):
- `prefill(input_ids int64 [B, P]) -> (logits float32 [B, P, V], k_0 .. k_{L-1}, v_0 .. v_{L-1})`;
- `decode(input_ids int64 [B, T], input_pos int64 [T], attention_mask, k_cache_0 .., v_cache_0 ..)
  -> (logits float32 [B, T, V], k_new_0 .., v_new_0 ..)`.
The cache tensors (every K/V output and the cache inputs) are raw integers at the layer's cache
encoding (`uint8` for 8 bits, `uint16` for 16, QNN's unsigned storage with offset 2^(b-1)): the
delegate writes and reads them as they are, so nothing re-quantizes them at the boundary and the
runtime only copies integers into slots. The decode mask is an integer input at its encoding too
(`uint16`: 0 where a query attends, the masking value's code elsewhere). The token ids, positions
and logits cross as ExecuTorch gives them: ids and positions as integers (QNN reads them as int32),
logits dequantized by the delegate's boundary. This is ExecuTorch's `TagQuantIO` / `BuildQuantIo`
mechanism, which its Qualcomm Llama example uses for its KV cache.

Metadata, readable from the program without running a model (constant methods, what ExecuTorch's
own LLM runners read): `get_prefill_tokens` (P), `get_cache_slots` (C), `get_decode_tokens` (T),
`get_leading_tokens`, `get_vocab_size`, `get_layers`, and `get_quantnpu_metadata`, one JSON string
with all of it plus the EOS ids (when known), the logits', mask's and every layer's cache
encodings (scale, zero point in the signed convention, bits) and the masking value.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantnpu.errors import DelegationError
from quantnpu.fileio import atomic_path
from quantnpu.lowering import qnn_sdk

METHODS = ("prefill", "decode")
METADATA_METHOD = "get_quantnpu_metadata"


@dataclass
class CachedLoweringResult:
    """`delegates`: QNN delegates per method; `quantized_io`: per method, the inputs and outputs
    crossing as integers, `name dtype[shape]`; `metadata`: what the program's constant methods hold."""

    pte_path: Path
    seconds: float
    delegates: dict[str, int]
    outside_delegates: dict[str, list[str]]
    quantized_io: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    size_bytes: int = 0


def _encoding_json(encoding: "quantnpu.quantizers.encodings.Encoding | None") -> dict | None:
    if encoding is None:
        return None
    return {"bits": encoding.bits, "scale": encoding.scale[0], "zero_point": encoding.zero_point,
            "storage_offset": 2 ** (encoding.bits - 1)}


def cached_metadata(pair: "quantnpu.passes.decode_quant.QdqCachedPair", vocab_size: int, eos_ids: tuple[int, ...] = ()) -> dict:
    """What the program says about itself (the JSON of `get_quantnpu_metadata`)."""
    return {
        "format": "quantnpu-kv-1",
        "methods": list(METHODS),
        "prefill_tokens": pair.prefill.tokens,
        "cache_slots": pair.decode.cache_slots,
        "decode_tokens": pair.decode.tokens,
        "context": pair.prefill.context,
        "leading_tokens": pair.leading_tokens,
        "layers": pair.decode.layers,
        "vocab_size": vocab_size,
        "eos_ids": list(eos_ids),
        "k_shapes": [list(s) for s in pair.decode.k_shapes],
        "v_shapes": [list(s) for s in pair.decode.v_shapes],
        "mask_shape": list(pair.decode.mask_shape) if pair.decode.mask_shape else None,
        "mask_value": pair.decode.mask_value,
        "logits": _encoding_json(pair.logits_encoding),
        "mask": _encoding_json(pair.mask_encoding),
        "k_cache": [_encoding_json(e) for e in pair.k_encodings],
        "v_cache": [_encoding_json(e) for e in pair.v_encodings],
    }


def example_inputs(pair: "quantnpu.passes.decode_quant.QdqCachedPair") -> dict[str, tuple[torch.Tensor, ...]]:
    """Float example inputs of the two Q/DQ graphs (what torch.export traces them with)."""
    prefill, decode = pair.prefill, pair.decode
    batch = prefill.k_shapes[0][0]
    dtype = decode.float_dtype
    return {
        "prefill": (torch.zeros(batch, prefill.tokens, dtype=torch.int64),),
        "decode": (torch.zeros(batch, decode.tokens, dtype=torch.int64), torch.arange(decode.tokens),
                   torch.zeros(decode.mask_shape, dtype=dtype),
                   *(torch.zeros(s, dtype=dtype) for s in decode.k_shapes + decode.v_shapes)),
    }


def _quant_io_tagger(marked: list[str]):
    """TagQuantIO's predicate: the cache inputs and the mask input, and every graph output but the
    first (the logits), cross as integers at their encoding."""
    from executorch.backends.qualcomm.builders.utils import deduce_dtype
    from executorch.backends.qualcomm.utils.constants import QCOM_QUANT_ATTRS

    def dtype_of(node: torch.fx.Node):
        if QCOM_QUANT_ATTRS not in node.meta:
            return None
        if node.op == "placeholder":
            if not (node.name.startswith(("k_cache_", "v_cache_")) or node.name == "attention_mask"):
                return None
        else:
            outputs = [u for u in node.users if u.op == "output"]
            if not outputs or all(i == 0 for i, a in enumerate(outputs[0].args[0]) if a is node):
                return None
        dtype = deduce_dtype(node.meta["val"], node.meta[QCOM_QUANT_ATTRS])
        marked.append(f"{node.name} {str(dtype).removeprefix('torch.')}{list(node.meta['val'].shape)}")
        return dtype

    return dtype_of


def lower_cached_to_qnn(pair: "quantnpu.passes.decode_quant.QdqCachedPair", pte_path: str | Path, soc: str = "SM8650", vocab_size: int | None = None,
                        eos_ids: tuple[int, ...] = ()) -> CachedLoweringResult:
    """Lower both Q/DQ graphs of `pair` into one `.pte` (methods `prefill` and `decode`, one QNN
    delegate each, the cache and mask as integer I/O; see the module docstring), written
    atomically. Compute left outside the delegates is a DelegationError naming it."""
    from executorch.backends.qualcomm._passes import TagQuantIO
    from executorch.backends.qualcomm._passes.build_quant_io import BuildQuantIo
    from executorch.backends.qualcomm._passes.qnn_pass_manager import get_qnn_pass_manager_cls
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.utils.constants import QCOM_PASS_ACTIVATE_KEY, QCOM_PASS_ARGS_KWARGS_DEFAULTS_KEY
    from executorch.backends.qualcomm.utils.qnn_manager_lifecycle import QnnManagerContext
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec, generate_qnn_executorch_compiler_spec, qnn_edge_config,
    )
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from quantnpu.lowering.lower import _preprocess_shares_constants, non_delegated_ops
    from quantnpu.lowering.soc import soc_model

    qnn_sdk.activate()
    start = time.perf_counter()
    specs = generate_qnn_executorch_compiler_spec(soc_model=soc_model(soc),
                                                  backend_options=generate_htp_compiler_spec(use_fp16=False))
    inputs = example_inputs(pair)
    if vocab_size is None:  # the logits' last dimension (one prefill on zeros: converted graphs keep no shapes)
        with torch.no_grad():
            vocab_size = int(pair.prefill.module(*inputs["prefill"])[0].shape[-1])
    metadata = cached_metadata(pair, vocab_size, eos_ids)
    marked: dict[str, list[str]] = {m: [] for m in METHODS}
    programs, transforms, partitioners = {}, {}, {}
    pass_manager = get_qnn_pass_manager_cls()()
    for method, cached in (("prefill", pair.prefill), ("decode", pair.decode)):
        exported = torch.export.export(cached.module, inputs[method], strict=True)
        programs[method] = pass_manager.transform_for_export_pipeline(exported)
        jobs = pass_manager.get_capture_program_passes()
        jobs[TagQuantIO][QCOM_PASS_ACTIVATE_KEY] = True
        jobs[TagQuantIO][QCOM_PASS_ARGS_KWARGS_DEFAULTS_KEY]["get_quant_io_dtype_fn"] = _quant_io_tagger(marked[method])
        transforms[method] = pass_manager.get_to_edge_transform_passes(
            programs[method], passes_job=jobs, dep_table=pass_manager.get_passes_dependency_for_capture_program(),
            compiler_specs=specs)
        partitioners[method] = [QnnPartitioner(specs)]
    constants = {
        "get_prefill_tokens": metadata["prefill_tokens"], "get_cache_slots": metadata["cache_slots"],
        "get_decode_tokens": metadata["decode_tokens"], "get_leading_tokens": metadata["leading_tokens"],
        "get_vocab_size": vocab_size, "get_layers": metadata["layers"], METADATA_METHOD: json.dumps(metadata),
    }
    with QnnManagerContext({m: specs for m in METHODS}), _preprocess_shares_constants():
        edge = to_edge_transform_and_lower(programs, transform_passes=transforms, partitioner=partitioners,
                                           constant_methods=constants, compile_config=qnn_edge_config())
    del programs
    delegates, left = {}, {}
    for method in METHODS:
        program = edge.exported_program(method)
        left[method] = non_delegated_ops(program)
        delegates[method] = sum("executorch_call_delegate" in str(n.target) for n in program.graph_module.graph.nodes)
    if any(left.values()):
        shown = "; ".join(f"{m}: {', '.join(ops[:6])}" for m, ops in left.items() if ops)
        raise DelegationError(f"op(s) left outside QNN delegates: {shown}")
    executorch_program = edge.to_executorch(ExecutorchBackendConfig(passes=[BuildQuantIo()]))
    del edge
    pte_path = Path(pte_path)
    with atomic_path(pte_path, suffix=".pte") as tmp:
        with open(tmp, "wb") as file:
            executorch_program.write_to_file(file)
        size = tmp.stat().st_size
    return CachedLoweringResult(pte_path=pte_path, seconds=time.perf_counter() - start, delegates=delegates,
                                outside_delegates=left, quantized_io=marked, metadata=metadata, size_bytes=size)
