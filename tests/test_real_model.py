"""Real SmolLM2-135M end-to-end checks: minutes each, so marked `slow` (`make test-slow`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantnpu.models.corpus import split_tokens, token_windows
from quantnpu.models.export import export_causal_lm, save_pt2
from quantnpu.passes import PassManager
from quantnpu.pipeline import float_passes
from quantnpu.passes.annotate_roles import find_roles
from quantnpu.runtime_harness.perplexity import eager_forward, perplexity

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SEQ = 128


@pytest.fixture(scope="module")
def smollm2():
    from quantnpu.models.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def windows(smollm2):
    return token_windows(split_tokens(smollm2[1], "evaluation"), SEQ, 2)


@pytest.fixture(scope="module")
def program(smollm2):
    return export_causal_lm(smollm2[0], SEQ)


def test_exported_graph_has_the_eager_perplexity(smollm2, windows, program):
    eager = perplexity(eager_forward(smollm2[0]), windows, progress=False)
    graph = perplexity(PassManager(float_passes("none")).run(program.module()), windows, progress=False)
    assert abs(graph.ppl - eager.ppl) / eager.ppl < 1e-4


def test_roles_of_all_30_layers(program):
    """Roles come from the graph alone: the same with or without the export's module names."""
    gm = program.module()
    roles = {n.name: i.role for n, i in find_roles(gm).items()}
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    assert len(roles) == 3 + 30 * 10
    assert {n.name: i.role for n, i in find_roles(gm).items()} == roles


def test_rotated_graph_keeps_logits_and_perplexity(program, windows):
    plain = PassManager(float_passes("none")).run(program.module())
    rotated = PassManager(float_passes("hadamard")).run(program.module())
    with torch.no_grad():
        a, b = plain(windows[:1]), rotated(windows[:1])
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    p_plain, p_rotated = perplexity(plain, windows, progress=False), perplexity(rotated, windows, progress=False)
    assert abs(p_rotated.ppl - p_plain.ppl) / p_plain.ppl < 1e-3


EXPECTED = ROOT / "tests" / "expected" / "real_model.json"


def _recipe_for_comparison(recipe: dict) -> dict:
    """The run's recipe without its name and what only says where or how often it checkpointed."""
    stage_one = {k: v for k, v in (recipe.get("stage_one") or {}).items() if k not in ("checkpoint", "checkpoint_every", "resume")}
    return {**{k: v for k, v in recipe.items() if k != "name"}, "stage_one": stage_one}


def check_against_recorded(record: dict, expected: dict) -> None:
    """A run record of the main job against the recorded one: the same recipe (else the values must
    be measured again, see the file's note), the float perplexity to 1e-4 (it is deterministic),
    the fake-quant and .pte perplexities within `expected["tolerance"]` (relative)."""
    assert _recipe_for_comparison(record["recipe"]) == expected["recipe"], (
        f"the shipped recipe differs from the one {EXPECTED.name} was measured with: measure again ({expected['note']})")
    evaluation = record["evaluation"]
    assert evaluation["windows"] == expected["eval_windows"] and record["calibration"]["windows"] == expected["calib_windows"]
    assert evaluation["float_graph"]["ppl"] == pytest.approx(expected["ppl"]["float_graph"], rel=1e-4)
    for name in ("fake_quant", "pte_htp_simulator"):
        assert evaluation[name]["ppl"] == pytest.approx(expected["ppl"][name], rel=expected["tolerance"]), name


def test_main_job_on_the_real_model(program, tmp_path):
    """tools/lower.py with the shipped recipe on SmolLM2-135M (4 calibration windows, 1 evaluation
    window): the float, fake-quant and .pte perplexities are the recorded run's
    (tests/expected/real_model.json)."""
    expected = json.loads(EXPECTED.read_text())
    pt2 = save_pt2(program, tmp_path / "smollm2.pt2")
    output = tmp_path / "smollm2.pte"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "lower.py"), str(pt2), "-o", str(output),
         "--eval", "--eval-windows", str(expected["eval_windows"]), "--calib-windows", str(expected["calib_windows"]), "-q"],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    check_against_recorded(json.loads(output.with_suffix(".json").read_text()), expected)
