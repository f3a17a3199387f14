"""The verifier: a pass that changes the function is named; function-preserving passes pass;
verification ends where the function changes on purpose (quantization)."""

import copy

import pytest
import torch

from quantnpu.diagnostics import QuantNpuWarning
from quantnpu.errors import PassFailedError, QuantNpuError
from quantnpu.passes import AnnotateRoles, FoldNorms, GraphPass, PassManager, PassResult
from quantnpu.graph.meta import nodes_by_role
from quantnpu.errors import FunctionChangedError
from quantnpu.graph.equivalence import FunctionCheck, graph_dtype_tolerance, sample_token_ids
from quantnpu.passes.verify import VerifyFunction
from quantnpu.passes.weights import replace_weight, weight_tensor
from quantnpu.pipeline import STATIC, float_passes, pipeline
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
    quantized = PassManager(pipeline("8-8-8", calibration, STATIC)).run(copy.deepcopy(gm))  # changes the function, on purpose
    assert any("quantize_per_tensor" in str(n.target) for n in quantized.graph.nodes)


def test_function_changed_error_is_a_quantnpu_error():
    from quantnpu.errors import QuantNpuError

    assert issubclass(FunctionChangedError, QuantNpuError)


def test_each_verified_pass_records_its_difference():
    gm = tiny_graph("llama", layers=1)
    calibration = [sample_token_ids(gm, seed) for seed in range(2)]
    manager = PassManager(pipeline("8-8-8", calibration, STATIC))
    manager.run(gm)
    verified = {r.name: r.function_difference for r in manager.records}
    assert all(0 <= verified[name] < 1e-4 for name in ("Canonicalize", "FuseRotations", "BakeRotations", "PrepareForQnn"))
    assert verified["StaticCalibration"] is None and verified["ConvertToQdq"] is None
    assert "BakeRotations" in manager.report()


def _float32_only(x):
    """A planted op without a float64 kernel."""
    if x.dtype == torch.float64:
        raise RuntimeError("no float64 kernel for this op")
    return x


def _with_an_op_without_float64(gm):
    embedding = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    with gm.graph.inserting_after(embedding):
        planted = gm.graph.call_function(_float32_only, (embedding,))
    embedding.replace_all_uses_with(planted, delete_user_cb=lambda user: user is not planted)
    planted.meta["val"] = embedding.meta["val"]
    gm.recompile()
    return gm, planted


def test_graph_dtype_tolerance_is_2_to_the_10_epsilons():
    assert graph_dtype_tolerance(torch.float32) == 2 ** 10 * torch.finfo(torch.float32).eps   # 1.2e-4
    assert graph_dtype_tolerance(torch.bfloat16) == 8.0


def test_the_fallback_from_float64_warns_naming_the_op_and_the_tolerance_it_uses():
    gm, planted = _with_an_op_without_float64(tiny_graph("llama", layers=2))
    with pytest.warns(QuantNpuWarning, match=rf"^verifier: the graph cannot run in float64 \(at %{planted.name} \(_float32_only\): "
                                             r"RuntimeError: no float64 kernel for this op\); comparing in float32, the graph's dtype, "
                                             r"with tolerance 0\.00012207 \(2\^10 x the float32 epsilon, in place of the float64 "
                                             r"check's 0\.0001\)$"):
        check = FunctionCheck(gm)
    assert check.precision == "float32" and check.tolerance == graph_dtype_tolerance(torch.float32)
    rotated = PassManager(float_passes("hadamard"), verify=False).run(copy.deepcopy(gm))
    assert check.difference(rotated) <= check.tolerance   # rounding differences of float32 pass
    with pytest.warns(QuantNpuWarning), pytest.raises(
            PassFailedError, match=rf"^pass PerturbOneWeight failed: it changed the function: logits differ from the input graph's by "
                                   rf"[0-9.e+-]+ \(relative, float32 \(the graph's dtype: float64 failed at %{planted.name} "
                                   r"\(_float32_only\): .*\), seeded random ids \(1, 8\); tolerance 0\.00012207\)$"):
        PassManager(_with_planted(float_passes("hadamard"), PerturbOneWeight())).run(gm)


def test_a_graph_that_stops_running_in_float64_after_the_reference_did_is_a_clear_error():
    gm = tiny_graph("llama", layers=1)
    check = FunctionCheck(gm)
    changed, planted = _with_an_op_without_float64(copy.deepcopy(gm))
    with pytest.raises(QuantNpuError, match=rf"the reference ran in float64 but this graph does not \(%{planted.name} "):
        check.difference(changed)
    assert check.float64 and check.precision == "float64"   # the check is unchanged


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "et-llama"])
def test_the_float64_check_runs_without_a_float64_copy_and_gives_the_same_logits(family):
    """`run_in_float64` (node by node, one weight at a time in float64) computes exactly what a
    float64 copy of the model does, before and after the rotation passes."""
    from quantnpu.graph.equivalence import as_float64, logits_of, run_in_float64
    from quantnpu.models.export import export_causal_lm
    from quantnpu.models.tiny import tiny_model

    gm = export_causal_lm(tiny_model(family), 16).module()
    rotated = PassManager(float_passes("hadamard"), stop_after="FuseRotations", verify=False).run(copy.deepcopy(gm))
    for graph in (gm, rotated):
        ids = sample_token_ids(graph, 3)
        assert torch.equal(logits_of(run_in_float64(graph, ids)), logits_of(as_float64(graph)(ids)))
