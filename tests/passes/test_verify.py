"""The verifier: a pass that changes the function is named; function-preserving passes pass;
verification ends where the function changes on purpose (quantization)."""

import copy

import pytest
import torch

from quantnpu.errors import PassFailedError
from quantnpu.passes import AnnotateRoles, FoldNorms, GraphPass, PassManager, PassResult
from quantnpu.graph.meta import nodes_by_role
from quantnpu.errors import FunctionChangedError
from quantnpu.graph.equivalence import sample_token_ids
from quantnpu.passes.verify import VerifyFunction
from quantnpu.passes.weights import replace_weight, weight_tensor
from quantnpu.pipeline import float_passes, pipeline
from tests.graph_testing import tiny_graph


class PerturbOneWeight(GraphPass):
    """A planted miscompile: one element of layer 0's up_proj weight moves by `delta`."""

    def __init__(self, delta: float = 0.5) -> None:
        self.delta = delta

    def call(self, gm):
        up = nodes_by_role(gm)["layers.0.up_proj"]
        weight = weight_tensor(gm, up.args[1]).clone()
        weight[0, 0] += self.delta
        replace_weight(gm, up.args[1].target, weight)
        return PassResult(gm, True)


def _with_planted(passes, planted, after=FoldNorms):
    index = next(i for i, p in enumerate(passes) if isinstance(p, after))
    return passes[:index + 1] + [planted] + passes[index + 1:]


def test_the_pass_that_changed_the_function_is_named():
    passes = _with_planted(float_passes("hadamard"), PerturbOneWeight())
    with pytest.raises(PassFailedError, match=r"^pass PerturbOneWeight failed: it changed the function: logits differ "
                                              r"from the input graph's by [0-9.e+-]+ \(relative, float64, .*tolerance 0\.0001\)$"):
        PassManager(passes).run(tiny_graph("llama", layers=2))


def test_a_perturbation_far_below_float32_rounding_passes():
    passes = _with_planted(float_passes("hadamard"), PerturbOneWeight(delta=1e-9))
    PassManager(passes).run(tiny_graph("llama", layers=2))


def test_without_verification_the_changed_graph_is_returned():
    gm = tiny_graph("llama", layers=2)
    ids = sample_token_ids(gm)
    changed = PassManager(_with_planted(float_passes("none"), PerturbOneWeight(), after=AnnotateRoles), verify=False).run(copy.deepcopy(gm))
    assert not torch.allclose(changed(ids), gm(ids), atol=1e-3)


def test_verify_function_as_an_explicit_pass():
    gm = tiny_graph("llama", layers=2)
    rotated = PassManager(float_passes("hadamard") + [VerifyFunction(gm)]).run(copy.deepcopy(gm))
    with pytest.raises(PassFailedError, match="VerifyFunction failed: the function changed"):
        PassManager([PerturbOneWeight(), VerifyFunction(gm)], verify=False).run(rotated)


def test_verification_ends_where_quantization_begins():
    gm = tiny_graph("llama", layers=1)
    calibration = [sample_token_ids(gm, seed) for seed in range(2)]
    quantized = PassManager(pipeline("8-8-8", calibration)).run(copy.deepcopy(gm))  # changes the function, on purpose
    assert any("quantize_per_tensor" in str(n.target) for n in quantized.graph.nodes)


def test_function_changed_error_is_a_quantnpu_error():
    from quantnpu.errors import QuantNpuError

    assert issubclass(FunctionChangedError, QuantNpuError)


def test_each_verified_pass_records_its_difference():
    gm = tiny_graph("llama", layers=1)
    calibration = [sample_token_ids(gm, seed) for seed in range(2)]
    manager = PassManager(pipeline("8-8-8", calibration))
    manager.run(gm)
    verified = {r.name: r.function_difference for r in manager.records}
    assert all(0 <= verified[name] < 1e-4 for name in ("Canonicalize", "FuseRotations", "BakeRotations", "PrepareForQnn"))
    assert verified["StaticCalibration"] is None and verified["ConvertToQdq"] is None
    assert "BakeRotations" in manager.report()
