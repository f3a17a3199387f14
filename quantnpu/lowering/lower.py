"""PT2E quantization with a given quantizer, and lowering to an ExecuTorch `.pte` for QNN HTP."""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from quantnpu.errors import DelegationError
from quantnpu.fileio import atomic_path
from quantnpu.lowering import qnn_sdk
from quantnpu.graph.ops import quantize_kind



@dataclass
class LoweringResult:
    pte_path: Path
    seconds: float
    delegates: int
    outside_delegates: list[str] = field(default_factory=list)
    size_bytes: int = 0


def non_delegated_ops(program) -> list[str]:
    """`name (op)` of every compute node left outside QNN delegates in a lowered program."""
    left = []
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target_name = str(node.target)
        if node.target is operator.getitem or "executorch_call_delegate" in target_name:
            continue
        # the quantize of a graph input and the dequantize of a graph output may stay on the CPU
        if quantize_kind(node) is not None and _is_io_boundary(node):
            continue
        left.append(f"{node.name} ({target_name})")
    return left


def _is_io_boundary(node: torch.fx.Node) -> bool:
    feeds_output = any(u.op == "output" for u in node.users)
    reads_input = any(i.op == "placeholder" for i in node.all_input_nodes)
    return feeds_output or reads_input


def lower_to_qnn(
    quantized: torch.fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    pte_path: str | Path,
    soc: str = "SM8650",
    allow_cpu_ops: bool = False,
) -> LoweringResult:
    """Lower a converted (Q/DQ) graph with ExecuTorch's QNN partitioner for `soc` and write
    the `.pte` atomically. Compute left outside QNN delegates is a DelegationError (listing
    the nodes) unless `allow_cpu_ops`."""
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
        to_edge_transform_and_lower_to_qnn,
    )

    from quantnpu.lowering.soc import soc_model

    qnn_sdk.activate()
    chip = soc_model(soc)
    start = time.perf_counter()
    specs = generate_qnn_executorch_compiler_spec(
        soc_model=chip, backend_options=generate_htp_compiler_spec(use_fp16=False)
    )
    edge = to_edge_transform_and_lower_to_qnn(quantized, example_inputs, specs)
    program = edge.exported_program()
    left = non_delegated_ops(program)
    if left and not allow_cpu_ops:
        shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise DelegationError(f"{len(left)} op(s) left outside QNN delegates: {shown}")
    delegates = sum(1 for n in program.graph_module.graph.nodes if "executorch_call_delegate" in str(n.target))
    buffer = edge.to_executorch().buffer
    pte_path = Path(pte_path)
    with atomic_path(pte_path, suffix=".pte") as tmp:
        tmp.write_bytes(buffer)
    return LoweringResult(
        pte_path=pte_path, seconds=time.perf_counter() - start, delegates=delegates,
        outside_delegates=left, size_bytes=len(buffer),
    )
