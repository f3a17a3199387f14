"""QuantNpuQuantizer: a torchao PT2E `Quantizer` that hands QNN exactly quantnpu's encodings.

Which tensors of which ops get quantized, and which ops share their input's encoding (views,
permutes, ...), is ExecuTorch's knowledge of the QNN HTP backend: its `QnnQuantizer` annotation
rules. This quantizer runs those rules and then replaces every quantization spec with a fixed one
built from the encoding recorded on the tensor's node (its `TensorQuant`, `node.meta["quantnpu_quant"]`):
- a tensor has one encoding, used for its output and for every edge that reads it, except edges
  that re-quantize it (`input_encodings` on the reading node: a linear's input, a widened input);
- linear weights are per output channel (signed, restricted range), activations per tensor
  (unsigned storage with offset 2^(b-1), QNN's form of a symmetric grid);
- QNN requires a 16-bit MatMul's second input to be signed symmetric, so such an edge carries the
  same scale in int16 storage;
- biases keep ExecuTorch's derived int32 spec (input scale x weight scale).
No observer computes anything: `EncodingObserver` returns the recorded numbers, so after
`prepare_pt2e` + `convert_pt2e` every scale and zero point equals its encoding.

In `observe=True` mode the same annotation gets statistics-gathering observers instead; that is how
`InsertStaticObservers` places exactly the observers this quantizer will later make fixed.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torchao.quantization.pt2e.quantizer import (
    DerivedQuantizationSpec,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from quantnpu.errors import GraphStructureError
from quantnpu.graph.ops import LINEAR, MATMUL
from quantnpu.graph.patterns import recompose_rms_norms
from quantnpu.graph.meta import tensor_quant
from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.observers import EncodingObserver, storage

aten = torch.ops.aten
MATMULS = MATMUL | {aten.mm.default}
# Placeholder storage while observing: every activation alike, so torchao groups all edges of a
# tensor (and shared views) under one observer; the bit plan sets the real storage afterwards.
_OBSERVE_ACTIVATION = (torch.int32, 0, 2**16 - 1, torch.per_tensor_symmetric)


def _qnn_quantizer_base(soc: str):
    from quantnpu.lowering import qnn_sdk

    qnn_sdk.activate()  # before ExecuTorch's QNN code: without QNN_SDK_ROOT it tries a download
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype

    from quantnpu.lowering.soc import soc_model

    return QnnQuantizer, QuantDtype, soc_model(soc)


def qnn_annotation_transforms(gm: torch.fx.GraphModule, soc: str = "SM8650") -> torch.fx.GraphModule:
    """ExecuTorch's QNN transforms that run before annotation (decompositions, recompositions),
    with quantnpu's RMSNorm recomposition in place of ExecuTorch's `RecomposeRmsNorm`: on a norm
    whose weight was folded away, ExecuTorch's takes the next multiply's constant operand (e.g. a
    RoPE table) for the weight and writes a different function (found by the verifier). Every
    RMSNorm, with or without a weight, becomes one `rms_norm` op (`recompose_rms_norms`); any
    other `pow(x, 2)` becomes `x * x`: QNN would take the exponent as a float constant input, the
    one tensor of the graph that is not quantized (IntegerOnlyCheck flags it)."""
    base, dtypes, chip = _qnn_quantizer_base(soc)
    from executorch.backends.qualcomm._passes import RecomposeRmsNorm
    from executorch.backends.qualcomm._passes.qnn_pass_manager import get_qnn_pass_manager_cls

    manager_cls = get_qnn_pass_manager_cls(base(soc_model=chip).backend)

    class _WithoutRmsNormRecomposition(manager_cls):
        @classmethod
        def get_annotation_passes(cls):
            return [p for p in super().get_annotation_passes() if p is not RecomposeRmsNorm]

    recompose_rms_norms(gm)
    gm = _WithoutRmsNormRecomposition().transform_for_annotation_pipeline(gm)
    squares_to_products(gm)
    return gm


def _is_square(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.target not in (aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar) or len(node.args) != 2:
        return False
    exponent = node.args[1]
    if isinstance(exponent, torch.fx.Node) and exponent.op == "get_attr":
        value = gm.get_buffer(exponent.target) if exponent.target in dict(gm.named_buffers()) else getattr(gm, exponent.target)
        return isinstance(value, torch.Tensor) and value.numel() == 1 and float(value) == 2.0
    return exponent == 2 or exponent == 2.0


def squares_to_products(gm: torch.fx.GraphModule) -> int:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if _is_square(gm, node):
            with gm.graph.inserting_before(node):
                product = gm.graph.call_function(aten.mul.Tensor, (node.args[0], node.args[0]))
            product.meta = dict(node.meta)
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
            rewritten += 1
    return rewritten



def is_weight_edge(tensor: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    return consumer.target == LINEAR and len(consumer.args) > 1 and consumer.args[1] is tensor


def is_matmul_second_input(tensor: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    return consumer.target in MATMULS and len(consumer.args) > 1 and consumer.args[1] is tensor


class QuantNpuQuantizer(Quantizer):
    """See the module docstring. `observe=True`: statistics observers instead of fixed encodings
    (how InsertStaticObservers places exactly the observers this quantizer later makes fixed).

    ExecuTorch's `QnnQuantizer` (with its 16a8w per-channel rules, which give the annotation its
    shape) is held, not inherited, and made on first use: building it loads QNN's libraries."""

    def __init__(self, soc: str = "SM8650", observe: bool = False) -> None:
        super().__init__()
        self.soc = soc
        self.observe = observe
        self._rules = None
        self._specs: dict = {}

    def _qnn_rules(self):
        if self._rules is None:
            base, dtypes, chip = _qnn_quantizer_base(self.soc)
            self._rules = base(soc_model=chip)
            self._rules.set_default_quant_config(dtypes.use_16a8w, is_linear_per_channel=True, is_conv_per_channel=True)
        return self._rules

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return model  # PrepareForQnn ran ExecuTorch's transforms already; the encodings name that graph

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        self._qnn_rules().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None:
                continue
            for tensor, spec in list(annotation.input_qspec_map.items()):
                if not isinstance(spec, (SharedQuantizationSpec, DerivedQuantizationSpec)):
                    annotation.input_qspec_map[tensor] = self._spec(tensor, node)
            spec = annotation.output_qspec
            if spec is not None and not isinstance(spec, (SharedQuantizationSpec, DerivedQuantizationSpec)):
                annotation.output_qspec = self._spec(node, None)
        return model

    def _spec(self, tensor: torch.fx.Node, consumer: torch.fx.Node | None) -> QuantizationSpec:
        weight = consumer is not None and is_weight_edge(tensor, consumer)
        if self.observe:
            key = ("observe", weight)
            layout = storage(8, weight=True) if weight else _OBSERVE_ACTIVATION
            encoding = None
        else:
            reader = tensor_quant(consumer) if consumer is not None else None
            encoding = reader.input_encoding(tensor.name) if reader is not None else None
            if encoding is None:
                record = tensor_quant(tensor)
                encoding = record.encoding if record is not None else None
            if not isinstance(encoding, Encoding):
                raise GraphStructureError(
                    "quantized tensor has no encoding: run InsertStaticObservers, PlanBitWidths and StaticCalibration "
                    "(or attach_encodings) first", tensor.name)
            signed = (consumer is not None and encoding.bits == 16 and is_matmul_second_input(tensor, consumer))
            key = (encoding, weight, signed)
            layout = storage(encoding.bits, weight=weight, signed_activation=signed)
        if key not in self._specs:
            dtype, quant_min, quant_max, qscheme = layout
            self._specs[key] = QuantizationSpec(
                dtype=dtype, quant_min=quant_min, quant_max=quant_max, qscheme=qscheme,
                ch_axis=0 if weight else None,
                observer_or_fake_quant_ctr=EncodingObserver.with_args(
                    dtype=dtype, quant_min=quant_min, quant_max=quant_max, qscheme=qscheme,
                    ch_axis=0, encoding=encoding),
            )
        return self._specs[key]


def strip_observers(gm: torch.fx.GraphModule, in_place: bool = False) -> torch.fx.GraphModule:
    """`gm` without observer nodes or PT2E annotations: the float graph, with every tensor's encoding
    still on its node. (Derived bias observers go too.) A copy, unless `in_place` (a pass that owns
    the graph: no second copy of the weights)."""
    from torchao.quantization.pt2e.observer import ObserverBase

    if not in_place:
        gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ObserverBase):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    for node in gm.graph.nodes:
        node.meta.pop("quantization_annotation", None)
    gm.graph.lint()
    gm.recompile()
    return gm


def quantize_with_encodings(gm: torch.fx.GraphModule, soc: str = "SM8650", in_place: bool = False) -> torch.fx.GraphModule:
    """The converted (Q/DQ) graph carrying exactly the encodings recorded in `gm`'s node meta.
    `gm` may still hold calibrated observers (they are stripped first: from a copy, unless
    `in_place`, which consumes `gm`)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    float_graph = strip_observers(gm, in_place)
    prepared = prepare_pt2e(float_graph, QuantNpuQuantizer(soc))
    return convert_pt2e(prepared)
