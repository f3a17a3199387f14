import torch

from quantnpu.graph.meta import nodes_by_role
from quantnpu.passes import AnnotateRoles, Canonicalize, FoldConstants, FoldNorms, UntieEmbeddings
from quantnpu.passes.weights import weight_tensor
from quantnpu.runtime_harness.activation_stats import linear_input_stats, linear_inputs
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import tiny_llama
from tests.graph_testing import run_passes

MODEL = tiny_llama(layers=2)


def _folded_graph(seq_len: int) -> torch.fx.GraphModule:
    return run_passes(export_causal_lm(MODEL, seq_len).module(), [Canonicalize(), FoldConstants(), AnnotateRoles(), UntieEmbeddings(),
                                                                  FoldNorms()])


def test_linear_inputs_are_the_rows_the_linear_reads():
    """With the norm weight folded, the first q_proj reads the RMS-normalized embeddings."""
    gm = _folded_graph(seq_len=8)
    windows = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    caught = linear_inputs(gm, windows, {"layers.0.q_proj", "layers.0.k_proj", "layers.1.gate_proj"})
    assert set(caught) == {"layers.0.q_proj", "layers.0.k_proj", "layers.1.gate_proj"}
    table_node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default).args[0]
    embedded = weight_tensor(gm, table_node)[windows.flatten()].double()
    normalized = embedded / (embedded.pow(2).mean(-1, keepdim=True) + MODEL.config.rms_norm_eps).sqrt()
    x = caught["layers.0.q_proj"].double()
    assert x.shape == (3 * 8, embedded.shape[-1])
    assert torch.allclose(x, normalized, rtol=1e-3, atol=1e-4)
    assert torch.equal(caught["layers.0.q_proj"], caught["layers.0.k_proj"])  # both read the same norm output
    weight = weight_tensor(gm, nodes_by_role(gm)["layers.1.gate_proj"].args[1])
    assert caught["layers.1.gate_proj"].shape == (3 * 8, weight.shape[1])


def test_linear_input_stats_agree_with_the_caught_inputs():
    gm = _folded_graph(seq_len=8)
    windows = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    x = linear_inputs(gm, windows, {"layers.0.q_proj"})["layers.0.q_proj"].double()
    per_window = [w.flatten() for w in x.split(8)]
    expected = sum((w.abs().max() / w.std()).item() for w in per_window) / 2
    assert abs(linear_input_stats(gm, windows)["layers.0.q_proj"]["max_over_std"] - expected) < 1e-6
