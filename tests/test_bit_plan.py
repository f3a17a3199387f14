"""The bit plan's rules, its config syntax and overrides (METHOD.md, "Target")."""

import pytest

from quantnpu.errors import QuantNpuError
from quantnpu.quantizers.bit_plan import BitPlan


def test_tensor_rules():
    plan = BitPlan.parse("4-8-8")
    assert plan.tensor_bits({"layers.3.q_proj.weight"}) == (4, "W")
    assert plan.tensor_bits({"lm_head.weight"}) == (8, "lm_head weight")
    assert plan.tensor_bits({"layers.3.q_proj.output"}) == (8, "linear output")
    assert plan.tensor_bits({"layers.3.gate_proj.output"})[0] == 16  # App. D: mean far from zero
    assert plan.tensor_bits({"lm_head.output"})[0] == 16
    assert plan.tensor_bits({"layers.3.v_proj.output", "layers.3.value"}) == (8, "KV")
    assert BitPlan.parse("8-8-16").tensor_bits({"layers.3.v_proj.output", "layers.3.value"})[0] == 16
    assert plan.tensor_bits(set()) == (16, "default 16")  # norms, SiLU, softmax, RoPE, residual adds


def test_linear_input_rules():
    plan = BitPlan.parse("4-4-8")
    assert plan.input_bits("layers.0.q_proj", rotated=True) == (4, "A (rotated)")
    assert plan.input_bits("layers.0.q_proj", rotated=False) == (8, "A, unrotated: at least 8")
    assert plan.input_bits("layers.0.down_proj", rotated=False) == (8, "down_proj input")
    assert plan.input_bits("lm_head", rotated=True) == (16, "lm_head input")


def test_overrides_last_match_wins():
    plan = BitPlan.parse("4-8-8", ["*.down_proj.input=16", "layers.2.down_proj.input=8", "add_*=8"])
    assert plan.input_bits("layers.1.down_proj", rotated=False) == (16, "override *.down_proj.input=16")
    assert plan.input_bits("layers.2.down_proj", rotated=False) == (8, "override layers.2.down_proj.input=8")
    assert plan.tensor_bits(set(), names=["add_7"]) == (8, "override add_*=8")
    assert plan.name == "4-8-8 *.down_proj.input=16 layers.2.down_proj.input=8 add_*=8"


@pytest.mark.parametrize("config, overrides, message", [
    ("8-8", (), r"write it W-A-KV"),
    ("8-6-8", (), r"A must be one of \(4, 8, 16\), got 6"),
    ("8-8-8", ("*.q_proj.input",), r"write it pattern=bits"),
    ("8-8-8", ("*.q_proj.input=3",), r"bits must be one of"),
])
def test_bad_plans(config, overrides, message):
    with pytest.raises(QuantNpuError, match=message):
        BitPlan.parse(config, overrides)
