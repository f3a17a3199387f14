"""PrepareForQnn's own rewrites: attention masks get a finite masking value the 16-bit
score tensor can afford, and the float model computes the same function afterwards."""

import copy
import warnings

import pytest
import torch

from quantnpu.diagnostics import QuantNpuWarning
from quantnpu.errors import PassFailedError
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes import InsertStaticObservers, PlanBitWidths, PrepareForQnn, StaticCalibration
from quantnpu.pipeline import float_passes
from quantnpu.passes.static_calibration import encodings_by_tensor
from quantnpu.graph.meta import node_info
from quantnpu.graph.ops import SOFTMAX
from quantnpu.passes.prepare_for_qnn import ATTENTION_MASK_VALUE, bound_attention_masks
from quantnpu.quantizers.bit_plan import BitPlan
from tests.graph_testing import annotated_graph, assert_pass_diff, run_passes, tiny_graph


class ScalarMaskAttention(torch.nn.Module):
    """A causal mask built from a Python float -inf (a call_function argument)."""

    def forward(self, q, k):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.zeros(n, n).masked_fill(~causal, float("-inf"))
        return torch.softmax(q @ k.transpose(-1, -2) + mask, dim=-1)


class TensorMaskAttention(torch.nn.Module):
    """A causal mask built from a tensor constant holding float32.min (a get_attr)."""

    def forward(self, q, k):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.where(causal, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
        return torch.softmax(q @ k.transpose(-1, -2) + mask, dim=-1)


class BoundMasks(GraphPass):
    """bound_attention_masks alone, so the diff shows nothing else of PrepareForQnn."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(gm, bool(bound_attention_masks(gm)))


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, generator=generator), torch.randn(1, 4, 8, generator=generator)


def test_scalar_mask_value_is_bounded():
    gm = torch.export.export(ScalarMaskAttention(), _inputs()).module()
    expected = gm(*_inputs())

    after = assert_pass_diff(gm, [BoundMasks()], """
        -%masked_fill: f32[4,4] = aten.masked_fill.Scalar(%zeros, %bitwise_not, -inf)
        +%masked_fill: f32[4,4] = aten.masked_fill.Scalar(%zeros, %bitwise_not, -255.0)
    """)
    # masked probabilities were exactly 0 and stay 0 in float32: exp(-255) underflows
    torch.testing.assert_close(after(*_inputs()), expected, rtol=0, atol=0)


def test_tensor_mask_constant_is_replaced_not_written_in_place():
    gm = torch.export.export(TensorMaskAttention(), _inputs()).module()
    expected = gm(*_inputs())
    original = {name: value.clone() for name, value in gm.named_buffers()}
    constants = {node.target: getattr(gm, node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    changed = bound_attention_masks(gm)
    assert len(changed) == 1
    assert float(getattr(gm, changed[0])) == ATTENTION_MASK_VALUE
    assert float(constants[changed[0]]) == torch.finfo(torch.float32).min  # the old tensor is untouched
    assert all(torch.equal(value, original[name]) for name, value in gm.named_buffers() if name in original)
    torch.testing.assert_close(gm(*_inputs()), expected, rtol=0, atol=0)


def test_mask_that_is_a_graph_input_is_left_alone():
    class InputMask(torch.nn.Module):
        def forward(self, scores, mask):
            return torch.softmax(scores + mask, dim=-1)

    mask = torch.full((4, 4), float("-inf")).triu(1)
    gm = torch.export.export(InputMask(), (torch.randn(4, 4), mask)).module()
    assert bound_attention_masks(gm) == []


def _score_adds(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node.args[0] for node in gm.graph.nodes if node.target in SOFTMAX]


def test_tiny_llama_float_function_unchanged_and_scores_keep_a_fine_grid():
    gm = run_passes(tiny_graph("llama", seq_len=8), float_passes("hadamard"))
    tokens = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = gm(tokens)
    prepared = run_passes(copy.deepcopy(gm), [PrepareForQnn()])
    torch.testing.assert_close(prepared(tokens), expected, rtol=1e-5, atol=1e-5)

    adds = [add.name for add in _score_adds(prepared)]
    fake_quant = run_passes(prepared, [InsertStaticObservers(), PlanBitWidths(BitPlan.parse("8-8-8")),
                                        StaticCalibration([tokens], progress=False)])
    assert len(adds) == 2, "one softmax per layer expected in the tiny model"
    activations = encodings_by_tensor(fake_quant).activations
    for add in adds:
        # Max-Min over scores + mask: (255 + the largest |score|) / 32767, where ExecuTorch's
        # own -65535 would give 2.0. Tiny-model scores are small next to 255.
        (scale,) = activations[add].scale
        assert activations[add].bits == 16
        assert -ATTENTION_MASK_VALUE / 32767 <= scale < 1.1 * -ATTENTION_MASK_VALUE / 32767, add


class _GatedAttention(torch.nn.Module):
    """Causal attention, a SiLU-gated product and a square: what PrepareForQnn rewrites."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), 1))

    def forward(self, q, k, v, gate, up):
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return attention, torch.nn.functional.silu(gate) * up, gate.pow(2)


def test_prepare_for_qnn_main_rewrite():
    """SDPA becomes bmm / softmax with the scale split over q and k, SiLU becomes x * sigmoid(x),
    pow(x, 2) becomes x * x, and the -inf mask is bounded (the buffer's value, not a graph line)."""
    args = tuple(torch.randn(shape) for shape in [(1, 2, 4, 8)] * 3 + [(1, 4, 16)] * 2)
    gm = torch.export.export(_GatedAttention(), args).module()
    after = assert_pass_diff(gm, [PrepareForQnn()], """
        +%sigmoid_default: f32[1,4,16] = aten.sigmoid(%gate)
        +%mul_tensor: f32[1,4,16] = aten.mul.Tensor(%gate, %sigmoid_default)
        -%scaled_dot_product_attention: f32[1,2,4,8] = aten.scaled_dot_product_attention(%q, %k, %v, %mask)
        -%silu: f32[1,4,16] = aten.silu(%gate)
        -%mul: f32[1,4,16] = aten.mul.Tensor(%silu, %up)
        -%pow_1: f32[1,4,16] = aten.pow.Tensor_Scalar(%gate, 2)
        -return (%scaled_dot_product_attention, %mul, %pow_1)
        +%_tensor_constant_0: f32[] = get_attr _tensor_constant_0
        +%mul_1: f32[1,2,4,8] = aten.mul.Tensor(%q, %_tensor_constant_0)
        +%transpose: f32[1,2,8,4] = aten.transpose.int(%k, -2, -1)
        +%_tensor_constant_1: f32[] = get_attr _tensor_constant_1
        +%mul_2: f32[1,2,8,4] = aten.mul.Tensor(%transpose, %_tensor_constant_1)
        +%expand: f32[1,2,4,8] = aten.expand(%mul_1, [1, 2, 4, 8])
        +%view: f32[2,4,8] = aten.view(%expand, [2, 4, 8])
        +%expand_1: f32[1,2,8,4] = aten.expand(%mul_2, [1, 2, 8, 4])
        +%view_1: f32[2,8,4] = aten.view(%expand_1, [2, 8, 4])
        +%bmm: f32[2,4,4] = aten.bmm(%view, %view_1)
        +%view_2: f32[1,2,4,4] = aten.view(%bmm, [1, 2, 4, 4])
        +%add: f32[1,2,4,4] = aten.add.Tensor(%view_2, %mask)
        +%_safe_softmax: f32[1,2,4,4] = aten._safe_softmax(%add, -1)
        +%expand_2: f32[1,2,4,4] = aten.expand(%_safe_softmax, [1, 2, 4, 4])
        +%view_3: f32[2,4,4] = aten.view(%expand_2, [2, 4, 4])
        +%expand_3: f32[1,2,4,8] = aten.expand(%v, [1, 2, 4, 8])
        +%view_4: f32[2,4,8] = aten.view(%expand_3, [2, 4, 8])
        +%bmm_1: f32[2,4,8] = aten.bmm(%view_3, %view_4)
        +%view_5: f32[1,2,4,8] = aten.view(%bmm_1, [1, 2, 4, 8])
        +%permute: f32[4,1,2,8] = aten.permute(%view_5, [2, 0, 1, 3])
        +%permute_1: f32[1,2,4,8] = aten.permute(%permute, [1, 2, 0, 3])
        +%mul: f32[1,4,16] = aten.mul.Tensor(%mul_tensor, %up)
        +%mul_tensor_1: f32[1,4,16] = aten.mul.Tensor(%gate, %gate)
        +return (%permute_1, %mul, %mul_tensor_1)
    """)
    assert float(after.mask.min()) == ATTENTION_MASK_VALUE
    for rewritten, original in zip(after(*args), gm(*args)):
        torch.testing.assert_close(rewritten, original, rtol=1e-5, atol=1e-6)


def test_every_rms_norm_becomes_one_rms_norm_op_with_or_without_a_weight():
    rms_norm = torch.ops.aten.rms_norm.default
    plain = run_passes(tiny_graph("llama", layers=2, seq_len=8), float_passes("none") + [PrepareForQnn()])
    assert sum(n.target == rms_norm for n in plain.graph.nodes) == 5  # 2 per layer + the final norm
    assert {node_info(n).role for n in plain.graph.nodes if n.target == rms_norm and node_info(n)} >= {"final_norm", "layers.1.input_norm"}
    gm = tiny_graph("llama", layers=2, seq_len=8)
    rotated = run_passes(copy.deepcopy(gm), float_passes("hadamard") + [PrepareForQnn()])
    fused = [n for n in rotated.graph.nodes if n.target == rms_norm]
    assert len(fused) == 5 and all(n.args[2] is None for n in fused)  # weights folded into the linears
    assert not any(n.target in (torch.ops.aten.rsqrt.default, torch.ops.aten.mean.dim) for n in rotated.graph.nodes)
    ids = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(rotated(ids)[0], gm(ids)[0], rtol=1e-4, atol=1e-4)


def _first_norm_weight_read_through_a_float16_cast(gm: torch.fx.GraphModule):
    """The first norm's weight multiply reads the normalized tensor through a real cast (float16),
    as a half-precision model's `weight * x.to(input_dtype)` does."""
    from quantnpu.graph.ops import insert_call
    from quantnpu.graph.patterns import rms_norms

    norm = rms_norms(gm)[0]
    cast = insert_call(gm.graph, norm.output, torch.ops.aten._to_copy.default, norm.normalized, dtype=torch.float16)
    norm.output.replace_input_with(norm.normalized, cast)
    gm.recompile()
    return gm, norm, cast


def test_a_norm_weight_read_through_a_real_cast_stays_separate_with_a_warning_naming_it():
    rms_norm = torch.ops.aten.rms_norm.default
    gm = run_passes(tiny_graph("llama", layers=1, seq_len=8), float_passes("none"))   # norm weights kept
    gm, norm, cast = _first_norm_weight_read_through_a_float16_cast(gm)
    tokens = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = gm(tokens)
    with pytest.warns(QuantNpuWarning, match=rf"^RMSNorm %{norm.normalized.name}: its weight multiply %{norm.output.name} reads the "
                                             rf"normalized tensor through the cast %{cast.name}, so only the normalization becomes one "
                                             r"rms_norm op; .*\(one more quantized tensor and NPU op for this norm\)$"):
        prepared = run_passes(copy.deepcopy(gm), [PrepareForQnn()])   # verified: the same function
    by_name = {n.name: n for n in prepared.graph.nodes}
    fused = [n for n in prepared.graph.nodes if n.target == rms_norm]
    assert len(fused) == 3 and sum(n.args[2] is None for n in fused) == 1   # the other two took their weights
    weight_multiply = by_name[norm.output.name]
    assert by_name[cast.name] in weight_multiply.args and by_name[cast.name].args[0].target == rms_norm
    assert not any(n.target == torch.ops.aten.rsqrt.default for n in prepared.graph.nodes)
    torch.testing.assert_close(prepared(tokens), expected, rtol=1e-5, atol=1e-5)


def test_a_norm_weight_read_through_identity_casts_is_fused_without_a_warning():
    rms_norm = torch.ops.aten.rms_norm.default
    gm = annotated_graph("llama")   # no Canonicalize: export's float32 -> float32 casts sit before each norm weight
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantNpuWarning)
        prepared = run_passes(gm, [PrepareForQnn()])
    weights = [n.args[2] for n in prepared.graph.nodes if n.target == rms_norm]
    assert len(weights) == 3 and all(w is not None and w.op == "get_attr" for w in weights)


def test_a_norm_left_op_by_op_fails_the_postcondition_naming_its_rsqrt(monkeypatch):
    import quantnpu.quantizers.quantnpu_quantizer as quantizer

    monkeypatch.setattr(quantizer, "recompose_rms_norms", lambda gm: 0)
    gm = run_passes(tiny_graph("llama", layers=1, seq_len=8), float_passes("none"))
    with pytest.raises(PassFailedError, match=r"^pass PrepareForQnn failed: node %rsqrt\w*: rsqrt left after PrepareForQnn: "
                                              r"an RMSNorm was not made one rms_norm op"):
        run_passes(gm, [PrepareForQnn()])
