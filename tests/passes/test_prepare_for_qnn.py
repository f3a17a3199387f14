"""PrepareForQnn's own rewrites: attention masks get a finite masking value the 16-bit
score tensor can afford, and the float model computes the same function afterwards."""

import copy

import torch

from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes import InsertStaticObservers, PlanBitWidths, PrepareForQnn, StaticCalibration
from quantnpu.pipeline import float_passes
from quantnpu.passes.static_calibration import encodings_by_tensor
from quantnpu.graph.ops import SOFTMAX
from quantnpu.passes.prepare_for_qnn import ATTENTION_MASK_VALUE, bound_attention_masks
from quantnpu.quantizers.bit_plan import BitPlan
from tests.graph_testing import assert_pass_diff, run_passes, tiny_graph


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
