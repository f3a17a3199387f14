"""PT2E quantization with a given quantizer, and lowering to an ExecuTorch `.pte` for QNN HTP."""

from __future__ import annotations

import contextlib
import copy
import operator
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from quantnpu.errors import DelegationError
from quantnpu.fileio import atomic_path
from quantnpu.graph.ops import quantize_kind
from quantnpu.lowering import qnn_sdk
from quantnpu.lowering.sharding import DEFAULT_CONTEXT_LIMIT_BYTES, ShardPlan, edge_shards, plan_shards, shards_in_meta


@dataclass
class LoweringResult:
    """`delegates`: QNN delegates in the program (one context binary each); `context_bytes`: each
    one's context binary size, in program order; `shards`: the plan the graph was split by
    (`shards.describe()` lists its layers and weight bytes); `boundaries`: the tensors one shard's
    delegate hands to the next, `name dtype[shape]`, integers at their encoding."""

    pte_path: Path
    seconds: float
    delegates: int
    outside_delegates: list[str] = field(default_factory=list)
    size_bytes: int = 0
    context_bytes: list[int] = field(default_factory=list)
    shards: ShardPlan | None = None
    boundaries: list[str] = field(default_factory=list)


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


def _tag_shard_boundaries(edge_program) -> list[str]:
    """Mark every tensor one delegate computes for another as quantized I/O, so the producing
    context hands over its integers at their encoding and the consuming one reads them as they are
    (QNN's preprocess otherwise dequantizes a delegate's outputs and quantizes its inputs again).
    A tensor that also leaves for the CPU or the graph's output keeps the float hand-over the CPU
    needs. Returns `name dtype[shape]` of each tensor marked."""
    from executorch.backends.qualcomm.builders.utils import deduce_dtype
    from executorch.backends.qualcomm.utils.constants import QCOM_QUANT_ATTRS, QCOM_QUANTIZED_IO

    marked = []
    for node in edge_program.graph.nodes:
        tag = node.meta.get("delegation_tag")
        if node.op != "call_function" or tag is None:
            continue
        user_tags = {u.meta.get("delegation_tag") for u in node.users}
        if user_tags <= {tag} or None in user_tags or QCOM_QUANT_ATTRS not in node.meta:
            continue
        dtype = deduce_dtype(node.meta["val"], node.meta[QCOM_QUANT_ATTRS])
        node.meta[QCOM_QUANTIZED_IO] = dtype
        marked.append(f"{node.name} {str(dtype).removeprefix('torch.')}{list(node.meta['val'].shape)}")
    return marked


def _sharding_partitioner(compiler_specs, shards: int):
    """ExecuTorch's QNN partitioner with each of its partitions split by the shard recorded on its
    nodes (`edge_shards`): one delegate, so one QNN context, per shard."""
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.exir.backend.partitioner import PartitionResult
    from executorch.exir.backend.utils import tag_constant_data, tag_mutated_buffer
    from torch.fx.passes.infra.partitioner import Partition

    class ShardingQnnPartitioner(QnnPartitioner):
        boundaries: list[str] = []

        def partition(self, edge_program) -> PartitionResult:
            partitions = self.generate_partitions(edge_program)
            del self.op_support_checker
            shard = edge_shards(edge_program.graph, shards)
            split = []
            for partition in partitions:
                by_shard = defaultdict(list)
                for node in partition.nodes:
                    by_shard[shard.get(node, 0)].append(node)
                split += [Partition(id=len(split) + i, nodes=by_shard[s]) for i, s in enumerate(sorted(by_shard))]
            self.tag_nodes(split, edge_program)
            tag_constant_data(edge_program)
            if not self.skip_mutable_buffer:
                tag_mutated_buffer(edge_program)
            self.boundaries = _tag_shard_boundaries(edge_program)
            return PartitionResult(tagged_exported_program=edge_program, partition_tags=self.partition_tags)

    return ShardingQnnPartitioner(compiler_specs)


@contextlib.contextmanager
def _preprocess_shares_constants() -> Iterator[None]:
    """ExecuTorch deep-copies every partition's program, weights included, before the backend
    compiles it, in case the backend changes the graph (`BackendDetails.copy_exported_program_
    for_preprocess`). QNN's preprocess rewrites the graph and replaces state-dict entries but never
    writes into a weight, so the copy keeps the graph's own and shares the weights: one copy of the
    model's weights less while QNN compiles (ExecuTorch's CUDA backend does the same)."""
    from executorch.backends.qualcomm.qnn_preprocess import QnnBackend

    def copy_sharing_constants(cls, edge_program, compile_specs):
        memo = {id(t): t for values in (edge_program.state_dict, edge_program.constants)
                for t in values.values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    had_own = "copy_exported_program_for_preprocess" in QnnBackend.__dict__
    previous = QnnBackend.__dict__.get("copy_exported_program_for_preprocess")
    QnnBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_constants)
    try:
        yield
    finally:
        if had_own:
            QnnBackend.copy_exported_program_for_preprocess = previous
        else:
            del QnnBackend.copy_exported_program_for_preprocess


def _to_edge_and_lower(exported, compiler_specs, partitioner):
    """ExecuTorch's QNN lowering of one method (what `to_edge_transform_and_lower_to_qnn` does)
    with the partitioner given: QNN's export passes, edge dialect with QNN's transforms, partition
    and compile each partition into a context binary, one after another."""
    from executorch.backends.qualcomm._passes.qnn_pass_manager import get_qnn_pass_manager_cls
    from executorch.backends.qualcomm.utils.qnn_manager_lifecycle import QnnManagerContext
    from executorch.backends.qualcomm.utils.utils import qnn_edge_config
    from executorch.exir import to_edge_transform_and_lower

    pass_manager = get_qnn_pass_manager_cls()()  # HTP
    aten = pass_manager.transform_for_export_pipeline(exported)
    transform_passes = pass_manager.get_to_edge_transform_passes(aten, compiler_specs=compiler_specs)
    with QnnManagerContext({"forward": compiler_specs}), _preprocess_shares_constants():
        return to_edge_transform_and_lower({"forward": aten}, transform_passes={"forward": transform_passes},
                                           partitioner={"forward": [partitioner]}, compile_config=qnn_edge_config())


def lower_to_qnn(
    quantized: torch.fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    pte_path: str | Path,
    soc: str = "SM8650",
    allow_cpu_ops: bool = False,
    shards: int | None = None,
    context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES,
) -> LoweringResult:
    """Lower a converted (Q/DQ) graph with ExecuTorch's QNN partitioner for `soc` and write
    the `.pte` atomically. Compute left outside QNN delegates is a DelegationError (listing
    the nodes) unless `allow_cpu_ops`.

    The decoder is split into contiguous shards of layers, each its own QNN delegate and context,
    compiled one after another (so the compile's memory is bounded by a shard): `shards` of them,
    or by default the fewest whose contexts each hold at most `context_limit_bytes` of weights
    (`quantnpu.lowering.sharding`). Between shards the tensors pass as integers at their encoding."""
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
        update_spill_fill_size,
    )
    from executorch.exir import ExecutorchBackendConfig

    from quantnpu.lowering.soc import soc_model

    plan = plan_shards(quantized, shards, context_limit_bytes)
    qnn_sdk.activate()
    chip = soc_model(soc)
    start = time.perf_counter()
    sharded = plan.shards > 1
    specs = generate_qnn_executorch_compiler_spec(
        soc_model=chip,
        # several contexts in one program share one spill-fill buffer on the device
        backend_options=generate_htp_compiler_spec(use_fp16=False, use_multi_contexts=sharded),
    )
    partitioner = _sharding_partitioner(specs, plan.shards) if sharded else QnnPartitioner(specs)
    with shards_in_meta(quantized, plan):
        exported = torch.export.export(quantized, example_inputs, strict=True)
    edge = _to_edge_and_lower(exported, specs, partitioner)
    del exported
    program = edge.exported_program()
    left = non_delegated_ops(program)
    if left and not allow_cpu_ops:
        shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise DelegationError(f"{len(left)} op(s) left outside QNN delegates: {shown}")
    delegates = [n for n in program.graph_module.graph.nodes if "executorch_call_delegate" in str(n.target)]
    context_bytes = [len(getattr(program.graph_module, d.args[0].target).processed_bytes) for d in delegates]
    config = ExecutorchBackendConfig()
    if sharded:
        from executorch.backends.qualcomm._passes.build_quant_io import BuildQuantIo

        update_spill_fill_size(program)
        config = ExecutorchBackendConfig(passes=[BuildQuantIo()])  # the integer hand-overs' dtypes
    executorch_program = edge.to_executorch(config)
    del edge, program
    pte_path = Path(pte_path)
    with atomic_path(pte_path, suffix=".pte") as tmp:
        with open(tmp, "wb") as file:  # streamed: no second copy of the program in memory
            executorch_program.write_to_file(file)
        size = tmp.stat().st_size
    return LoweringResult(
        pte_path=pte_path, seconds=time.perf_counter() - start, delegates=len(delegates),
        outside_delegates=left, size_bytes=size, context_bytes=context_bytes, shards=plan,
        boundaries=getattr(partitioner, "boundaries", []),
    )
