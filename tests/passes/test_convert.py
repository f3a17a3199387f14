"""ConvertToQdq and QuantizeWithQnnQuantizer: the passes that end the chain in a Q/DQ graph."""

import copy

import torch

from quantnpu.graph.ops import quantize_kind
from quantnpu.passes import PassManager
from quantnpu.passes.convert import ENCODINGS_META, ConvertToQdq
from quantnpu.passes.integer_only import integer_only_violations
from quantnpu.passes.static_calibration import encodings_by_tensor
from quantnpu.pipeline import pipeline
from quantnpu.graph.equivalence import sample_token_ids
from tests.graph_testing import run_passes, tiny_graph
from tests.passes.swiglu_block import batches, calibrated


def test_convert_to_qdq_keeps_the_encodings_and_the_fake_quant_arithmetic():
    fake_quant, _ = calibrated("4-8-8")
    converted = PassManager([ConvertToQdq()], verify=False).run(copy.deepcopy(fake_quant))
    assert converted.meta[ENCODINGS_META] == encodings_by_tensor(fake_quant)
    assert not [n for n in converted.graph.nodes if n.op == "call_module" and "activation_post_process" in n.target]
    assert sum(quantize_kind(n) == "quantize" for n in converted.graph.nodes) >= 10
    assert integer_only_violations(converted) == []
    x = batches(1)[0]
    assert torch.equal(converted(x), fake_quant(x))


def test_qnn_quantizer_pass_calibrates_and_converts():
    gm = tiny_graph("llama", layers=1, seq_len=8)
    calibration = [torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    converted = run_passes(gm, pipeline("et-16a8w", calibration))
    assert sum(quantize_kind(n) == "quantize" for n in converted.graph.nodes) >= 10
    assert integer_only_violations(converted) == []


def test_conversion_keeps_no_float_weight_beside_its_quantized_constant():
    """PT2E's conversion replaces each quantized weight by an integer constant; the float original is
    dropped from the converted module, not kept as an unused parameter (memory: weights once)."""
    from quantnpu.pipeline import STATIC, pipeline

    gm = tiny_graph("llama", layers=1, seq_len=8)
    calibration = [sample_token_ids(gm, seed) for seed in range(2)]
    converted = run_passes(gm, pipeline("8-8-8", calibration, STATIC))
    read = {n.target for n in converted.graph.nodes if n.op == "get_attr"}
    held = dict([*converted.named_parameters(), *converted.named_buffers()])
    assert set(held) <= read, sorted(set(held) - read)[:5]
    assert not any(t.dtype == torch.float32 and t.dim() == 2 and t.numel() >= 64 * 64 for t in held.values())
