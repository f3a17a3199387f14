"""IntegerOnlyCheck: a converted graph passes; a planted float op or dynamic scale is named."""

import pytest
import torch

from quantnpu.errors import PassFailedError
from quantnpu.passes.integer_only import IntegerOnlyCheck, integer_only_violations
from quantnpu.pipeline import pipeline
from tests.graph_testing import run_passes, tiny_graph


@pytest.fixture(scope="module")
def quantized():
    calibration = [torch.randint(0, 128, (1, 8)) for _ in range(2)]
    return run_passes(tiny_graph("llama", layers=1, seq_len=8), pipeline("et-16a8w", calibration, rotate="none"))


def test_fully_quantized_graph_passes(quantized):
    assert integer_only_violations(quantized) == []
    assert IntegerOnlyCheck()(quantized).modified is False


def test_planted_float_op_is_named(quantized):
    import copy

    gm = copy.deepcopy(quantized)
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    with gm.graph.inserting_after(linear):
        planted = gm.graph.call_function(torch.ops.aten.exp.default, (linear,))
    planted.meta["val"] = linear.meta["val"]
    quantize = next(iter(linear.users))
    quantize.replace_input_with(linear, planted)
    gm.recompile()
    violations = integer_only_violations(gm)
    assert f"%{planted.name}: reads float %{linear.name} that is not a dequantized tensor" in violations
    assert f"%{linear.name}: float output used by %{planted.name} without being quantized" in violations
    with pytest.raises(PassFailedError, match=f"not integer-only: .*%{planted.name}"):
        from quantnpu.passes.base import PassManager

        PassManager([IntegerOnlyCheck()]).run(gm)


def test_dynamic_scale_is_named(quantized):
    import copy

    gm = copy.deepcopy(quantized)
    quantize = next(n for n in gm.graph.nodes if "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target))
    source = quantize.args[0]
    with gm.graph.inserting_before(quantize):
        amax = gm.graph.call_function(torch.ops.aten.amax.default, (source,))
    quantize.update_arg(1, amax)
    assert any(v.startswith(f"%{quantize.name}: quantize with a scale/zero point computed at run time") for v in integer_only_violations(gm))
