"""Lowering a tiny decoder to QNN and running it on the HTP simulator."""

import copy

import pytest
import torch

from quantnpu.errors import DelegationError
from quantnpu.lowering.lower import lower_to_qnn
from quantnpu.passes import PassManager
from quantnpu.passes.convert import QuantizeWithQnnQuantizer
from quantnpu.pipeline import STATIC, pipeline
from quantnpu.runtime_harness.pte import PteModel
from tests.graph_testing import run_passes, tiny_graph

SEQ = 16


def _output_scale(quantized: torch.fx.GraphModule) -> float:
    output = next(n for n in quantized.graph.nodes if n.op == "output")
    dequantize = output.args[0][0]
    assert "dequantize_per_tensor" in str(dequantize.target), dequantize.target
    return float(dequantize.args[1])


@pytest.fixture(scope="module")
def tiny_lowered(tmp_path_factory):
    torch.manual_seed(0)
    graph = tiny_graph("llama", layers=2, seq_len=SEQ)
    calibration = [torch.randint(0, 128, (1, SEQ)) for _ in range(8)]
    gm = run_passes(copy.deepcopy(graph), pipeline())
    quantized = run_passes(graph, pipeline("et-16a8w", calibration))
    result = lower_to_qnn(quantized, (calibration[0],), tmp_path_factory.mktemp("pte") / "tiny.pte")
    return gm, quantized, result


def test_tiny_llama_lowers_to_one_delegate(tiny_lowered):
    _, _, result = tiny_lowered
    assert result.delegates == 1
    assert result.outside_delegates == []
    assert result.pte_path.stat().st_size == result.size_bytes > 0
    assert not [p for p in result.pte_path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_pte_on_simulator_agrees_with_fake_quant_within_a_few_steps(tiny_lowered):
    gm, quantized, result = tiny_lowered
    model = PteModel(result.pte_path)
    step = _output_scale(quantized)
    for seed in range(3):
        ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(100 + seed))
        on_simulator = model(ids)
        fake_quant = quantized(ids)
        # Measured here: max 5-7 and mean ~1.1 steps of the 16-bit output grid (2.8e-5), from the
        # HTP's own requantization of intermediate tensors.
        steps_apart = (on_simulator - fake_quant).abs() / step
        assert steps_apart.max().item() <= 8, f"window {seed}: .pte and fake-quant logits up to {steps_apart.max():.1f} output steps apart"
        assert steps_apart.mean().item() <= 1.5, f"window {seed}: mean difference {steps_apart.mean():.2f} output steps"
        # and the quantized program still computes the float model's function, roughly
        float_logits = gm(ids)
        assert ((fake_quant - float_logits).norm() / float_logits.norm()).item() < 0.1


class _CumprodHead(torch.nn.Module):
    """A linear followed by a cumulative product, which QNN has no op for: it stays on the CPU."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.cumprod(self.linear(x), dim=-1)


def test_op_left_on_cpu_is_an_error_naming_it(tmp_path):
    x = torch.randn(1, 4, 8)
    gm = torch.export.export(_CumprodHead().eval(), (x,)).module()
    quantized = PassManager([QuantizeWithQnnQuantizer("8a8w", [torch.randn(1, 4, 8) for _ in range(4)])], verify=False).run(gm)
    target = tmp_path / "cumprod.pte"
    with pytest.raises(DelegationError, match=r"op\(s\) left outside QNN delegates: .*cumprod"):
        lower_to_qnn(quantized, (x,), target)
    assert not target.exists()
    allowed = lower_to_qnn(quantized, (x,), target, allow_cpu_ops=True)
    assert any("cumprod" in op for op in allowed.outside_delegates) and target.exists()


@pytest.fixture(scope="module")
def tiny_quantnpu(tmp_path_factory):
    """The quantnpu path on a tiny Llama: static encodings (8-8-8), QuantNpuQuantizer, QNN."""
    torch.manual_seed(0)
    graph = tiny_graph("llama", layers=2, seq_len=SEQ)
    calibration = [torch.randint(0, 128, (1, SEQ)) for _ in range(8)]
    gm = run_passes(copy.deepcopy(graph), pipeline())
    fake_quant = PassManager(pipeline("8-8-8", calibration, STATIC), stop_after="StaticCalibration").run(copy.deepcopy(graph))
    quantized = run_passes(graph, pipeline("8-8-8", calibration, STATIC))
    return gm, fake_quant, quantized, tmp_path_factory.mktemp("quantnpu")


def test_quantnpu_pte_agrees_with_its_fake_quant_graph(tiny_quantnpu):
    """Per tensor, on the HTP simulator: each quantized tensor of the `.pte` against the same tensor of
    the Q/DQ graph in PyTorch, in steps of that tensor's grid. HTP's integer kernels round their
    requantization differently from the float reference, so 8-bit tensors differ by a step here and
    there, and the 16-bit tensors downstream inherit those differences (in their own, finer steps)."""
    from quantnpu.runtime_harness.agreement import run_taps_on_device, tap_candidates

    gm, fake_quant, quantized, directory = tiny_quantnpu
    x = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(99))
    names = [n.name for n in tap_candidates(quantized)]
    results = run_taps_on_device(quantized, names, (x,), directory / "taps.pte")
    eight_bit = [r for r in results if r.bits == 8]
    assert len(eight_bit) >= 20
    assert max(r.max_steps for r in eight_bit) <= 8, [r.line() for r in eight_bit if r.max_steps > 8]
    assert max(r.mean_steps for r in eight_bit) <= 1.5
    lowered = lower_to_qnn(quantized, (x,), directory / "tiny.pte")
    assert lowered.delegates == 1 and lowered.outside_delegates == []
    device, reference, float_logits = PteModel(lowered.pte_path)(x), fake_quant(x), gm(x)
    device_error = ((device - reference).abs().max() / reference.abs().max()).item()
    quantization_error = ((reference - float_logits).abs().max() / float_logits.abs().max()).item()
    assert device_error < 0.03, (device_error, quantization_error)


def _delegate_calls(pte_path):
    """(input value dtypes, output value dtypes) of each instruction of the `.pte`'s forward plan,
    None for an instruction that is not a delegate call."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte_path.read_bytes())
    plan = getattr(program, "program", program).execution_plan[0]
    return [[plan.values[i].val.scalar_type for i in ins.instr_args.args]
            if type(ins.instr_args).__name__ == "DelegateCall" else None
            for ins in plan.chains[0].instructions]


def test_two_shards_lower_to_two_delegates_that_compute_the_unsharded_outputs(tiny_quantnpu):
    """Split by layer, each shard its own QNN context: nothing runs on the CPU between them, the
    tensor one hands to the next is the residual stream as integers at its encoding, and the
    simulator's logits are the unsharded program's, bit for bit."""
    from quantnpu.lowering.sharding import SHARD_KEY

    _, _, quantized, directory = tiny_quantnpu
    x = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(7))
    whole = lower_to_qnn(quantized, (x,), directory / "whole.pte")
    split = lower_to_qnn(quantized, (x,), directory / "two_shards.pte", shards=2)
    assert whole.delegates == 1 and whole.shards.shards == 1
    assert split.delegates == 2 and split.outside_delegates == [] and len(split.context_bytes) == 2
    assert split.shards.first_layers == (0, 1)
    assert len(split.boundaries) == 1 and split.boundaries[0].split()[1].startswith(("uint8[", "uint16["))
    calls = _delegate_calls(split.pte_path)
    assert all(c is not None for c in calls) and len(calls) == 2  # two delegate calls and nothing else
    from executorch.exir.scalar_type import ScalarType

    handed_over = calls[0][-1]
    assert handed_over in (ScalarType.BYTE, ScalarType.UINT16) and calls[1][0] == handed_over
    assert not any(SHARD_KEY in (n.meta.get("custom") or {}) for n in quantized.graph.nodes)  # meta as it was
    one, two = PteModel(whole.pte_path), PteModel(split.pte_path)
    for seed in range(3):
        ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(200 + seed))
        assert torch.equal(one(ids), two(ids))


def test_shard_plan_balances_weight_bytes_and_keeps_each_context_under_the_limit(tiny_quantnpu):
    from quantnpu.errors import QuantNpuError
    from quantnpu.lowering.sharding import plan_shards

    _, _, quantized, _ = tiny_quantnpu
    whole = plan_shards(quantized)
    assert whole.shards == 1 and whole.layers == 2
    limit = whole.weight_bytes[0] - 1
    auto = plan_shards(quantized, context_limit_bytes=limit)
    assert auto.shards == 2 and max(auto.weight_bytes) <= limit and sum(auto.weight_bytes) == whole.weight_bytes[0]
    assert auto.node_shard == plan_shards(quantized, 2).node_shard
    # the embedding goes with the first layer, the lm_head with the last
    embedding = next(n for n in quantized.graph.nodes if "embedding" in str(n.target))
    lm_head = [n for n in quantized.graph.nodes if "linear" in str(n.target)][-1]
    assert auto.node_shard[embedding.name] == 0 and auto.node_shard[lm_head.name] == 1
    with pytest.raises(QuantNpuError, match="over the per-context limit"):
        plan_shards(quantized, context_limit_bytes=1000)
    with pytest.raises(QuantNpuError, match="2 layers into 3 shards"):
        plan_shards(quantized, 3)
