"""Canonicalize: identity ops, empty concatenations and repeat_interleave rewritten away, the
function unchanged; the same canonical graph whichever way a decoder was exported."""

import copy

import pytest
import torch

from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import tiny_model
from quantnpu.passes import Canonicalize
from quantnpu.graph.text import graph_text
from tests.graph_testing import assert_pass_diff, run_passes

aten = torch.ops.aten


class _Identities(torch.nn.Module):
    def forward(self, x, y):
        a = x.clone().contiguous()
        b = a.to(torch.float32).type_as(y)
        return torch.nn.functional.dropout(b, 0.1, training=False) + y.detach()


class _EmptyCache(torch.nn.Module):
    """Hugging Face's default export starts each KV cache empty and concatenates onto it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 0, 4))

    def forward(self, x):
        return torch.cat([self.cache, x], dim=1) * 2


class _RepeatInterleave(torch.nn.Module):
    """ExecuTorch's Llama repeats K/V heads for grouped-query attention this way."""

    def forward(self, k):
        return k.repeat_interleave(3, dim=1)


def _check(module, args, expected):
    gm = torch.export.export(module, args).module()
    after = assert_pass_diff(gm, [Canonicalize()], expected)
    assert torch.equal(after(*args), gm(*args))


def test_identity_ops_are_dropped():
    _check(_Identities(), (torch.randn(2, 4), torch.randn(2, 4)), """
        -%clone: f32[2,4] = aten.clone(%x)
        -%_assert_tensor_metadata_default = aten._assert_tensor_metadata(%clone, dtype=f32, device=cpu, layout=torch.strided)
        -%to: f32[2,4] = aten.to.dtype(%clone, f32)
        -%type_as: f32[2,4] = aten.type_as(%to, %y)
        -%dropout: f32[2,4] = aten.dropout(%type_as, 0.1, False)
        -%detach: f32[2,4] = aten.detach(%y)
        -%add: f32[2,4] = aten.add.Tensor(%dropout, %detach)
        +%add: f32[2,4] = aten.add.Tensor(%x, %y)
    """)


def test_a_cast_that_changes_the_dtype_stays():
    class Half(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.float16) * 2

    gm = torch.export.export(Half(), (torch.randn(2),)).module()
    after = run_passes(copy.deepcopy(gm), [Canonicalize()])
    assert any(n.target == aten.to.dtype for n in after.graph.nodes)


def test_empty_operands_of_cat_are_dropped():
    _check(_EmptyCache(), (torch.randn(1, 3, 4),), """
        -%cache: f32[1,0,4] = get_attr cache
        -%cat: f32[1,3,4] = aten.cat([%cache, %x], 1)
        -%mul: f32[1,3,4] = aten.mul.Tensor(%cat, 2)
        +%mul: f32[1,3,4] = aten.mul.Tensor(%x, 2)
    """)


def test_repeat_interleave_becomes_unsqueeze_expand_reshape():
    _check(_RepeatInterleave(), (torch.randn(1, 2, 5, 4),), """
        -%repeat_interleave: f32[1,6,5,4] = aten.repeat_interleave.self_int(%k, 3, 1)
        -return (%repeat_interleave,)
        +%unsqueeze_default: f32[1,2,1,5,4] = aten.unsqueeze(%k, 2)
        +%expand_default: f32[1,2,3,5,4] = aten.expand(%unsqueeze_default, [1, 2, 3, 5, 4])
        +%reshape_default: f32[1,6,5,4] = aten.reshape(%expand_default, [1, 6, 5, 4])
        +return (%reshape_default,)
    """)


@pytest.mark.parametrize("family", ["llama", "et-llama"])
def test_no_export_artefact_is_left(family):
    """Hugging Face's default export (KV-cache constants, lift_fresh_copy + detach_) and
    ExecuTorch's Llama (type_as, repeat_interleave) leave none of those ops after the pass."""
    gm = export_causal_lm(tiny_model(family, layers=1), 8, use_cache=None).module()
    after = run_passes(gm, [Canonicalize()])
    left = {str(n.target) for n in after.graph.nodes} & {
        "aten.lift_fresh_copy.default", "aten.detach_.default", "aten.type_as.default",
        "aten.repeat_interleave.self_int", "aten._assert_tensor_metadata.default", "aten.alias.default"}
    assert not left, graph_text(after)
