"""The package's layering and its checks that do not vanish: each part of quantnpu imports only the
parts below it (passes never run the pipeline: no passes <-> pipeline cycle, not even lazily), no
`assert` guards anything in the package, and a failed postcondition is an error under `python -O`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quantnpu"

# What each part of the package may import from quantnpu (besides itself), imports inside
# functions included. The relation is a hierarchy (checked below): a new import that goes up
# a layer fails here, and so does an edit of this table that would make a cycle.
FOUNDATION = {"errors", "diagnostics", "paths", "fileio", "memory", "distributed", "logs"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "diagnostics": set(),
    "paths": set(),
    "logs": set(),
    "memory": set(),
    "estimate": {"errors", "memory"},
    "distributed": {"errors"},
    "fileio": {"errors"},
    "graph": FOUNDATION,
    "models": FOUNDATION,
    "lowering": FOUNDATION | {"graph"},
    "quantizers": FOUNDATION | {"graph", "lowering"},
    "passes": FOUNDATION | {"graph", "quantizers"},     # never pipeline, cli, report, lowering, models
    "runtime_harness": FOUNDATION | {"graph", "lowering", "models", "quantizers"},
    "pipeline": FOUNDATION | {"graph", "quantizers", "passes"},
    "prepare": FOUNDATION | {"lowering", "models"},
    "report": FOUNDATION | {"graph", "quantizers", "passes", "pipeline", "models", "lowering", "runtime_harness"},
    "cli": FOUNDATION | {"estimate", "graph", "quantizers", "passes", "pipeline", "models", "lowering", "runtime_harness", "report", "prepare"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _part(path: Path, package: Path = PACKAGE) -> str:
    """The layer a source file belongs to: its subpackage, or its module name at the top level."""
    relative = path.relative_to(package)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, part) for every quantnpu import in the file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["quantnpu", *path.relative_to(root).parent.parts]
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            # `from quantnpu import pipeline` imports the submodule named
            modules = [f"{module}.{alias.name}" for alias in node.names] if module == "quantnpu" else [module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            modules = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "quantnpu" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_the_layer_table_is_a_hierarchy():
    state: dict[str, str] = {}

    def visit(part: str, path: tuple[str, ...]) -> None:
        if state.get(part) == "done":
            return
        assert state.get(part) != "open", f"import cycle allowed by ALLOWED: {' -> '.join(path + (part,))}"
        state[part] = "open"
        for below in ALLOWED.get(part, ()):
            visit(below, path + (part,))
        state[part] = "done"

    for part in ALLOWED:
        visit(part, ())


def test_every_module_imports_only_the_layers_below_it():
    sources = sorted(PACKAGE.rglob("*.py"))
    unplaced = sorted({_part(p) for p in sources} - set(ALLOWED))
    assert not unplaced, f"place these parts of quantnpu in tests/test_layering.py's ALLOWED: {unplaced}"
    upward = [f"{path.relative_to(ROOT)}:{line} imports quantnpu.{part}"
              for path in sources for line, part in _imported_parts(path)
              if part != _part(path) and part not in ALLOWED[_part(path)]]
    assert not upward, "imports across the layering (see ALLOWED):\n" + "\n".join(upward)


def test_no_pass_imports_the_pipeline_or_anything_that_runs_it():
    for path in sorted((PACKAGE / "passes").glob("*.py")):
        reached = {part for _, part in _imported_parts(path)}
        assert not reached & {"pipeline", "cli", "report", "lowering"}, f"{path.name} imports {sorted(reached)}"


def test_the_layering_check_sees_a_lazy_import(tmp_path):
    source = tmp_path / "quantnpu" / "passes" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from quantnpu.pipeline import fake_quant_passes\n    from ..cli import main\n"
                      "    import importlib\n    importlib.import_module('quantnpu.report')\n")
    assert [part for _, part in _imported_parts(source, tmp_path / "quantnpu")] == ["pipeline", "cli", "report"]


def test_no_assert_guards_anything_in_the_package():
    """`python -O` strips asserts: a pre/postcondition is `require(...)` or a raised quantnpu error."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted(PACKAGE.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert not found, "assert statements in quantnpu/ (they vanish under python -O):\n" + "\n".join(found)


_UNDER_O = """
import sys
import torch
from quantnpu.errors import PassFailedError
from quantnpu.passes import PassResult, PrepareForQnn, UntieEmbeddings
from quantnpu.passes.base import PassManager
from quantnpu.pipeline import float_passes
import quantnpu.quantizers.quantnpu_quantizer as quantizer
from tests.graph_testing import annotated_graph, tiny_graph

assert False, "asserts still run: this is not python -O"
print("optimize", sys.flags.optimize)

class KeepsTheTie(UntieEmbeddings):
    def call(self, gm):
        return PassResult(gm, False)

try:
    PassManager([KeepsTheTie()], verify=False).run(annotated_graph())
except PassFailedError as error:
    print("caught:", error)

quantizer.recompose_rms_norms = lambda gm: 0   # the norms stay x * x, mean, rsqrt, mul
gm = PassManager(float_passes("none"), verify=False).run(tiny_graph("llama", layers=1))
try:
    PassManager([PrepareForQnn()], verify=False).run(gm)
except PassFailedError as error:
    print("caught:", error)
"""


@pytest.mark.skipif(sys.flags.optimize, reason="the test itself runs python -O")
def test_a_failed_postcondition_is_an_error_under_python_dash_o():
    run = subprocess.run([sys.executable, "-O", "-c", _UNDER_O], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith(("optimize", "caught:"))]
    assert lines[0] == "optimize 1"
    assert lines[1].startswith("caught: pass KeepsTheTie failed: node %embedding: embedding still shares lm_head's weight")
    assert lines[2].startswith("caught: pass PrepareForQnn failed: node %rsqrt")
    assert "rsqrt left after PrepareForQnn" in lines[2]
