"""LayerStream: many windows through the graph one decoder layer at a time, with the values of a
plain forward, bit for bit (and those of a baked copy, with baked=True, without the copy)."""

import copy

import pytest
import torch

from quantnpu.graph.equivalence import logits_of, sample_token_ids
from quantnpu.graph.watch import ValueWatcher
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import FAMILIES, tiny_model
from quantnpu.passes import PassManager
from quantnpu.passes.bake_rotations import baked_copy
from quantnpu.passes.stream import LayerStream
from quantnpu.pipeline import float_passes


def _windows(gm, count=3):
    return [sample_token_ids(gm, seed) for seed in range(count)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_value_equals_a_plain_forwards_stage_by_stage(family):
    gm = PassManager(float_passes("none"), stop_after="AnnotateRoles", verify=False).run(
        export_causal_lm(tiny_model(family, layers=3), 16).module())
    stream = LayerStream(gm)
    assert stream.stage_names == ["layers.0", "layers.1", "layers.2"]
    windows = _windows(gm)
    seen: dict = {}
    outputs = stream.run(windows, visit=lambda node, value: seen.setdefault(node.name, []).append(value), keep_outputs=True)
    for index, window in enumerate(windows):
        plain: dict = {}
        with torch.no_grad():
            ValueWatcher(gm, set(gm.graph.nodes), lambda node, value: plain.__setitem__(node.name, value)).run(window)
            expected = logits_of(gm(window))
        assert torch.equal(logits_of(outputs[index]), expected)
        for name, values in seen.items():
            if isinstance(plain.get(name), torch.Tensor):
                assert torch.equal(values[index], plain[name]), name


def test_baked_stream_sees_the_baked_copys_values_without_the_copy():
    gm = PassManager(float_passes("hadamard"), stop_after="FuseRotations", verify=False).run(
        export_causal_lm(tiny_model("qwen2", layers=2), 16).module())
    before = {name: p.detach().clone() for name, p in gm.named_parameters()}
    windows = _windows(gm)
    baked = baked_copy(gm)
    outputs = LayerStream(gm, baked=True).run(windows, keep_outputs=True)
    with torch.no_grad():
        for window, output in zip(windows, outputs):
            assert torch.equal(logits_of(output), logits_of(baked(window)))
            # unbaked, the expressions run in float32: close, not equal
            assert torch.allclose(logits_of(LayerStream(gm).run([window], keep_outputs=True)[0]), logits_of(output), atol=1e-4)
    assert all(torch.equal(p, before[name]) for name, p in gm.named_parameters())  # the graph is untouched


def test_nothing_is_kept_between_stages_but_what_later_stages_read():
    gm = PassManager(float_passes("none"), stop_after="AnnotateRoles", verify=False).run(
        export_causal_lm(tiny_model("llama", layers=3), 16).module())
    stream = LayerStream(gm)
    crossing = {n for n in stream.stage_of for u in n.users if u in stream.stage_of and stream.stage_of[u] > stream.stage_of[n]}
    # the residual stream (and the embedding's output for layer 0's residual add) crosses; nothing per head
    assert 0 < len(crossing) <= 2 * 3, sorted(n.name for n in crossing)


def test_a_graph_without_layers_runs_as_one_stage():
    gm = copy.deepcopy(export_causal_lm(tiny_model("llama", layers=2), 16).module())  # no roles annotated
    stream = LayerStream(gm)
    assert stream.stage_names == ["graph"]
    window = sample_token_ids(gm, 0)
    with torch.no_grad():
        assert torch.equal(logits_of(stream.run([window], keep_outputs=True)[0]), logits_of(gm(window)))


def test_checkpointed_forward_gives_the_plain_forwards_loss_and_gradients_bit_for_bit():
    """Stage one's forward (each stage under activation checkpointing) against `gm(window)`: the same
    loss and the same gradients for R1, every R2 and every learned scale."""
    import torch.nn.functional as F

    from quantnpu.passes.learn_encodings import initialize_scales, insert_stage_one_quantizers, rotation_parameters
    from quantnpu.quantizers.bit_plan import BitPlan

    gm = PassManager(float_passes("hadamard"), stop_after="FuseRotations", verify=False).run(
        export_causal_lm(tiny_model("llama", layers=3), 16).module())
    sites = insert_stage_one_quantizers(gm, BitPlan.parse("4-8-8"), "selective")
    window = sample_token_ids(gm, 0)
    initialize_scales(gm, sites, [window])
    trainable = [p for _, p in rotation_parameters(gm)] + [s.module.relative for s in sites if s.module.relative.requires_grad]
    for p in trainable:
        p.requires_grad_(True)
    stream = LayerStream(gm)

    def loss_and_grads(forward):
        for p in trainable:
            p.grad = None
        logits = logits_of(forward(window)).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    plain_loss, plain_grads = loss_and_grads(gm)
    for checkpoint in (True, False):
        loss, grads = loss_and_grads(lambda w: stream.forward(w, checkpoint=checkpoint))
        assert torch.equal(loss, plain_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_layers_out_of_sequence_run_as_one_stage_with_a_warning():
    from quantnpu.diagnostics import QuantNpuWarning
    from quantnpu.graph.meta import NodeInfo, node_info, set_node_info

    gm = PassManager(float_passes("none"), stop_after="AnnotateRoles", verify=False).run(
        export_causal_lm(tiny_model("llama", layers=2), 16).module())
    # relabel layer 0's q_proj as layer 1's: layer 0's attention then reads a later layer's value
    q_proj = next(n for n in gm.graph.nodes if node_info(n) is not None and node_info(n).role == "layers.0.q_proj")
    set_node_info(q_proj, NodeInfo("layers.1.q_proj_relabelled", "q_proj", 1))
    with pytest.warns(QuantNpuWarning, match=r"reads %.* of a later layer .*bounded by the model"):
        stream = LayerStream(gm)
    assert stream.stage_names == ["graph"]
    window = sample_token_ids(gm, 0)
    with torch.no_grad():
        assert torch.equal(logits_of(stream.run([window], keep_outputs=True)[0]), logits_of(gm(window)))
