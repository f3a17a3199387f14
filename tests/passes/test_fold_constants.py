"""FoldConstants: input-independent subgraphs become buffers; nothing else changes."""

import pytest
import torch

from quantnpu.passes import FoldConstants
from quantnpu.passes.fold_constants import input_independent_nodes
from tests.graph_testing import assert_pass_diff, run_passes, tiny_graph


class _PositionTable(torch.nn.Module):
    """x * cos(positions * inv_freq) masked causally: the shape of a RoPE table and a mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor([1.0, 0.5]))
        self.scale = torch.nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, x):
        positions = torch.arange(3, dtype=torch.float32)
        table = torch.cos(positions[:, None] * self.inv_freq)
        return x * table * self.scale


def test_folds_a_position_table_and_keeps_parameters():
    gm = torch.export.export(_PositionTable(), (torch.ones(3, 2),)).module()
    x = torch.randn(3, 2)
    expected = gm(x)
    folded = assert_pass_diff(gm, [FoldConstants()], """
        -%inv_freq: f32[2] = get_attr inv_freq
        -%arange: f32[3] = aten.arange(3, dtype=f32, device=cpu, pin_memory=False)
        -%unsqueeze: f32[3,1] = aten.unsqueeze(%arange, 1)
        -%mul: f32[3,2] = aten.mul.Tensor(%unsqueeze, %inv_freq)
        -%cos: f32[3,2] = aten.cos(%mul)
        -%mul_1: f32[3,2] = aten.mul.Tensor(%x, %cos)
        +%_folded_cos: f32[3,2] = get_attr _folded_cos
        +%mul_1: f32[3,2] = aten.mul.Tensor(%x, %_folded_cos)
    """)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)
    assert "scale" in dict(folded.named_parameters())


def test_tiny_llama_keeps_only_qnn_friendly_ops_and_the_same_logits():
    gm = tiny_graph("llama", layers=2, seq_len=16)
    ids = torch.randint(0, 128, (1, 16))
    expected = gm(ids)
    folded = run_passes(gm, [FoldConstants()])
    targets = {str(n.target) for n in folded.graph.nodes if n.op == "call_function"}
    for rejected in ("aten.cumsum.default", "aten.index.Tensor", "aten.arange.default", "aten.__and__.Tensor", "aten.diff.default"):
        assert rejected not in targets
    assert not [n for n in input_independent_nodes(folded) if n.users]
    torch.testing.assert_close(folded(ids), expected, rtol=0, atol=0)
    # Every layer's RoPE tables and the mask are one buffer each, however many layers use them.
    assert sorted(name for name, _ in folded.named_buffers() if name.startswith("_folded_")) == [
        "_folded_expand_1", "_folded_unsqueeze_14", "_folded_unsqueeze_15"]


def test_graph_with_nothing_to_fold_is_reported_unmodified():
    gm = torch.export.export(torch.nn.Linear(4, 4), (torch.ones(1, 4),)).module()
    result = FoldConstants()(gm)
    assert result.modified is False


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_folding_is_idempotent(kind):
    once = run_passes(tiny_graph(kind, layers=1), [FoldConstants()])
    assert FoldConstants()(once).modified is False
