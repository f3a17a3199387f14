"""The agreement check: each quantized tensor of a `.pte` on the HTP simulator against its op
recomputed, in the Q/DQ graph, from the device's own inputs."""

import copy

import pytest
import torch

from quantnpu.graph.meta import QUANT_KEY
from quantnpu.graph.ops import quantize_kind
from quantnpu.pipeline import STATIC, pipeline
from quantnpu.runtime_harness.agreement import (_inputs_of_layers, _layers_in_order, _narrowing_copy, agreement_tensors,
                                                check_agreement)
from tests.graph_testing import run_passes, tiny_graph

SEQ = 16


@pytest.fixture(scope="module")
def tiny_qdq():
    torch.manual_seed(0)
    graph = tiny_graph("llama", layers=2, seq_len=SEQ)
    calibration = [torch.randint(0, 128, (1, SEQ)) for _ in range(8)]
    quantized = run_passes(graph, pipeline("8-8-8", calibration, STATIC))
    window = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(7))
    return quantized, window


def _quantize_of(gm: torch.fx.GraphModule, label: str) -> torch.fx.Node:
    """The quantize node of the tensor the bit plan calls `label`."""
    for node in gm.graph.nodes:
        if quantize_kind(node) == "quantize" and isinstance(node.args[0], torch.fx.Node):
            record = node.args[0].meta.get(QUANT_KEY)
            if record is not None and label in record.labels:
                return node
    raise AssertionError(f"no quantized tensor labelled {label}")


def test_quantnpu_pte_agrees_with_its_qdq_graph_op_by_op(tiny_qdq, tmp_path):
    quantized, window = tiny_qdq
    report = check_agreement(quantized, (window,), tmp_path / "taps.pte")
    assert report.ok, report.summary() + "\n" + report.per_layer()
    assert len(report.tensors) >= 60  # every op's output and every re-quantized edge of two layers
    eight_bit = [t for t in report.tensors if t.bits == 8]
    # HTP's fixed-point requantization rounds a few values the other way: at most one step; where an
    # op reads a narrowing copy (not forced: its tap is not what the op consumed, see _narrowing_copy),
    # that copy's own flips add up to one more
    by_name = {n.name: n for n in quantized.graph.nodes}

    def reads_a_narrowing_copy(tensor: str) -> bool:
        op = by_name[tensor].args[0]
        return any(quantize_kind(d) == "dequantize" and _narrowing_copy(d.args[0]) for d in op.all_input_nodes)

    assert eight_bit and all(t.local_max <= (2 if reads_a_narrowing_copy(t.tensor) else 1) for t in eight_bit)
    assert sum(t.local_mean for t in eight_bit) / len(eight_bit) < 0.1  # a few values, not a bias
    assert "layers.1" in report.per_layer() and report.summary().startswith("agreement:")
    assert not list(tmp_path.iterdir())  # the tapped program is removed


def test_a_planted_encoding_mismatch_is_caught_and_named(tiny_qdq, tmp_path):
    """A Q/DQ graph that does not model what the device computes: in the reference, the readers of
    layers.1's k_proj output dequantize it with a scale 1.5x the one it was quantized with (the kind of
    edge a dropped or misapplied re-quantization leaves), while the device program is the real one.
    Lowering is value-preserving across such an edge, the Q/DQ arithmetic is not: the check fails at
    the first tensor computed from that edge, in layer 1, and everything before it still agrees."""
    quantized, window = tiny_qdq
    reference = copy.deepcopy(quantized)
    planted = _quantize_of(reference, "layers.1.k_proj.output")
    for dequantize in list(planted.users):
        dequantize.args = (dequantize.args[0], float(dequantize.args[1]) * 1.5, *dequantize.args[2:])
    reference.recompile()
    report = check_agreement(reference, (window,), tmp_path / "planted.pte", device_graph=quantized)
    assert not report.ok
    first = report.failures()[0]
    assert first.layer == 1 and first.local_max > 8
    names = [n.name for n in agreement_tensors(reference)]
    assert names.index(first.tensor) > names.index(planted.name)
    assert report.summary().startswith("agreement check failed") and first.tensor in report.summary()
    upstream = [t for t in report.tensors if names.index(t.tensor) <= names.index(planted.name)]
    assert upstream and all(t.local_fraction <= report.tolerance for t in upstream)


def test_a_layer_subset_also_taps_what_its_first_ops_read(tiny_qdq, tmp_path):
    """With `layers`, the check also taps the tensors the chosen layers read from outside them (the
    residual stream entering the layer), or the layer's first ops would be judged from the reference's
    own, drifted, inputs."""
    quantized, window = tiny_qdq
    names = [n.name for n in agreement_tensors(quantized)]
    feeding = _inputs_of_layers(quantized, names, {1})
    by_name = {n.name: n for n in quantized.graph.nodes}
    sources = [by_name[name].args[0] for name in feeding]
    assert feeding and all("add" in str(source.target) for source in sources), [s.name for s in sources]
    where = _layers_in_order(quantized)
    assert {where[name] for name in feeding} == {0}
    # the residual add entering layer 1 is the last add of layer 0, read by layer 1's RMSNorm
    assert any("rms_norm" in str(reader.target) for name in feeding for dq in by_name[name].users for reader in dq.users)
    # ... and forces them without judging them: every tensor judged is layer 1's or the model's own
    report = check_agreement(quantized, (window,), tmp_path / "subset.pte", layers={1})
    assert report.ok, report.summary()
    assert report.tensors and {t.layer for t in report.tensors} <= {1, None}
    assert not any(t.tensor in feeding for t in report.tensors)
